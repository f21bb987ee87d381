"""How a train step's time and memory grow with the tokens per window (channels x patches).

    python bench/step_cost.py [--model base] [--stage finetune] [--steps 3] [--batch 32]
    python bench/step_cost.py --shapes 64x4,64x8,64x16 --batch 8    # 256, 512 and 1,024 tokens a window
    python bench/step_cost.py --shapes 64x16 --batch 8 --set runtime.attention=xla   # without the chunks
    python bench/step_cost.py --smoke    # seconds: TINY, two small shapes, one step each

For windows of 19x4, 64x4, 23x10 and 32x8 patches (within the original's 256 tokens; --shapes sets others, a
window past 16 patches extending the model's time_embed rows as a run would), batch 32, float32, it prints the
warm step's wall time and CPU time (all threads; what other jobs on the machine disturb least), XLA's temporary
memory of the compiled step, each shape's CPU time per token against the first shape's, and the exponent k of a
least-squares fit CPU time ~ tokens^k (1 would be linear; attention's share makes it grow above 1 as windows
lengthen).
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from step_vs_pytorch import jax_step

SHAPES = ((19, 4), (64, 4), (23, 10), (32, 8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--stage", default="finetune", choices=("finetune", "pretrain"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="windows a step (default 32)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, as labram train --set (e.g. runtime.attention=xla)")
    parser.add_argument("--shapes", type=lambda text: tuple(tuple(map(int, s.split("x"))) for s in text.split(",")),
                        default=SHAPES, help="channels x patches of each window, e.g. 64x4,64x8,64x16")
    parser.add_argument("--smoke", action="store_true",
                        help="a check of the script in seconds: TINY, the first shape and one of 4 x 20 (past the "
                        "original's 16 time_embed rows), one step each")
    args = parser.parse_args()
    shapes = args.shapes
    if args.smoke:
        args.model, args.steps, shapes = "tiny", 1, (SHAPES[0], (4, 20))
    tokens, times, cpu_times = [], [], []
    for channels, patches in shapes:
        trainer, batch = jax_step(args.model, args.stage, channels, patches, args.batch, tuple(args.set))
        rng = jax.random.key(0)
        compiled = trainer.compiled_step()
        memory = compiled.memory_analysis()
        state, metrics = compiled(trainer.state, batch, rng)
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready(metrics)
        tic, cpu_tic = time.perf_counter(), time.process_time()
        for i in range(args.steps):
            state, metrics = compiled(state, batch, jax.random.fold_in(rng, i))
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - tic) / args.steps
        cpu_seconds = (time.process_time() - cpu_tic) / args.steps
        tokens.append(channels * patches)
        times.append(seconds)
        cpu_times.append(cpu_seconds)
        per_token = (cpu_seconds / tokens[-1]) / (cpu_times[0] / tokens[0])
        print(f"{args.model} {args.stage} {channels:2d} x {patches:2d} = {channels * patches:4d} tokens, batch "
              f"{args.batch}: {seconds:6.2f} s/step ({cpu_seconds:6.2f} CPU s, {per_token:4.2f}x the first shape's "
              f"per token), temporaries {memory.temp_size_in_bytes / 2**30:5.2f} GiB", flush=True)
    k = np.polyfit(np.log(tokens), np.log(cpu_times), 1)[0]
    k_wall = np.polyfit(np.log(tokens), np.log(times), 1)[0]
    print(f"fitted exponent: step CPU time ~ tokens^{k:.2f} (wall time ~ tokens^{k_wall:.2f})")


if __name__ == "__main__":
    main()

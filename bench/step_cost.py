"""How a train step's time and memory grow with the tokens per window (channels x patches, up to 256).

    python bench/step_cost.py [--model base] [--stage finetune] [--steps 3]
    python bench/step_cost.py --smoke    # seconds: TINY, two small shapes, one step each

For windows of 19x4, 64x4, 23x10 and 32x8 patches (batch 32, float32) it prints the warm step's wall time and
CPU time (all threads; what other jobs on the machine disturb least), XLA's temporary memory of the compiled
step, and the exponent k of a least-squares fit CPU time ~ tokens^k (1 would be linear; attention's share makes
it grow above 1 as windows lengthen).
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
    parser.add_argument("--smoke", action="store_true",
                        help="a check of the script in seconds: TINY, the first shape and one of 32 x 4, one step "
                        "each")
    args = parser.parse_args()
    shapes = SHAPES
    if args.smoke:
        args.model, args.steps, shapes = "tiny", 1, (SHAPES[0], (32, 4))
    tokens, times, cpu_times = [], [], []
    for channels, patches in shapes:
        trainer, batch = jax_step(args.model, args.stage, channels, patches)
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
        print(f"{args.model} {args.stage} {channels:2d} x {patches:2d} = {channels * patches:3d} tokens: "
              f"{seconds:6.2f} s/step ({cpu_seconds:6.2f} CPU s), temporaries "
              f"{memory.temp_size_in_bytes / 2**30:5.2f} GiB", flush=True)
    k = np.polyfit(np.log(tokens), np.log(cpu_times), 1)[0]
    k_wall = np.polyfit(np.log(tokens), np.log(times), 1)[0]
    print(f"fitted exponent: step CPU time ~ tokens^{k:.2f} (wall time ~ tokens^{k_wall:.2f})")


if __name__ == "__main__":
    main()

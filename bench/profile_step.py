"""Where a train step's time goes: a jax.profiler trace of warm steps, summed per XLA operation.

    python bench/profile_step.py --model base --stage finetune [--steps 3] [--top 25] [--trace DIR]

Same batch and config as bench/step_vs_pytorch.py. It prints the step's wall time, then the XLA operations
(fusions, dots, convolutions, ...) that took the most device time over the traced steps, with their share, and
the share per kind of operation. The trace directory opens in TensorBoard's or XProf's profile viewer.
"""
from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time
from pathlib import Path

import jax

from step_vs_pytorch import jax_step


# Executor bookkeeping on the same trace lines, not XLA operations.
NOT_OPS = ("ThreadpoolListener", "ThunkExecutor", "end:")


def op_kind(name: str) -> str:
    """A coarse kind from the HLO instruction name XLA gives each thunk (fusion names carry their root op)."""
    base = re.sub(r"[._]\d+$", "", name)
    for kind in ("convolution", "dot", "reduce", "scatter", "gather", "transpose", "copy", "sort",
                 "custom-call", "all-reduce", "rng", "while", "conditional"):
        if kind in base:
            return kind
    return "fusion" if "fusion" in base else base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--stage", default="finetune", choices=("finetune", "pretrain"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", default="", help="where to keep the trace (default: a temporary folder)")
    args = parser.parse_args()
    trainer, batch = jax_step(args.model, args.stage)
    rng = jax.random.key(0)
    state, metrics = trainer._step(trainer.state, batch, rng)
    state, metrics = trainer._step(state, batch, rng)
    jax.block_until_ready(metrics)
    trace = Path(args.trace or tempfile.mkdtemp())
    tic = time.perf_counter()
    with jax.profiler.trace(str(trace)):
        for i in range(args.steps):
            state, metrics = trainer._step(state, batch, jax.random.fold_in(rng, i))
        jax.block_until_ready(metrics)
    wall = (time.perf_counter() - tic) / args.steps
    per_op: collections.Counter[str] = collections.Counter()
    data = jax.profiler.ProfileData.from_file(str(next(trace.rglob("*.xplane.pb"))))
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # the CPU client's executor threads
                continue
            for event in line.events:
                if not event.name.startswith(NOT_OPS):
                    per_op[event.name] += event.duration_ns / 1e9 / args.steps
    total = sum(per_op.values())
    print(f"{args.model} {args.stage}: {wall:.3f} s per step (traced), {total:.3f} s in XLA operations "
          f"({len(per_op)} distinct) per step")
    kinds: collections.Counter[str] = collections.Counter()
    for name, seconds in per_op.items():
        kinds[op_kind(name)] += seconds
    for kind, seconds in kinds.most_common():
        print(f"  {kind:14s} {seconds:7.3f} s  {100 * seconds / max(total, 1e-9):5.1f}%")
    print(f"top {args.top} operations:")
    for name, seconds in per_op.most_common(args.top):
        print(f"  {seconds:7.3f} s  {100 * seconds / max(total, 1e-9):5.1f}%  {name}")
    print(f"trace: {trace}")


if __name__ == "__main__":
    main()

"""Where a train step's time goes: a jax.profiler trace of warm steps, summed per XLA operation.

    python bench/profile_step.py --model base --stage finetune [--steps 3] [--top 25] [--trace DIR]
    python bench/profile_step.py --smoke    # seconds: TINY, one traced step, batch 4

Same batch and config as bench/step_vs_pytorch.py. It prints the step's wall time, then the XLA operations
(fusions, dots, convolutions, ...) that took the most device time over the traced steps, with their share, the
share per kind of operation, and the share per source: each operation is charged to the innermost labram_jax
function of its HLO stack frame (or to the optimizer, where optax made it), forward or backward. The trace
directory opens in TensorBoard's or XProf's profile viewer.
"""
from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time
from pathlib import Path

import jax

from step_vs_pytorch import BATCH, jax_step


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


def hlo_sources(hlo: str) -> dict[str, str]:
    """Instruction name -> "file:function fwd|bwd" from a compiled HLO module's text (its stack-frame tables)."""
    tables: dict[str, dict[int, str]] = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    section, instructions = None, {}
    for line in hlo.splitlines():
        if line in tables:
            section = line
        elif section and not line.strip():
            section = None
        elif section:
            key, value = line.split(" ", 1)
            tables[section][int(key)] = value
        elif (m := re.match(r'\s*(?:ROOT )?%(\S+) = .*?metadata=\{op_name="([^"]*)"(?: stack_frame_id=(\d+))?', line)):
            instructions[m.group(1)] = (m.group(2), int(m.group(3) or 0))

    def fields(text: str) -> dict[str, int]:
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}

    def frames(frame: int) -> list[tuple[str, str]]:  # (file, function), innermost first
        out = []
        while frame in tables["StackFrames"] and len(out) < 64:
            f = fields(tables["StackFrames"][frame])
            loc = fields(tables["FileLocations"][f["file_location_id"]])
            out.append((tables["FileNames"][loc["file_name_id"]].strip('"'),
                        tables["FunctionNames"][loc["function_name_id"]].strip('"')))
            frame = f["parent_frame_id"] - 1  # printed one above the frame it names; 0: none
        return out

    sources = {}
    for name, (op_name, frame) in instructions.items():
        stack = frames(frame)
        direction = "bwd" if "transpose(" in op_name else "fwd"
        if any("optax" in file or file.endswith("train/optim.py") for file, _ in stack):
            sources[name] = "optimizer"
            continue
        ours = next((f"{Path(file).name}:{function}" for file, function in stack if "labram_jax" in file), "other")
        sources[name] = f"{ours} {direction}"
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--stage", default="finetune", choices=("finetune", "pretrain"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", default="", help="where to keep the trace (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true",
                        help="a check of the script in seconds: TINY, batch 4, one traced step")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.steps = "tiny", 1
    trainer, batch = jax_step(args.model, args.stage, batch_size=4 if args.smoke else BATCH)
    rng = jax.random.key(0)
    step = trainer.compiled_step()
    sources = hlo_sources(step.as_text())
    state, metrics = step(trainer.state, batch, rng)
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    trace = Path(args.trace or tempfile.mkdtemp())
    tic = time.perf_counter()
    with jax.profiler.trace(str(trace)):
        for i in range(args.steps):
            state, metrics = step(state, batch, jax.random.fold_in(rng, i))
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
    by_source: collections.Counter[str] = collections.Counter()
    for name, seconds in per_op.items():
        by_source[sources.get(name, "(runtime)")] += seconds
    print("per source:")
    for source, seconds in by_source.most_common(args.top):
        print(f"  {seconds:7.3f} s  {100 * seconds / max(total, 1e-9):5.1f}%  {source}")
    print(f"top {args.top} operations:")
    for name, seconds in per_op.most_common(args.top):
        print(f"  {seconds:7.3f} s  {100 * seconds / max(total, 1e-9):5.1f}%  {name}")
    print(f"trace: {trace}")


if __name__ == "__main__":
    main()

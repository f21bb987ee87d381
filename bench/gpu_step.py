"""Pretraining steps of LaBraM-Base, -Large and -Huge on one GPU: samples/s and MFU, in bf16 with cuDNN attention.

    python bench/gpu_step.py [--models base,large,huge] [--batch 64] [--steps 10] [--budget 540]
                             [--set key=value ...] [--json OUT]
    python bench/gpu_step.py --smoke    # seconds on a CPU: TINY, batch 4, one step, float32 and XLA attention

The check to run when a GPU is at hand, prepared so that it fits one command of under 10 minutes: each model is
timed in its own process (a fresh device memory; one that runs out of memory or time does not stop the others),
and each process gets what is left of --budget seconds. The work is the recipe's: windows of 64 channels x 4
patches (256 tokens), the frozen VQ-NSP tokenizer's forward in the step, both masked passes, AdamW, clipping 3.0,
with --batch windows per step on the one device. bf16 compute with float32 parameters and cuDNN's fused attention
(`runtime.precision=bfloat16`, `runtime.attention=cudnn`); huge keeps its recipe's `remat=block` and scanned blocks.

Per model it prints samples/s of warm steps, the time to the first step (compile included), the device's peak
memory, and MFU: the analytic model FLOPs of a step (labram_jax.train.flops, recomputation not counted) per second,
over the device's dense bf16 peak (labram_jax.train.logger.PEAK_FLOPS). On a CPU it runs too, without MFU, for a
check of the script itself: `--set runtime.precision=float32 runtime.attention=xla runtime.tokenizer_attention=xla`
(what --smoke sets, with TINY at batch 4).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_vs_pytorch import START, jax_step, peak_rss_mib  # noqa: E402

CHANNELS, PATCHES = 64, 4
GPU = ("runtime.precision=bfloat16", "runtime.attention=cudnn", "runtime.tokenizer_attention=cudnn")
RECIPE = {"tiny": (), "base": (), "large": (), "huge": ("runtime.remat=block", "runtime.scan_blocks=true")}
CPU = ("runtime.precision=float32", "runtime.attention=xla", "runtime.tokenizer_attention=xla")


def child(model: str, batch_size: int, steps: int, overrides: list[str]) -> None:
    import jax

    from labram_jax.train.flops import step_flops
    from labram_jax.train.logger import device_peak_flops

    trainer, batch = jax_step(model, "pretrain", CHANNELS, PATCHES, batch_size,
                              GPU + RECIPE[model] + tuple(overrides))
    step, rng = trainer.compiled_step(), jax.random.key(0)
    state, metrics = step(trainer.state, batch, rng)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - START
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    tic = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, batch, jax.random.fold_in(rng, i))
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - tic) / steps
    device = jax.devices()[0]
    flops, peak = step_flops(trainer.exp) / jax.device_count(), device_peak_flops(device)
    memory = device.memory_stats() or {}
    print(json.dumps({"device": device.device_kind, "devices": jax.device_count(),
                      "samples_per_s": batch_size / seconds, "step_s": seconds, "first_step_s": first,
                      "tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / peak if peak else None,
                      "peak_device_gib": memory["peak_bytes_in_use"] / 2 ** 30 if "peak_bytes_in_use" in memory
                      else None,
                      "peak_host_gib": peak_rss_mib() / 1024, "loss": float(metrics["loss"]),
                      "dtype": trainer.exp.model.dtype, "attention": trainer.exp.model.attention,
                      "remat": trainer.exp.model.remat, "scan_blocks": trainer.exp.model.scan_blocks}))


def failure(run: subprocess.CompletedProcess) -> str:
    """The exception's line of a failed child (JAX prints a note on its filtered frames after it)."""
    raised = [line for line in run.stderr.splitlines() if re.match(r"[\w.]+(Error|Exception|Exit)\b", line)]
    return raised[-1] if raised else f"exit {run.returncode}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="base,large,huge")
    parser.add_argument("--batch", type=int, default=64, help="windows per step (the original's per-GPU batch)")
    parser.add_argument("--steps", type=int, default=10, help="warm steps timed per model")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all models together")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, last")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--smoke", action="store_true", help="a check of the script in seconds on a CPU: TINY, "
                        "batch 4, one step, with the CPU settings")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.models, args.batch, args.steps, args.set = "tiny", 4, 1, [*CPU, *args.set]
    if args.child:
        return child(args.child, args.batch, args.steps, args.set)
    deadline = time.monotonic() + args.budget
    rows = []
    print("| model | samples/s | step ms | TFLOP/s | MFU | first step s | peak device GiB | setting |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        command = [sys.executable, __file__, "--child", model, "--batch", str(args.batch), "--steps",
                   str(args.steps), "--set", *args.set]
        left = deadline - time.monotonic()
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=max(left, 1.0))
            lines = run.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if run.returncode == 0 and lines else {"error": failure(run)}
        except subprocess.TimeoutExpired:
            row = {"error": f"not done within the budget's {left:.0f} s left"}
        rows.append({"model": model, "batch": args.batch, **row})
        if "error" in row:
            print(f"| {model} | error: {row['error']} |||||||", flush=True)
            continue
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        memory = f"{row['peak_device_gib']:.1f}" if row["peak_device_gib"] is not None else "n/a"
        setting = f"{row['dtype']}, {row['attention']}, remat {row['remat']}, {row['device']}"
        print(f"| {model} | {row['samples_per_s']:.1f} | {row['step_s'] * 1e3:.1f} | {row['tflops_per_s']:.2f} | "
              f"{mfu} | {row['first_step_s']:.0f} | {memory} | {setting} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

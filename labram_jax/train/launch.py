"""The command line every recipe in experiments/ shares.

    python experiments/finetune_tuab.py --workdir runs/tuab --data /data/tuab --set train.steps=20 model.depth=2

Multi-host: pass --coordinator HOST:PORT --num-processes N --process-id I (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed auto where JAX detects the cluster itself (TPU pods,
SLURM). A single host needs none of them.

Exit status: 0 done, 2 a bad config, 75 stopped by SIGTERM or SIGINT after saving a checkpoint (rerun the same
command to resume), 1 any other failure (a full disk during a checkpoint save among them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable

from labram_jax.train.config import Experiment, override


def _split_folders(data: list[str], exp: Experiment) -> Experiment:
    """--data DIR: the train/val/test folders a dataset builder writes, or shard folders used for training."""
    train, val, test = [], [], []
    for item in data:
        root = Path(item)
        if (root / "train").is_dir():
            train.append(str(root / "train"))
            val += [str(root / "val")] if (root / "val").is_dir() else []
            test += [str(root / "test")] if (root / "test").is_dir() else []
        else:
            train.append(str(root))
    return exp.replace(data=dataclasses.replace(exp.data, train=tuple(train), val=tuple(val), test=tuple(test)))


def _windows(folders: tuple[str, ...]) -> int:
    total = 0
    for folder in folders:
        manifest = Path(folder) / "manifest.json"
        if not manifest.exists():
            raise ValueError(f"{folder}: no manifest.json; give train.steps instead of train.epochs")
        total += json.loads(manifest.read_text())["windows"]
    return total


def resolve_epochs(exp: Experiment) -> Experiment:
    """Recipes state the original's epochs; steps follow from the training windows and the global batch."""
    t = exp.train
    if t.epochs <= 0:
        return exp
    steps_per_epoch = max(_windows(exp.data.train) // t.batch_size, 1)
    return exp.replace(train=dataclasses.replace(t, steps=int(t.epochs * steps_per_epoch),
                                                 warmup_steps=int(t.warmup_epochs * steps_per_epoch), epochs=0.0,
                                                 warmup_epochs=0.0))


def _initialize_distributed(args: argparse.Namespace) -> None:
    import jax

    if args.simulate_devices:
        jax.config.update("jax_num_cpu_devices", args.simulate_devices)
    coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if args.distributed == "auto":
        jax.distributed.initialize()
    elif coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(args.num_processes or os.environ.get("JAX_NUM_PROCESSES", 1)),
            process_id=int(args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID", 0)))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", required=True, help="checkpoints, logs and exports go here; a rerun resumes")
    p.add_argument("--data", action="append", default=[], help="a dataset folder (repeatable)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="typed overrides, e.g. train.steps=20 model.depth=2")
    p.add_argument("--seeds", default="", help="comma-separated seeds: one run each, then mean and std")
    p.add_argument("--aot", action="store_true", help="compile the train step ahead of time with abstract "
                                                      "shapes, print memory and FLOPs, and exit")
    p.add_argument("--simulate-devices", type=int, default=0, help="CPU devices to simulate (for --aot)")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, for multi-host runs")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--distributed", choices=("off", "auto"), default="off")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines on stderr "
                                                        "(metrics.jsonl and TensorBoard are written as always)")
    return p


def main(recipe: Callable[[], Experiment], argv: list[str] | None = None) -> int:
    args = parser(recipe.__doc__ or "").parse_args(argv)
    try:
        exp = override(recipe(), *args.set)
        if args.data:
            exp = _split_folders(args.data, exp)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _initialize_distributed(args)
    from labram_jax import preemption  # after the device count and distributed setup, as the rest
    from labram_jax.train import aot, seeds, trainer
    from labram_jax.train.checkpoints import DiskFull

    if args.aot:
        aot.report(exp)
        return 0
    exp = resolve_epochs(exp)
    try:
        if args.seeds:
            seeds.run([int(s) for s in args.seeds.split(",")], exp, Path(args.workdir), progress=not args.quiet)
            return 0
        summary = trainer.Trainer(exp, args.workdir).train(progress=not args.quiet)
    except preemption.Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr)
        return preemption.EXIT_CODE
    except DiskFull as error:
        print(f"error: {error.strerror}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if "/" in k}, indent=1))
    return 0

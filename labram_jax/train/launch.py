"""The command line every recipe shares: experiments/*.py and `labram train`.

    python experiments/finetune_tuab.py --workdir runs/tuab --data /data/tuab --set train.steps=20 model.depth=2

Multi-host: pass --coordinator HOST:PORT --num-processes N --process-id I (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed auto where JAX detects the cluster itself (TPU pods,
SLURM). A single host needs none of them.

Exit status: 0 done, 2 bad input (a config field, the data: one line on stderr), 75 stopped by SIGTERM or SIGINT
after saving a checkpoint (rerun the same command to resume), 1 a full disk during a checkpoint save; a bug raises
with its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable

from labram_jax import host
from labram_jax.data.shards import read_manifest
from labram_jax.errors import UserError, one_line
from labram_jax.train.config import Experiment, override


def _split_folders(data: list[str], exp: Experiment) -> Experiment:
    """--data DIR: the train/val/test folders a dataset builder writes, or shard folders used for training."""
    train, val, test = [], [], []
    for item in data:
        root = Path(item)
        if not root.exists():
            raise UserError(f"--data {item}: no such file or folder")
        if (root / "train").is_dir():
            train.append(str(root / "train"))
            val += [str(root / "val")] if (root / "val").is_dir() else []
            test += [str(root / "test")] if (root / "test").is_dir() else []
        else:
            train.append(str(root))
    return exp.replace(data=dataclasses.replace(exp.data, train=tuple(train), val=tuple(val), test=tuple(test)))


def check_data_paths(exp: Experiment) -> None:
    """Every shard folder or file the experiment names exists: the first missing one, by its key, in one line."""
    for split in ("train", "val", "test"):
        for path in getattr(exp.data, split):
            if not Path(path).exists():
                raise UserError(f"data.{split}: {path}: no such file or folder")


def _manifests(folders: tuple[str, ...]) -> list[tuple[str, dict]]:
    found = [(folder, read_manifest(folder)) for folder in folders]
    for folder, manifest in found:
        if manifest is None:
            raise UserError(f"{folder}: no manifest.json to count epochs by; give train.steps (and train.eval_every) "
                            "instead of train.epochs (and train.eval_epochs)")
    return found


def _window_shapes(folder: str, manifest: dict) -> list[tuple[int, int, int]]:
    """(channels, patches, windows) per channel set of a folder, as its manifest states them."""
    shapes = []
    for names, count in manifest["channel_sets"].items():
        channels = len(names.split())
        shapes.append((channels, _window_patches(folder, manifest, channels), count))
    return shapes


def _window_sizes(folders: tuple[str, ...]) -> list[int]:
    """The patch tokens (channels x patches) of every window of the folders, from their manifests."""
    return [n * a for folder, manifest in _manifests(folders) for n, a, count in _window_shapes(folder, manifest)
            for _ in range(count)]


def check_packed_windows(exp: Experiment) -> None:
    """With packing, every training window must fit a row: the first folder whose manifest states a larger one,
    before any step (the loader would meet it only where the shuffle puts it, and every resume again)."""
    d = exp.data
    for folder in d.train:
        manifest = read_manifest(folder)
        if manifest is None:
            continue
        for channels, patches, _ in _window_shapes(folder, manifest):
            if channels * patches > d.pack_tokens:
                raise UserError(f"data.train: {folder} holds windows of {channels} channels x {patches} patches "
                                f"({channels * patches} tokens), more than data.pack_tokens={d.pack_tokens}")


def epoch_rows(exp: Experiment) -> int:
    """The batch rows one pass over the training windows fills: one a window, or with packing the rows the packer
    makes of them (pipeline.packed_rows), a row then holding several windows."""
    t, d = exp.train, exp.data
    if not d.pack_tokens:
        return sum(m["windows"] for _, m in _manifests(d.train))
    from labram_jax.data.pipeline import LoaderConfig, packed_rows

    cfg = LoaderConfig(batch_size=t.batch_size, max_channels=d.max_channels, max_patches=d.max_patches, seed=t.seed,
                       pack_tokens=d.pack_tokens, pack_windows=d.pack_windows, pack_buffer=d.pack_buffer)
    return packed_rows(_window_sizes(d.train), cfg)


def resolve_epochs(exp: Experiment) -> Experiment:
    """Recipes state the original's epochs; steps (training, warmup, between evaluations) follow from the training
    windows in the data manifests and the global batch (with packing, from the rows they pack into)."""
    t = exp.train
    if t.epochs <= 0 and t.eval_epochs <= 0:
        return exp
    steps_per_epoch = max(epoch_rows(exp) // t.batch_size, 1)
    changes: dict = {"eval_epochs": 0.0}
    if t.epochs > 0:
        changes |= {"steps": int(t.epochs * steps_per_epoch), "warmup_steps": int(t.warmup_epochs * steps_per_epoch),
                    "epochs": 0.0, "warmup_epochs": 0.0}
    if t.eval_epochs > 0:
        changes["eval_every"] = max(int(t.eval_epochs * steps_per_epoch), 1)
    return exp.replace(train=dataclasses.replace(t, **changes))


def _window_patches(folder: str, manifest: dict, channels: int | None = None) -> int:
    """The patches (seconds) of a folder's windows of `channels` channels (None: its longest window), as its
    manifest's preprocessing states them."""
    params = manifest.get("preprocessing", {})
    window = params.get("window_s", params.get("window"))
    if isinstance(window, int):
        return window
    if isinstance(window, str) and window.startswith("auto"):  # labram prep's rule, applied per channel set
        from data_prep.plan import default_window

        if channels is not None:
            return default_window(channels)
        return max(default_window(len(names.split())) for names in manifest["channel_sets"])
    raise UserError(f"{folder}/manifest.json: preprocessing states no window length (window_s or window); "
                    "set data.max_patches")


def window_shape(exp: Experiment, keep: set[str]) -> Experiment:
    """max_channels and max_patches from the data: the largest window of every split's manifest, except the
    fields in `keep` (set by the user), so that a build with other windows than the recipe's trains as it is."""
    manifests = [(folder, read_manifest(folder)) for folder in (*exp.data.train, *exp.data.val, *exp.data.test)]
    manifests = [(folder, m) for folder, m in manifests if m is not None]
    if not manifests:
        return exp
    shape = {}
    if "data.max_channels" not in keep:
        shape["max_channels"] = max(len(names.split()) for _, m in manifests for names in m["channel_sets"])
    if "data.max_patches" not in keep:
        shape["max_patches"] = max(_window_patches(folder, m) for folder, m in manifests)
    return exp.replace(data=dataclasses.replace(exp.data, **shape))


def cpu_devices(exp: Experiment, cores: int) -> int:
    """The CPU devices a single-process run on `cores` cores splits its batch over: one per core, or the most
    that the mesh and the batch allow.

    XLA's CPU backend runs each batched matmul (attention's scores and their backward, a third of a LaBraM step)
    on one thread, so a single device leaves the other cores idle through them; data-parallel devices each run
    their share of the batch on a core of their own. The mesh's fixed axes must divide the count (an explicit
    mesh.data fixes it), and the micro-batch must split over its data-parallel part.
    """
    m = exp.mesh
    if m.data != -1:
        return m.data * m.fsdp * m.tensor if m.data * m.fsdp * m.tensor <= cores else 1
    return next((n for n in range(cores, 1, -1) if _mesh_fits(exp, n)), 1)


def _mesh_fits(exp: Experiment, devices: int) -> bool:
    """Whether the run's mesh takes exactly `devices` devices and its micro-batch splits over their data axes."""
    m, t = exp.mesh, exp.train
    fixed = m.fsdp * m.tensor
    if m.data != -1:
        return m.data * fixed == devices
    return devices % fixed == 0 and (t.batch_size // max(t.grad_accum, 1)) % (devices // m.tensor) == 0


def use_cores(exp: Experiment) -> None:
    """Before JAX starts: one CPU device per core for a single-process run of `exp` (as cpu_devices allows),
    unless JAX_NUM_CPU_DEVICES or XLA_FLAGS' xla_force_host_platform_device_count set the count."""
    import jax

    if "JAX_NUM_CPU_DEVICES" in os.environ or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS",
                                                                                                       ""):
        return
    count = cpu_devices(exp, host.cpu_count())  # the container's CPU quota, not the machine's cores
    if jax.config.jax_num_cpu_devices == count:
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX has started (an earlier run in this process): its devices stay as they are
        have = jax.device_count()
        if not _mesh_fits(exp, have):
            raise UserError(f"this process already runs JAX on {have} CPU devices (an earlier run set them), which "
                            f"this run's batch cannot split over; run it in a fresh process") from None
        print(f"this process already runs JAX on {have} CPU devices (an earlier run set them): this run uses them "
              f"({count} would suit it)", file=sys.stderr)


def _initialize_distributed(args: argparse.Namespace, exp: Experiment | None = None) -> None:
    """Before JAX starts: the CPU devices (simulated ones for --aot, else use_cores for a single-process `exp`),
    then the multi-host runtime."""
    import jax

    coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if args.simulate_devices:
        jax.config.update("jax_num_cpu_devices", args.simulate_devices)
    elif exp is not None and not coordinator and args.distributed != "auto":
        use_cores(exp)
    if args.distributed == "auto":
        jax.distributed.initialize()
    elif coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(args.num_processes or os.environ.get("JAX_NUM_PROCESSES", 1)),
            process_id=int(args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID", 0)))


def parser(description: str, p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The recipes' flags, on a parser of their own or on `p` (`labram train`'s)."""
    p = p or argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="checkpoints, logs and exports go here; a rerun resumes")
    p.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="a dataset folder: a builder's output (train/, val/, test/) or shards to train on "
                        "(repeatable)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="typed overrides, e.g. train.steps=20 model.depth=2; train.steps replaces the recipe's "
                        "epochs, with the warmup's share of them")
    p.add_argument("--seeds", default="", metavar="S,S,...",
                   help="comma-separated seeds: one run each, then mean and std (default: one run, train.seed)")
    p.add_argument("--aot", action="store_true", help="compile the train step ahead of time with abstract "
                                                      "shapes, print memory and FLOPs, and exit")
    p.add_argument("--simulate-devices", type=int, default=0, metavar="N",
                   help="CPU devices to simulate, for --aot (default: 0, the real devices)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address, for multi-host runs (default: $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, metavar="N",
                   help="processes in a multi-host run (default: $JAX_NUM_PROCESSES, else 1)")
    p.add_argument("--process-id", type=int, metavar="I",
                   help="this process's index, 0..N-1 (default: $JAX_PROCESS_ID, else 0)")
    p.add_argument("--distributed", choices=("off", "auto"), default="off",
                   help="auto: JAX finds the cluster itself (TPU pods, SLURM) (default: off)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar or progress lines on stderr (default: shown; metrics.jsonl and "
                        "TensorBoard are written either way)")
    return p


def _explicit_steps(exp: Experiment, assignments: list[str]) -> Experiment:
    """--set train.steps=N runs N steps where the recipe counts epochs; the warmup keeps its share of them."""
    keys = {assignment.partition("=")[0] for assignment in assignments}
    t = exp.train
    if "train.steps" not in keys or "train.epochs" in keys or t.epochs <= 0:
        return exp
    warmup = t.warmup_steps if "train.warmup_steps" in keys else round(t.steps * t.warmup_epochs / t.epochs)
    return exp.replace(train=dataclasses.replace(t, epochs=0.0, warmup_epochs=0.0, warmup_steps=warmup))


def main(recipe: Callable[[], Experiment], argv: list[str] | None = None) -> int:
    """A recipe's command line (argv None: this process's own, which may be run again with huge pages)."""
    args = parser(recipe.__doc__ or "").parse_args(argv)
    if argv is None:
        rerun_with_huge_pages()
    return run(recipe, args)


HUGE_PAGES = "glibc.malloc.hugetlb=1"


def rerun_with_huge_pages() -> None:
    """Run this process's command again, once, with glibc's malloc asking for transparent huge pages on the
    blocks it maps (GLIBC_TUNABLES, read only at process start); a no-op where it is set or off Linux.

    XLA's CPU client allocates each execution's temporaries with malloc, above glibc's mmap threshold (1.3 GB per
    device in a LaBraM-Base step), so every step maps fresh memory and faults it in 4 KiB pages: 630,000 minor
    faults and 1.5 s of system time per step on 2 cores. In 2 MiB pages: about 2,000 faults, 0.25 s, and a step
    a quarter shorter. The tunable exists from glibc 2.35 on; older ones ignore it.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or "glibc.malloc.hugetlb" in tunables:
        return
    if sys.argv[0] in ("", "-"):  # a script from stdin (python - <<EOF) or typed in: it cannot be read again
        print(f"huge pages off: a script read from stdin cannot run again with them (start it with "
              f"GLIBC_TUNABLES={HUGE_PAGES} to have them)", file=sys.stderr, flush=True)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, HUGE_PAGES))))
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def run(recipe: Callable[[], Experiment], args: argparse.Namespace) -> int:
    """One recipe with the parsed flags of `parser`: train (or compile ahead of time) and print the summary."""
    try:  # every input is checked here, before JAX starts or anything is built
        exp = _explicit_steps(override(recipe(), *args.set), args.set)
        if args.data:
            exp = _split_folders(args.data, exp)
        seeds = parse_seeds(args.seeds)
        if not args.aot:
            if not exp.data.train:
                raise UserError("no training data: give --data DIR (a builder's output with train/, or a folder of "
                                "shards)")
            check_data_paths(exp)
            exp = resolve_epochs(window_shape(exp, {a.partition("=")[0] for a in args.set}))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _initialize_distributed(args, exp)
    from labram_jax import compile_cache, preemption  # after the device count and distributed setup, as the rest

    compile_cache.enable()
    from labram_jax.train import aot, seeds as seed_runs, trainer
    from labram_jax.train.checkpoints import DiskFull

    try:
        if args.aot:
            aot.report(exp)
            return 0
        if seeds:
            seed_runs.run(seeds, exp, Path(args.workdir), progress=not args.quiet)
            return 0
        summary = trainer.Trainer(exp, args.workdir).train(progress=not args.quiet)
    except UserError as error:  # found only once the data is read (a window larger than the loader's shape, ...)
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except preemption.Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr)
        return preemption.EXIT_CODE
    except DiskFull as error:
        print(f"error: {error.strerror}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if "/" in k}, indent=1))
    return 0


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")] if text else []
    except ValueError:
        raise UserError(f"--seeds {text!r} is not a comma-separated list of integers") from None

"""Seconds a checkpoint save takes, for the grace period a preemptible run needs (README, "Stopping").

    python bench/checkpoint_save.py                   # LaBraM-Base and -Large fine-tuning states
    python bench/checkpoint_save.py --sizes huge      # any of base, large, huge
    python bench/checkpoint_save.py --smoke           # seconds: the TINY model's state

A preempted run finishes its step, then saves and waits for the write to commit (Trainer._preempted), so the
grace period must cover one step plus the time reported here as "commit". The first save of a process also sets
Orbax up; a run whose preemption save is its first save pays that, so both are printed. The state is what a
fine-tuning run saves: parameters, AdamW's two moments, the step and the RNG key.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from labram_jax import configs  # noqa: E402
from labram_jax.train.checkpoints import Checkpoints  # noqa: E402
from labram_jax.train.config import Experiment  # noqa: E402
from labram_jax.train.trainer import Trainer  # noqa: E402


def save_seconds(size: str, workdir: Path) -> dict[str, float]:
    trainer = Trainer(Experiment(stage="finetune", model=getattr(configs, size)(num_classes=1)), workdir)
    ckpt = Checkpoints(workdir, keep=2)
    result = {"bytes": float(sum(leaf.nbytes for leaf in jax.tree.leaves(trainer.state)))}
    for step, label in ((1, "first"), (2, "later")):
        tic = time.perf_counter()
        ckpt.save(step, trainer.state, {"position": step}, {})
        returned = time.perf_counter() - tic
        ckpt.wait()
        result |= {f"{label}_returns": returned, f"{label}_commit": time.perf_counter() - tic}
    ckpt.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["base", "large"], choices=("base", "large", "huge"))
    parser.add_argument("--smoke", action="store_true", help="a check of the script in seconds: the TINY model's state")
    args = parser.parse_args()
    if args.smoke:
        args.sizes = ["tiny"]
    print(f"{jax.devices()[0].device_kind} x {jax.device_count()}")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as workdir:
            r = save_seconds(size, Path(workdir))
        print(f"{size}: {r['bytes'] / 2**20:.0f} MiB of state; first save returns in {r['first_returns']:.2f} s, "
              f"commits in {r['first_commit']:.2f} s; a later save returns in {r['later_returns']:.2f} s, commits "
              f"in {r['later_commit']:.2f} s")


if __name__ == "__main__":
    main()

"""Is data preparation and loading fast enough to feed training? All three rates measured in one run.

    python bench/data_vs_train.py
    python bench/data_vs_train.py --smoke    # seconds: one recording, 64 windows, the TINY model's step

1. `labram prep` on the bundled EEGMAT recordings: hours of EEG per core-minute.
2. The grain loader over shards of TUAB-shaped windows (23 channels x 10 s): windows per second.
3. A LaBraM-Base fine-tuning train step (the real trainer, forward + backward + AdamW) on the same batch shape:
   the windows per second it consumes on this machine.
It then prints each data rate as a multiple of the training step's consumption. CPU figures move between runs;
the ratios move less.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader_throughput import measure_loader, synthetic_shards  # noqa: E402
from prep_throughput import measure_prep  # noqa: E402

from labram_jax import configs  # noqa: E402
from labram_jax.train.config import DataConfig, Experiment, TrainConfig  # noqa: E402
from labram_jax.train.trainer import Trainer  # noqa: E402

BATCH, CHANNELS, SECONDS = 32, 23, 10
SAMPLE = sorted((Path(__file__).resolve().parents[1] / "sample_data" / "eegmat").glob("*.edf"))


def measure_train_step(shards: Path, steps: int = 10, size: str = "base") -> float:
    """Windows per second consumed by the jitted LaBraM-Base (or another size's) fine-tuning step (compile
    excluded)."""
    exp = Experiment(stage="finetune", model=configs.SIZES[size](num_classes=1, drop_path_rate=0.1),
                     data=DataConfig(train=(str(shards),), max_channels=CHANNELS, max_patches=SECONDS),
                     train=TrainConfig(steps=steps, batch_size=BATCH, layer_decay=0.65))
    trainer = Trainer(exp, tempfile.mkdtemp())
    batch = {k: np.zeros(v.shape, v.dtype) for k, v in trainer.abstract_batch().items()}
    batch["x"] = np.random.default_rng(0).normal(0, 0.2, batch["x"].shape).astype(np.float32)
    batch["mask"][:] = True
    batch["valid"][:] = True
    batch = trainer.global_batch(batch)
    rng = jax.random.key(0)
    step = trainer.compiled_step()
    state, _ = step(trainer.state, batch, rng)
    jax.block_until_ready(state)
    tic = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    return steps * BATCH / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a check of the script in seconds: one recording, "
                        "64 windows in a scratch folder, two steps of the TINY model")
    args = parser.parse_args()
    print(f"machine: {jax.device_count()} {jax.default_backend()} device(s)")
    if args.smoke:
        scratch = tempfile.TemporaryDirectory()
        prep = measure_prep(SAMPLE[:1], workers=1)
        shards = synthetic_shards(Path(scratch.name), windows=64)
        loader = measure_loader(shards, BATCH, workers=0, seconds=0.5)
        step = measure_train_step(shards, steps=2, size="tiny")
    else:
        prep = measure_prep(SAMPLE, workers=1)
        shards = synthetic_shards(Path(tempfile.gettempdir()) / "labram_jax_loader_bench")
        loader = measure_loader(shards, BATCH, workers=0, seconds=5.0)
        step = measure_train_step(shards)
    # One window of training data is SECONDS of EEG; prep's rate in windows per second on one core:
    prep_windows = prep["hours_per_core_minute"] * 3600 / 60 / SECONDS
    print(f"prep:   {prep['hours_per_core_minute']:.2f} h of EEG per core-minute "
          f"(= {prep_windows:.0f} {SECONDS}-s windows/s per core)")
    print(f"loader: {loader:.0f} windows/s (in-process)")
    size = "TINY" if args.smoke else "Base"
    print(f"train:  {step:.1f} windows/s consumed by a LaBraM-{size} step, batch {BATCH} x {CHANNELS} ch x "
          f"{SECONDS} s")
    print(f"ratios vs the train step: prep x{prep_windows / step:.1f} per core, loader x{loader / step:.1f}")


if __name__ == "__main__":
    main()

"""Metric logging: a JSONL file and TensorBoard event files in the workdir, written by process 0 only.

Trackers are pluggable: anything with `write(step, metrics)` and `close()` can be added to a MetricLogger.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Protocol

import jax

from labram_jax.files import replace_atomically

# Dense bf16 peak FLOP/s per device, for MFU. Devices not listed (CPUs among them) get no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    return next((peak for name, peak in PEAK_FLOPS.items() if name.lower() in kind.lower()), None)


class Tracker(Protocol):
    def write(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlTracker:
    def __init__(self, path: Path, resumed_from: int | None = None):
        """resumed_from: the step a resumed run restarts after; the rows of later steps (written by the run before
        it, after its last checkpoint) are dropped, so that every step's rows appear once."""
        if resumed_from is not None and path.exists():
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if (row := _row(line)) is not None and row.get("step", 0) <= resumed_from]
            text = "".join(kept).encode()
            replace_atomically(path, lambda f: f.write(text))
        self.file = open(path, "a", buffering=1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")

    def close(self) -> None:
        self.file.close()


def _row(line: str) -> dict | None:
    """A metrics.jsonl row; None for the last line of a run killed while writing it (cut short)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and line.endswith("\n") else None


def _summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported on first use (only process 0 writes events) with torch hidden.

    tensorboardX imports torch, where it is installed, only to name its tensor type in a hint: 1.3-2 s at the
    start of every run. Scalars never need it; a torch the process has already imported is left as it is."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class TensorBoardTracker:
    def __init__(self, directory: Path, resumed_from: int | None = None):
        """resumed_from: as JsonlTracker's. Event files cannot be edited, so a new one starts with TensorBoard's
        purge marker: readers drop the events of steps after `resumed_from` written before it."""
        self.writer = _summary_writer()(str(directory), purge_step=None if resumed_from is None else resumed_from + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricLogger:
    def __init__(self, workdir: str | os.PathLike, trackers: list[Tracker] | None = None,
                 resumed_from: int | None = None):
        """resumed_from: the checkpoint step a resumed run starts from; the default trackers forget the rows
        logged after it."""
        self.trackers: list[Tracker] = []
        if jax.process_index() == 0:
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self.trackers = trackers if trackers is not None else [
                JsonlTracker(workdir / "metrics.jsonl", resumed_from),
                TensorBoardTracker(workdir / "tensorboard", resumed_from)]

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.write(step, metrics)

    def close(self) -> None:
        """Close every tracker; a second call does nothing."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()

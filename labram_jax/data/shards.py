"""ArrayRecord shards of windows and the manifest that describes a folder of them.

A shard is written under a temporary name and renamed when complete, so a folder never holds a half shard under a
real name: a crashed job leaves only `*.tmp` files (the writer that resumes deletes its own).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from labram_jax.data.records import Window, encode
from labram_jax.files import write_json

SHARD_SUFFIX = ".array_record"
MANIFEST = "manifest.json"


def write_shard(path: str | os.PathLike, windows: Iterable[Window]) -> int:
    """Write windows to one ArrayRecord file atomically; returns how many were written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # group_size:1 keeps every record directly addressable: the loader's global shuffle reads them one by one.
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    count = 0
    try:
        for window in windows:
            writer.write(encode(window))
            count += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return count


def shard_paths(directory: str | os.PathLike) -> list[Path]:
    return sorted(Path(directory).glob(f"*{SHARD_SUFFIX}"))


@dataclasses.dataclass
class DatasetStats:
    """Running statistics of one dataset's windows, for the manifest."""

    recordings: set[str] = dataclasses.field(default_factory=set)
    windows: int = 0
    seconds: float = 0.0
    channel_sets: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    labels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    subjects: set[str] = dataclasses.field(default_factory=set)
    # Sums in float64 over every sample, so that mean and std are exact however many windows arrive.
    total: float = 0.0
    total_sq: float = 0.0
    samples: int = 0

    def add(self, window: Window) -> None:
        signal = np.asarray(window.signal, np.float64)
        self.recordings.add(window.recording)
        self.windows += 1
        self.seconds += signal.shape[1]  # one patch per second
        self.channel_sets[" ".join(window.channel_names)] += 1
        if window.label is not None:
            self.labels[str(window.label)] += 1
        if window.subject:
            self.subjects.add(window.subject)
        self.total += float(signal.sum())
        self.total_sq += float(np.square(signal).sum())
        self.samples += signal.size

    def merge(self, other: "DatasetStats") -> None:
        self.recordings |= other.recordings
        self.subjects |= other.subjects
        self.channel_sets += other.channel_sets
        self.labels += other.labels
        for name in ("windows", "seconds", "total", "total_sq", "samples"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_json(self) -> dict[str, Any]:
        mean = self.total / self.samples if self.samples else 0.0
        var = self.total_sq / self.samples - mean ** 2 if self.samples else 0.0
        std = max(var, 0.0) ** 0.5
        finite = math.isfinite(mean) and math.isfinite(std)  # null, not NaN: the manifest stays strict JSON
        return {"recordings": len(self.recordings), "windows": self.windows, "hours": self.seconds / 3600,
                "subjects": len(self.subjects), "channel_sets": dict(self.channel_sets.most_common()),
                "labels": dict(sorted(self.labels.items())), "mean_uv": mean if finite else None,
                "std_uv": std if finite else None}


def write_manifest(directory: str | os.PathLike, stats: dict[str, DatasetStats], params: dict[str, Any],
                   **extra: Any) -> dict[str, Any]:
    """manifest.json: totals, per-dataset statistics, the preprocessing parameters and the package version."""
    from labram_jax import __version__

    directory = Path(directory)
    shards = shard_paths(directory)
    datasets = {name: s.to_json() for name, s in sorted(stats.items())}
    manifest = {
        "format": "labram-jax/windows", "version": 1, "labram_jax_version": __version__,
        "windows": sum(d["windows"] for d in datasets.values()),
        "recordings": sum(d["recordings"] for d in datasets.values()),
        "hours": sum(d["hours"] for d in datasets.values()),
        "channel_sets": dict(sum((s.channel_sets for s in stats.values()), collections.Counter()).most_common()),
        "datasets": datasets, "preprocessing": params, "shards": [p.name for p in shards], **extra,
    }
    write_json(directory / MANIFEST, manifest, allow_nan=False)  # strict JSON: any reader parses it
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """A folder's manifest.json, or None where there is none (a shard file, a folder written by other tools)."""
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None

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

from labram_jax.configs import MAX_WINDOW_S, NUM_CHANNEL_ROWS
from labram_jax.data.records import Window, encode
from labram_jax.errors import UserError, one_line
from labram_jax.files import read_regular, write_json

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


MANIFEST_MAX_BYTES = 64 * 2 ** 20  # a manifest lists channel sets and datasets: a 2-million-window corpus's is 1 MB


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """A folder's manifest.json, or None where there is none (a shard file, a folder written by other tools).
    What the loader and the trainer read of it is checked first, so that a manifest from elsewhere is refused in
    one line naming the field rather than failing, or allocating, later: windows, channel_sets (at most
    NUM_CHANNEL_ROWS channels a set, the model's channel rows), the window length, datasets' labels."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size > MANIFEST_MAX_BYTES:
        raise UserError(f"{path}: {size:,} bytes, more than a manifest's {MANIFEST_MAX_BYTES:,}")
    try:
        manifest = json.loads(read_regular(path), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:
        raise UserError(f"{path}: not a manifest: {one_line(error)}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a manifest (a JSON {type(manifest).__name__}, not an object)")
    problem = _manifest_problem(manifest)
    if problem:
        raise UserError(f"{path}: {problem}")
    return manifest


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_problem(manifest: dict[str, Any]) -> str:
    """What is wrong with the fields a manifest's readers use, or ""."""
    if not _count(manifest.get("windows")):
        return f"windows is {manifest.get('windows')!r}, not a count"
    sets = manifest.get("channel_sets")
    if not isinstance(sets, dict) or not all(isinstance(k, str) and _count(v) for k, v in sets.items()):
        return "channel_sets is not an object of channel names to window counts"
    wide = [names for names in sets if not 1 <= len(names.split()) <= NUM_CHANNEL_ROWS]
    if wide:
        return (f"channel_sets holds a set of {len(wide[0].split())} channels; a window has 1 to "
                f"{NUM_CHANNEL_ROWS} (the model's channel rows)")
    params = manifest.get("preprocessing", {})
    window = params.get("window_s", params.get("window")) if isinstance(params, dict) else None
    if not (isinstance(window, str) and window.startswith("auto") or window is None
            or _count(window) and 1 <= window <= MAX_WINDOW_S):
        return f"preprocessing's window is {window!r}, not 1 to {MAX_WINDOW_S} seconds"
    datasets = manifest.get("datasets", {})
    if not isinstance(datasets, dict) or not all(
            isinstance(d, dict) and isinstance(d.get("labels", {}), dict)
            and all(isinstance(k, str) and _count(v) for k, v in d.get("labels", {}).items())
            for d in datasets.values()):
        return "datasets is not an object of datasets with label counts"
    return ""

"""Nested subsets of training shards by recording, for the data axis of a scaling grid.

Recordings are put in one seeded order; subset k is the shortest prefix of that order with at least hours[k] of
EEG, so every subset contains the smaller ones and a recording is never split between a subset and its
complement. Windows are not copied once per subset: the recordings a subset adds to the one before are written as
one increment folder (shards + manifest.json), and subset k is increments 0..k, which the loader reads together.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from labram_jax.data.pipeline import window_source
from labram_jax.data.records import decode
from labram_jax.data.shards import SHARD_SUFFIX, DatasetStats, write_manifest, write_shard
from labram_jax.errors import UserError
from labram_jax.files import write_json

SHARD_SIZE = 2000  # windows per shard file
INDEX = "subsets.json"


@dataclasses.dataclass(frozen=True)
class Subset:
    folders: tuple[str, ...]  # increment folders 0..k
    hours: float
    windows: int
    recordings: int
    patches: int  # real channel-patches (tokens) in the subset


def _scan(sources: Sequence[str]) -> tuple[object, dict[str, list[int]], dict[str, tuple[float, int]]]:
    """The records of `sources` grouped by recording (storage order), with each recording's seconds and patches."""
    source = window_source(list(sources))
    members: dict[str, list[int]] = {}
    sizes: dict[str, tuple[float, int]] = {}
    for i in range(len(source)):
        window = decode(source[i])
        n, a, _ = window.signal.shape
        members.setdefault(window.recording, []).append(i)
        seconds, patches = sizes.get(window.recording, (0.0, 0))
        sizes[window.recording] = (seconds + a, patches + n * a)
    return source, members, sizes


def _write_folder(folder: Path, source, indices: list[int], params: dict) -> None:
    """One increment, written under a temporary name and renamed: a killed job leaves no half folder."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats: dict[str, DatasetStats] = {}
    windows = [decode(source[i]) for i in indices]
    for w in windows:
        stats.setdefault(w.dataset, DatasetStats()).add(w)
    for number, start in enumerate(range(0, len(windows), SHARD_SIZE)):
        write_shard(tmp / f"windows-{number:05d}{SHARD_SUFFIX}", windows[start:start + SHARD_SIZE])
    write_manifest(tmp, stats, params, patches=sum(int(np.prod(w.signal.shape[:2])) for w in windows))
    os.replace(tmp, folder)


def nested_subsets(sources: Sequence[str], hours: Sequence[float], out: str | os.PathLike, *,
                   seed: int = 0) -> list[Subset]:
    """Write the increments of nested subsets of `sources` with at least `hours` each (ascending) to out/.

    A rerun with the same arguments reuses what is there; other arguments in the same `out` raise.
    """
    out = Path(out)
    request = {"sources": [str(s) for s in sources], "hours": [float(h) for h in hours], "seed": seed}
    index = out / INDEX
    if index.exists():
        saved = json.loads(index.read_text())
        if saved["request"] != request:
            raise UserError(f"{out} holds subsets of {saved['request']}, not {request}: use another folder")
        return [Subset(**dict(s, folders=tuple(s["folders"]))) for s in saved["subsets"]]
    if list(hours) != sorted(hours) or not hours or hours[0] <= 0:
        raise UserError(f"subset hours must be positive and ascending, got {list(hours)}")
    source, members, sizes = _scan(sources)
    order = [sorted(members)[i] for i in np.random.default_rng(seed).permutation(len(members))]
    cumulative = np.cumsum([sizes[r][0] for r in order]) / 3600
    if hours[-1] > cumulative[-1] + 1e-9:
        raise UserError(f"{', '.join(map(str, sources))}: {cumulative[-1]:.4g} h of training data, fewer than "
                        f"the {hours[-1]:g} h the largest subset needs")
    ends = [int(np.searchsorted(cumulative, h - 1e-9)) + 1 for h in hours]
    if len(set(ends)) < len(ends):
        raise UserError(f"subset hours {list(hours)} give identical subsets (recordings are "
                        f"{', '.join(f'{s / 3600:.3g}' for s, _ in sizes.values())} h): space them further apart")
    subsets, start, folders = [], 0, []
    for k, end in enumerate(ends):
        folder = out / f"increment-{k:02d}"
        if not folder.exists():
            _write_folder(folder, source, [i for r in order[start:end] for i in members[r]],
                          {"subset_of": request["sources"], "recordings": order[start:end], "seed": seed})
        folders.append(str(folder))
        chosen = order[:end]
        subsets.append(Subset(folders=tuple(folders), hours=float(cumulative[end - 1]),
                              windows=sum(len(members[r]) for r in chosen), recordings=len(chosen),
                              patches=sum(sizes[r][1] for r in chosen)))
        start = end
    write_json(index, {"request": request, "order": order, "subsets": [dataclasses.asdict(s) for s in subsets]})
    return subsets

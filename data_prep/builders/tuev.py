"""TUEV (TUH EEG Events Corpus v2) as the original's dataset_maker/make_TUEV.py prepares it.

Per file: the same 23-channel TUH montage check, filters and 200 Hz resampling as TUAB (`tuab.read_tuh`). Each row
`channel,start_s,end_s,code` of the `.rec` beside the EDF is one example: with times = arange(n) / 200 over the
preprocessed signal, start = the first sample with time >= start_s, end = the first with time >= end_s, and the window
is samples [start - 400, end + 400) of the signal tiled three times (circular padding: indices taken modulo n), i.e.
5 s [23, 1000] for TUEV's 1-s events. Label = code - 1: 0 SPSW, 1 GPED, 2 PLED, 3 EYEM, 4 ARTF, 5 BCKG. The window's
`start` is (start - 400) / 200 seconds, negative (or reaching past the end) where the window wraps around.

TUEV annotates events per channel, so one time span often gives several rows, hence several records with the same
signal: kept, as in the original. The original also stores the row's channel ("offending_channel"); its loader never
reads it and the Window record has no field for it, so it is left out. It can be found again: a recording's records
keep the order of its `.rec` rows (less the dropped ones, listed in report.json), and `start` gives the time span.

Events the original cannot store (it crashes on them): a start or end past the last sample, a length other than
200 samples (only 5-s windows fit its array), a code outside 1..6, or a recording too short for the padded window.
These are dropped, each with a note in report.json.

Split: val = int(0.2 n) of the n train subjects (file name before the first `_`) that give at least one example,
drawn as the original does, `np.random.seed(4523); np.random.choice(subjects, size, replace=False)` (here with a
private np.random.RandomState(4523), the same stream), train = the rest, test = edf/eval. The original builds its
subject list from a Python set, whose order depends on string hashing (PYTHONHASHSEED), so its exact split is not
reproducible either; the list here is sorted. "Gives at least one example" is decided before preprocessing, from
the EDF header (montage and rate, what makes the original skip a file) and the .rec existing with rows (the
original crashes without them); such files are rejected in report.json and their subjects do not count.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import TextIO

import numpy as np

from data_prep.build import build
from data_prep.builders.tuab import read_tuh_header, subject_of, tuh_montage_problem, tuh_params, tuh_root, tuh_rule
from data_prep.engine import DEFAULT_SHARD_WINDOWS
from data_prep.plan import Events, Item, Plan
from data_prep.preprocess import Recording
from labram_jax.configs import PATCH_SIZE
from labram_jax.errors import UserError, one_line

DATASET = "tuev"
CLASSES = ("SPSW", "GPED", "PLED", "EYEM", "ARTF", "BCKG")  # .rec codes 1..6
PAD = 2 * PATCH_SIZE  # the original's 2 s either side of the event, at 200 Hz
WINDOW_SECONDS = 5
EVENT_SAMPLES = WINDOW_SECONDS * PATCH_SIZE - 2 * PAD


def read_rec(path: str | os.PathLike) -> np.ndarray:
    """float64 [E, 4]: channel, start s, end s, code per row."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns on an empty file; that is reported as "no events" instead
        rows = np.genfromtxt(path, delimiter=",", ndmin=2)
    if rows.size == 0:
        return np.zeros((0, 4))
    if rows.shape[1] != 4 or np.isnan(rows).any():
        raise ValueError(f"{Path(path).name}: expected rows 'channel,start_s,end_s,code', got {rows.shape[1]} "
                         "columns or unreadable values")
    return rows


def rec_path(edf: str | os.PathLike) -> Path:
    return Path(edf).with_suffix(".rec")


def event_window(signal: np.ndarray, t_start: float, t_end: float, sfreq: float = 200.0) -> tuple[np.ndarray, int]:
    """(signal [N, 1000], start sample of the window) of one event, the original's way; ValueError if it cannot."""
    n = signal.shape[1]
    times = np.arange(n, dtype=float) / sfreq  # what MNE's raw[:] returns as times
    start, end = np.searchsorted(times, [t_start, t_end], side="left")
    if end >= n:  # includes start >= n
        raise ValueError(f"event {t_start:g}-{t_end:g} s reaches past the recording's end ({n / sfreq:g} s)")
    if end - start != EVENT_SAMPLES:
        raise ValueError(f"event {t_start:g}-{t_end:g} s spans {end - start} samples, not the "
                         f"{EVENT_SAMPLES} that fit a {WINDOW_SECONDS}-s window")
    low, high = n + start - PAD, n + end + PAD  # on the signal tiled 3 times
    if low < 0 or high > 3 * n:
        raise ValueError(f"event {t_start:g}-{t_end:g} s: recording of {n} samples too short to pad by {PAD}")
    return signal[:, np.arange(low, high) % n], int(start) - PAD


def tuev_events(recording: Recording, item: Item) -> Events:
    """One 5-s window per usable event row of the recording's .rec."""
    cut, starts, labels, notes = [], [], [], []
    for row, (_, t_start, t_end, code) in enumerate(read_rec(rec_path(item.path)), start=1):
        try:
            if code not in range(1, len(CLASSES) + 1):
                raise ValueError(f"code {code:g} is not one of 1..{len(CLASSES)}")
            signal, start = event_window(recording.signal, t_start, t_end, recording.sfreq)
        except ValueError as error:
            notes.append(f".rec row {row} dropped: {one_line(error)}")
            continue
        cut.append(signal.reshape(signal.shape[0], WINDOW_SECONDS, PATCH_SIZE))
        starts.append(start / recording.sfreq)
        labels.append(int(code) - 1)
    shape = (0, len(recording.channels.names), WINDOW_SECONDS, PATCH_SIZE)
    return Events(np.stack(cut) if cut else np.zeros(shape, np.float32), tuple(starts), tuple(labels),
                  tuple(notes))


def _file_problem(path: Path) -> str | None:
    """Why the original makes no example of this file, judged without preprocessing it."""
    try:
        if not rec_path(path).is_file():
            return f"no {rec_path(path).name} beside it"
        if len(read_rec(rec_path(path))) == 0:
            return f"no events in {rec_path(path).name}"
        return tuh_montage_problem(*read_tuh_header(path))
    except Exception as error:  # unreadable header or .rec: reported, never fatal
        return one_line(error)


def split_subjects(subjects: list[str], *, seed: int = 4523, val_fraction: float = 0.2) -> list[str]:
    """The validation subjects, drawn from the sorted distinct subjects as the original's np.random.choice draws
    them."""
    subjects = sorted(set(subjects))
    return sorted(np.random.RandomState(seed).choice(subjects, size=int(len(subjects) * val_fraction),
                                                     replace=False).tolist())


def plan_tuev(root: str | os.PathLike, *, seed: int = 4523, val_fraction: float = 0.2, notch: float | None = 50.0,
              dtype: str = "float32") -> Plan:
    """Which TUEV file goes to which split; files the original would skip are rejected here."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rule = dataclasses.replace(tuh_rule(notch, dtype, WINDOW_SECONDS), events=tuev_events)
    edf = tuh_root(root)
    usable: dict[str, list[Path]] = {}
    rejected = []
    for part in ("train", "eval"):
        usable[part] = []
        for path in sorted((edf / part).rglob("*.edf")):
            problem = _file_problem(path)
            if problem:
                rejected.append(Item(str(path), path.relative_to(edf).as_posix(), DATASET, reject=problem))
            else:
                usable[part].append(path)
    if not usable["train"] and not usable["eval"] and not rejected:
        raise FileNotFoundError(f"no TUEV recordings under {edf}: expected {{train,eval}}/<subject>/*.edf + .rec")
    val = set(split_subjects([subject_of(p) for p in usable["train"]], seed=seed, val_fraction=val_fraction))
    items = [Item(str(p), p.relative_to(edf).as_posix(), DATASET, subject=subject_of(p),
                  split="val" if subject_of(p) in val else "train") for p in usable["train"]]
    items += [Item(str(p), p.relative_to(edf).as_posix(), DATASET, subject=subject_of(p), split="test")
              for p in usable["eval"]]
    split_rule = (f"val: np.random.RandomState({seed}).choice(sorted train subjects, int(n * {val_fraction:g}), "
                  "replace=False) over the n subjects (file name before the first '_') of edf/train with a usable "
                  "file, as the original's np.random.seed + np.random.choice (whose subject order came from a set); "
                  "train: the other train subjects; test: edf/eval.")
    details = tuh_params(notch, dtype) | {"window_s": WINDOW_SECONDS, "event_padding_s": PAD / PATCH_SIZE,
                                          "padding": "circular (signal tiled 3x)",
                                          "labels": dict(enumerate(CLASSES)), "seed": seed,
                                          "val_fraction": val_fraction}
    return Plan(tuple(rejected + items), rule, dataset=DATASET, source=str(edf), split_rule=split_rule,
                details=details)


def build_tuev(root: str | os.PathLike, out: str | os.PathLike, *, seed: int = 4523, val_fraction: float = 0.2,
               notch: float | None = 50.0, dtype: str = "float32", workers: int = 1,
               shard_size: int = DEFAULT_SHARD_WINDOWS, progress: TextIO | None = None) -> dict:
    """Write TUEV to out/{train,val,test}/ (ArrayRecord shards + manifest.json) and out/report.json
    (data_prep.build).

    `root`: the TUEV v2 release folder or its `edf` folder, holding {train,eval}/<subject>/*.edf with their .rec.
    Returns the report (per-split counts, every file's status, dropped events as `notes`).
    """
    plan = plan_tuev(root, seed=seed, val_fraction=val_fraction, notch=notch, dtype=dtype)
    return build(plan, out, workers=workers, shard_windows=shard_size, progress=progress)

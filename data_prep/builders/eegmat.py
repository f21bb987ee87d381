"""PhysioNet EEGMAT ("EEG During Mental Arithmetic Tasks", 36 subjects, 500 Hz EDF) as a rest-vs-task set.

`SubjectNN_1.edf` is the background recording before the task (label 0, rest), `SubjectNN_2.edf` the recording
during serial subtraction (label 1, task). Subjects 00-27 train, 28-31 val, 32-35 test by default (a `splits`
argument overrides it); a subject missing from `root` is simply absent, and a split left without subjects gets no
folder.

Windows: non-overlapping 5-s windows, tail dropped (the 182-s rest and 62-s task files give 36 and 12). 5 s is what
the EEG foundation-model benchmarks built around LaBraM use for this set: CBraMod's Mental Arithmetic task (the same
28/4/4 subject split) and REVE both cut disjoint 5-s windows; 5 x 200-sample patches also stay well inside LaBraM's
16-patch time embedding.

Channels: the 19 scalp electrodes plus `EEG A2-A1`, 20 in the files' order. The resolver maps `A2-A1` to the A2
row, as the original's TUH name rule would (the part before '-'); the signal is really the right-minus-left ear
difference of the linked-ear reference. CBraMod uses the same 20; `include_a2=False` keeps the 19 scalp channels.
The ECG channel is dropped. Filters are LaBraM's (0.1-75 Hz, 50 Hz notch: the recordings are from Ukraine, 50 Hz
mains), resampled to 200 Hz, µV.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence, TextIO

import numpy as np

from data_prep.build import build
from data_prep.engine import DEFAULT_SHARD_WINDOWS
from data_prep.plan import SPLITS, Item, Params, Plan, Rule
from data_prep.preprocess import windows
from labram_jax.errors import UserError

DATASET = "eegmat"
SCALP = ("FP1", "FP2", "F3", "F4", "F7", "F8", "T3", "T4", "C3", "C4", "T5", "T6", "P3", "P4", "O1", "O2",
         "FZ", "CZ", "PZ")
DEFAULT_SPLITS: dict[str, list[int]] = {"train": list(range(28)), "val": list(range(28, 32)),
                                        "test": list(range(32, 36))}
LABELS = {"1": 0, "2": 1}  # file suffix -> label: _1 rest, _2 task
FILE_NAME = re.compile(r"^Subject(\d+)_([12])\.edf$", re.IGNORECASE)


def eegmat_channels(include_a2: bool = True) -> tuple[str, ...]:
    return SCALP + ("A2",) if include_a2 else SCALP


def plan_eegmat(root: str | os.PathLike, *, splits: Mapping[str, Sequence[int]] | None = None, seconds: int = 5,
                stride: int | None = None, include_a2: bool = True, notch: float | None = 50.0,
                dtype: str = "float32") -> Plan:
    """Which EEGMAT file goes to which split, with its subject and label."""
    splits = DEFAULT_SPLITS if splits is None else splits
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise UserError(f"split names must be among {SPLITS}, got {sorted(unknown)}")
    split_of: dict[int, str] = {}
    for split, subjects in splits.items():
        for subject in subjects:
            if split_of.setdefault(int(subject), split) != split:
                raise UserError(f"subject {subject} is in both {split_of[int(subject)]} and {split}")
    params = Params(window=seconds, stride=stride, dtype=dtype, notch=notch)
    windows(np.zeros((1, 0), np.float32), seconds, stride)  # rejects a bad seconds/stride before any file is read
    root = Path(root).resolve()
    files = sorted(root.glob("*.edf"))
    if not files:
        raise FileNotFoundError(f"no EEGMAT recordings (SubjectNN_1.edf, SubjectNN_2.edf) in {root}")
    items = []
    for path in files:
        match = FILE_NAME.match(path.name)
        if not match:
            items.append(Item(str(path), path.name, DATASET, reject="not an EEGMAT file name (SubjectNN_1/2.edf)"))
        elif int(match[1]) not in split_of:
            items.append(Item(str(path), path.name, DATASET, reject=f"subject {match[1]} is in no split"))
        else:
            items.append(Item(str(path), path.name, DATASET, label=LABELS[match[2]], subject=f"Subject{match[1]}",
                              split=split_of[int(match[1])]))
    rule = "by subject: " + "; ".join(f"{split}: {_ranges(sorted(int(s) for s in subjects))}"
                                      for split, subjects in splits.items())
    details = {"l_freq": 0.1, "h_freq": 75.0, "notch": notch, "sfreq": 200.0, "unit": "uV", "dtype": dtype,
               "window_s": seconds, "stride_s": seconds if stride is None else stride,
               "channels": list(eegmat_channels(include_a2)), "labels": {"0": "rest (_1)", "1": "task (_2)"}}
    return Plan(tuple(items), Rule(params, channels=eegmat_channels(include_a2)), dataset=DATASET,
                source=str(root), split_rule=rule, details=details)


def _ranges(numbers: list[int]) -> str:
    """'0-27, 30' for [0, ..., 27, 30]."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]:02d}-{r[-1]:02d}" if len(r) > 1 else f"{r[0]:02d}" for r in runs) or "none"


def build_eegmat(root: str | os.PathLike, out: str | os.PathLike, *, seconds: int = 5, stride: int | None = None,
                 splits: Mapping[str, Sequence[int]] | None = None, include_a2: bool = True,
                 notch: float | None = 50.0, dtype: str = "float32", workers: int = 1,
                 shard_size: int = DEFAULT_SHARD_WINDOWS, progress: TextIO | None = None) -> dict:
    """Write EEGMAT to out/<split>/ (ArrayRecord shards + manifest.json) and out/report.json (data_prep.build).

    `root`: the folder of SubjectNN_{1,2}.edf files. `splits`: split name -> subject numbers, default
    `DEFAULT_SPLITS`. Returns the report (per-split counts, every file's status).
    """
    plan = plan_eegmat(root, splits=splits, seconds=seconds, stride=stride, include_a2=include_a2, notch=notch,
                       dtype=dtype)
    return build(plan, out, workers=workers, shard_windows=shard_size, progress=progress)

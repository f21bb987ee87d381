"""TUAB (TUH Abnormal EEG Corpus v3) as the original's dataset_maker/make_TUAB.py prepares it.

Per file: drop the original's list of non-EEG channels; exactly the 23 `EEG <NAME>-REF` channels of the TUH montage
must remain (else the file is rejected, as the original logs and skips it); reorder them to FP1 FP2 F3 F4 C3 C4 P3 P4
O1 O2 F7 F8 T3 T4 T5 T6 A1 A2 FZ CZ PZ T1 T2; band-pass 0.1-75 Hz, notch, resample to 200 Hz, µV; cut
non-overlapping 10-s windows, tail dropped. Label 1 abnormal, 0 normal; subject = file name before the first `_`.

Notch: the original notches 50 Hz although TUH was recorded on 60 Hz mains (its 75 Hz low-pass leaves 60 Hz in).
50 stays the default to match the original's data; pass notch=60.0 for a mains-correct variant.

Split: the subjects of edf/train are split 80/20 into train/val per class. The original shuffles each class's
subject list with UNSEEDED np.random.shuffle (over a list built from a set), so its split cannot be reproduced; here
the sorted subject lists of the abnormal class, then the normal class, are shuffled by one
np.random.RandomState(seed) (seed 12345, the seed of the original's prepare_TUAB_dataset). As in the original, a
subject with both normal and abnormal recordings is split once per class, so it can land in train for one class and
in val for the other. test = the official edf/eval set.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

import mne
import numpy as np

from data_prep.build import build
from data_prep.engine import DEFAULT_SHARD_WINDOWS
from data_prep.plan import Item, Params, Plan, Rule
from data_prep.preprocess import read_recording
from labram_jax.channels import TUH_CHANNELS
from labram_jax.errors import UserError

DATASET = "tuab"
WINDOW_SECONDS = 10
CLASSES = {"abnormal": 1, "normal": 0}
L_FREQ, H_FREQ = 0.1, 75.0

TUH_EDF_NAMES = tuple(f"EEG {name}-REF" for name in TUH_CHANNELS)
# The channels the original's make_TUAB.py / make_TUEV.py drop before demanding exactly the 23 above.
TUH_DROPPED = frozenset([
    "PHOTIC-REF", "IBI", "BURSTS", "SUPPR", "EEG ROC-REF", "EEG LOC-REF", "EEG EKG1-REF", "EMG-REF", "EEG C3P-REF",
    "EEG C4P-REF", "EEG SP1-REF", "EEG SP2-REF", "EEG LUC-REF", "EEG RLC-REF", "EEG RESP1-REF", "EEG RESP2-REF",
    "EEG EKG-REF", "RESP ABDOMEN-REF", "ECG EKG-REF", "PULSE RATE", "EEG PG2-REF", "EEG PG1-REF",
    *(f"EEG {i}-REF" for i in range(20, 129))])


def tuh_montage_problem(ch_names: list[str], sfreq: float) -> str | None:
    """Why the original would skip a TUH file with these channels and rate, or None if it keeps it."""
    left = [name for name in ch_names if name not in TUH_DROPPED]
    if sorted(left) != sorted(TUH_EDF_NAMES):
        missing = [name for name in TUH_EDF_NAMES if name not in left]
        extra = [name for name in left if name not in TUH_EDF_NAMES]
        return (f"{len(left)} channels after dropping the non-EEG ones, the original needs exactly the 23 "
                f"'EEG <NAME>-REF' TUH channels; missing: {', '.join(missing) or 'none'}; "
                f"extra: {', '.join(extra) or 'none'}")
    if H_FREQ >= sfreq / 2:
        return f"sampled at {sfreq:g} Hz: the original's {H_FREQ:g} Hz low-pass needs a higher rate"
    return None


def read_tuh_header(path: str | os.PathLike) -> tuple[list[str], float]:
    raw = mne.io.read_raw_edf(path, preload=False, verbose="error")
    return list(raw.ch_names), float(raw.info["sfreq"])


def read_tuh(path: str | os.PathLike) -> mne.io.BaseRaw:
    """A TUH EDF with only its 23 montage channels, in TUH order; ValueError with the reason otherwise."""
    raw = read_recording(path)
    problem = tuh_montage_problem(raw.ch_names, raw.info["sfreq"])
    if problem:
        raise ValueError(problem)
    return raw.reorder_channels(list(TUH_EDF_NAMES))


def tuh_root(root: str | os.PathLike) -> Path:
    """The corpus's `edf` folder, whether `root` is that folder or the release folder holding it."""
    root = Path(root).resolve()
    return root / "edf" if (root / "edf").is_dir() else root


def tuh_params(notch: float | None, dtype: str) -> dict:
    return {"l_freq": L_FREQ, "h_freq": H_FREQ, "notch": notch, "sfreq": 200.0, "unit": "uV", "dtype": dtype,
            "channels": list(TUH_CHANNELS)}


def tuh_rule(notch: float | None, dtype: str, window: int) -> Rule:
    """The original's TUH files: its montage rule, its filters, the 23 channels in TUH order."""
    return Rule(Params(window=window, dtype=dtype, notch=notch, l_freq=L_FREQ, h_freq=H_FREQ), reader=read_tuh,
                channels=TUH_CHANNELS)


def subject_of(path: Path) -> str:
    return path.name.split("_")[0]


def plan_tuab(root: str | os.PathLike, *, seed: int = 12345, val_fraction: float = 0.2, montage: str = "01_tcp_ar",
              notch: float | None = 50.0, dtype: str = "float32") -> Plan:
    """Which TUAB file goes to which split, with its subject and label."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rule = tuh_rule(notch, dtype, WINDOW_SECONDS)
    edf = tuh_root(root)
    rng = np.random.RandomState(seed)
    items = []
    for part in ("train", "eval"):
        for name, label in CLASSES.items():
            files = sorted((edf / part / name / montage).glob("*.edf"))
            subjects = sorted({subject_of(path) for path in files})
            if part == "train":
                rng.shuffle(subjects)
                n_train = int(len(subjects) * (1 - val_fraction))
                split_of = {s: "train" for s in subjects[:n_train]} | {s: "val" for s in subjects[n_train:]}
            else:
                split_of = {s: "test" for s in subjects}
            items += [Item(str(path), path.relative_to(edf).as_posix(), DATASET, label=label,
                           subject=subject_of(path), split=split_of[subject_of(path)]) for path in files]
    if not items:
        raise FileNotFoundError(f"no TUAB recordings under {edf}: expected {{train,eval}}/{{abnormal,normal}}/"
                                f"{montage}/*.edf")
    split_rule = (f"train/val: per class, the sorted subjects (file name before the first '_') of edf/train/<class>/"
                  f"{montage} shuffled by np.random.RandomState({seed}) (abnormal first, then normal); first "
                  f"int(n * {1 - val_fraction:g}) train, the rest val. The original shuffles unseeded, so its split "
                  "is not reproducible. test: edf/eval.")
    details = tuh_params(notch, dtype) | {"window_s": WINDOW_SECONDS, "stride_s": WINDOW_SECONDS,
                                          "montage": montage, "labels": {"0": "normal", "1": "abnormal"},
                                          "seed": seed, "val_fraction": val_fraction}
    return Plan(tuple(items), rule, dataset=DATASET, source=str(edf), split_rule=split_rule, details=details)


def build_tuab(root: str | os.PathLike, out: str | os.PathLike, *, seed: int = 12345, val_fraction: float = 0.2,
               montage: str = "01_tcp_ar", notch: float | None = 50.0, dtype: str = "float32", workers: int = 1,
               shard_size: int = DEFAULT_SHARD_WINDOWS, progress: TextIO | None = None) -> dict:
    """Write TUAB to out/{train,val,test}/ (ArrayRecord shards + manifest.json) and out/report.json
    (data_prep.build).

    `root`: the TUAB v3 release folder or its `edf` folder. Returns the report (per-split counts, every file's
    status).
    """
    plan = plan_tuab(root, seed=seed, val_fraction=val_fraction, montage=montage, notch=notch, dtype=dtype)
    return build(plan, out, workers=workers, shard_windows=shard_size, progress=progress)

"""A BIDS dataset (a folder with dataset_description.json) as a plan, read through mne-bids.

Recordings: the EEG files of the raw data (`sub-*/[ses-*/]eeg/*_eeg.{edf,bdf,vhdr,set}`, found with
mne_bids.find_matching_paths; `derivatives/` and `sourcedata/` are not raw data), each read with
mne_bids.read_raw_bids, so channels.tsv and the other sidecars apply (channels it marks bad are kept all the same,
as the engine keeps MNE's `bads` of any input; the quality checks drop flat ones). Every window carries the
recording's subject (`sub-XX`), session, task and run; the report lists them per recording. Every other file under
the root is in the report as skipped, with why: the sidecar of which recording, dataset metadata, a recording left
out by the selection (`--task`, `--subjects`, `--sessions`), or data_prep.discover's reason.

Labels (`--label-from`):
- `participants:COLUMN`: the subject's value in participants.tsv labels all its windows;
- `events:COLUMN`: windows are cut inside each event of the recording's events.tsv, fixed windows of `--window`
  seconds (default: the 256-token rule) every `--stride` from its onset over its duration, and at least the one
  window starting at its onset for an event shorter than that (instantaneous markers); the event's value of
  COLUMN labels them. Events with no value (n/a), or whose window reaches past the recording, are left out with a
  note in the report; a recording without an events.tsv, or whose events.tsv lacks COLUMN, is rejected.
A column whose values are all numbers gives them as labels (int: a class index, else a regression target); any
other column's values are classes, numbered in sorted order, and that map is in the manifest and the report.

Splits (`--split-subjects val=sub-03 test=sub-04,sub-05`): the subjects named go to those splits, every other
selected subject to train, written as `labram build` writes (OUT/{train,val,test}/ and OUT/report.json).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import os
from pathlib import Path
from typing import Sequence

import mne
import mne_bids
import numpy as np

from data_prep.discover import discover
from data_prep.plan import SPLITS, Events, Item, Params, Plan, PrepError, Rule, default_window
from data_prep.preprocess import Recording
from labram_jax.configs import PATCH_SIZE
from labram_jax.errors import one_line

DESCRIPTION = "dataset_description.json"
EXTENSIONS = (".edf", ".bdf", ".vhdr", ".set")  # BIDS-EEG's data formats
NOT_RAW = ("derivatives", "sourcedata")
NA = ("", "n/a")


@dataclasses.dataclass(frozen=True)
class Selection:
    """What of a BIDS dataset `labram prep` reads, and how it labels and splits it (the CLI's BIDS flags)."""

    tasks: tuple[str, ...] = ()  # empty: all
    subjects: tuple[str, ...] = ()
    sessions: tuple[str, ...] = ()
    label_from: str | None = None  # "events:COLUMN" or "participants:COLUMN"
    split_subjects: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (split, subjects); the rest train

    def given(self) -> bool:
        return self != Selection()


def is_bids_root(path: str | os.PathLike) -> bool:
    return (Path(path) / DESCRIPTION).is_file()


def read_bids(path: str) -> mne.io.BaseRaw:
    """A BIDS recording through mne-bids (its channels.tsv, eeg.json and events applied), loaded, in volts."""
    try:
        raw = mne_bids.read_raw_bids(mne_bids.get_bids_path_from_fname(path), verbose="error")
        return raw.load_data(verbose="error")
    except Exception as error:  # mne-bids and the MNE readers raise many types
        raise ValueError(f"{path}: cannot read through mne-bids: {one_line(error)}") from None


def _events_path(recording: str | os.PathLike) -> Path:
    return Path(mne_bids.get_bids_path_from_fname(recording).copy().update(suffix="events", extension=".tsv")
                .fpath)


def _read_tsv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise PrepError(f"{path}: cannot read: {error}") from None


def _as_number(text: str) -> int | float | None:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


def label_map(values: Sequence[str]) -> tuple[dict[str, int | float | None], dict[str, str] | None]:
    """({value: label}, {class index: value} or None for numeric values); n/a and empty values have no label."""
    present = sorted({v.strip() for v in values} - set(NA))
    numbers = {v: _as_number(v) for v in present}
    table: dict[str, int | float | None] = {v: None for v in NA}
    if all(n is not None for n in numbers.values()):
        return table | numbers, None
    return table | {v: i for i, v in enumerate(present)}, {str(i): v for i, v in enumerate(present)}


def bids_events(recording: Recording, item: Item, *, column: str, labels: tuple[tuple[str, int | float], ...],
                window: int | None, stride: int | None) -> Events:
    """Windows inside each event of the recording's events.tsv, labelled with the event's `column`."""
    seconds = window or default_window(len(recording.channels.names))
    step, size, n = stride or seconds, seconds * PATCH_SIZE, recording.signal.shape[1]
    table = dict(labels)
    cut, starts, values, notes = [], [], [], []
    for line, row in enumerate(_read_tsv(_events_path(item.path)), start=2):
        value = (row.get(column) or "").strip()
        if value in NA:
            notes.append(f"events.tsv line {line} left out: no {column}")
            continue
        onset = float(row["onset"])
        duration = _as_number((row.get("duration") or "").strip()) or 0.0
        for k in range(1 if duration < seconds else int((duration - seconds) // step) + 1):
            start = round((onset + k * step) * recording.sfreq)
            if start < 0 or start + size > n:
                notes.append(f"events.tsv line {line}: the window at {onset + k * step:g} s reaches past the "
                             f"recording ({n / recording.sfreq:g} s), left out")
                continue
            cut.append(recording.signal[:, start:start + size].reshape(-1, seconds, PATCH_SIZE))
            starts.append(start / recording.sfreq)
            values.append(table[value])
    shape = (0, len(recording.channels.names), seconds, PATCH_SIZE)
    return Events(np.stack(cut) if cut else np.zeros(shape, np.float32), tuple(starts), tuple(values),
                  tuple(notes))


def _strip(values: Sequence[str], prefix: str) -> tuple[str, ...]:
    """BIDS labels without their entity prefix: `sub-03` and `03` both name subject 03."""
    return tuple(v[len(prefix):] if v.startswith(prefix) else v for v in values)


def _check_known(flag: str, wanted: Sequence[str], known: set[str], root: Path, prefix: str) -> None:
    unknown = sorted(set(wanted) - known)
    if unknown:
        raise PrepError(f"{flag}: {prefix}{unknown[0]} is not in {root} (it has "
                        f"{', '.join(prefix + k for k in sorted(known)) or 'none'})")


def _left_out(path: mne_bids.BIDSPath, selection: Selection) -> str:
    for flag, value, wanted, name in (("--task", path.task, selection.tasks, "task"),
                                      ("--subjects", path.subject, selection.subjects, "subject"),
                                      ("--sessions", path.session, selection.sessions, "session")):
        if wanted and value not in wanted:
            return f"{name} {value or 'none'} not selected ({flag})"
    return ""


def _not_read(path: Path, discovered: str, root: Path, owners: dict[tuple[Path, str], str]) -> str:
    """Why a file under a BIDS root that is no selected EEG recording is not read."""
    owner = owners.get((path.resolve().parent, path.name.rsplit("_", 1)[0]))
    if owner:
        return f"BIDS sidecar of {owner}"
    if path.parent.resolve() == root or path.name.endswith("_scans.tsv"):
        return "BIDS metadata, not a recording"
    return discovered or "not an EEG recording of this BIDS dataset's raw data (sub-*/[ses-*/]eeg/*_eeg.*)"


def _participant_labels(root: Path, column: str, subjects: set[str]
                        ) -> tuple[dict[str, int | float | None], dict[str, str] | None]:
    path = root / "participants.tsv"
    if not path.is_file():
        raise PrepError(f"{path}: missing; --label-from participants:{column} reads it")
    rows = _read_tsv(path)
    if not rows or column not in rows[0]:
        raise PrepError(f"{path}: no column {column!r} (has {', '.join(rows[0]) if rows else 'no rows'})")
    value = {row["participant_id"].strip(): (row[column] or "").strip() for row in rows}
    missing = sorted(f"sub-{s}" for s in subjects if f"sub-{s}" not in value)
    if missing:
        raise PrepError(f"{path}: no row for {missing[0]}")
    table, classes = label_map([value[f"sub-{s}"] for s in subjects])
    return {s: table[value[f"sub-{s}"]] for s in subjects}, classes


def _event_labels(recordings: list[str], column: str, flag: str, root: Path
                  ) -> tuple[dict[str, str], dict[str, int | float | None], dict[str, str] | None]:
    """({recording: why it has no labels}, {value: label}, classes) over the events.tsv of `recordings`."""
    reject, values = {}, []
    for recording in recordings:
        events = _events_path(recording)
        rows = _read_tsv(events) if events.is_file() else []
        if not rows or column not in rows[0]:
            reject[recording] = f"no {column!r} in {events.name}" if events.is_file() else f"no {events.name}"
        values += [row[column] for row in rows if column in row]
    if len(reject) == len(recordings):
        raise PrepError(f"--label-from {flag}: no events.tsv under {root} has the column {column!r}")
    return reject, *label_map(values)


def plan_bids(root: str | os.PathLike, *, params: Params = Params(), dataset: str | None = None,
              selection: Selection = Selection()) -> Plan:
    """The selected EEG recordings of the BIDS dataset at `root`, with their entities, labels and splits; every
    other file under root as skipped."""
    root = Path(root).resolve()
    if not is_bids_root(root):
        raise PrepError(f"{root}: no {DESCRIPTION}, not a BIDS dataset")
    found = [p for p in mne_bids.find_matching_paths(root, datatypes="eeg", suffixes="eeg", extensions=EXTENSIONS)
             if Path(p.fpath).relative_to(root).parts[0] not in NOT_RAW]
    selection = dataclasses.replace(selection, subjects=_strip(selection.subjects, "sub-"),
                                    sessions=_strip(selection.sessions, "ses-"), tasks=_strip(selection.tasks, "task-"))
    for flag, wanted, entity, prefix in (("--task", selection.tasks, "task", "task-"),
                                         ("--subjects", selection.subjects, "subject", "sub-"),
                                         ("--sessions", selection.sessions, "session", "ses-")):
        _check_known(flag, wanted, {getattr(p, entity) for p in found if getattr(p, entity)}, root, prefix)
    paths = {str(Path(p.fpath).resolve()): p for p in found}
    chosen = {key: p for key, p in paths.items() if not _left_out(p, selection)}
    if not chosen:
        raise PrepError(f"{root}: no EEG recording of this BIDS dataset matches the selection")
    split_of = _split_of(selection, {p.subject for p in chosen.values()}, root)

    rule, classes, labels, reject = Rule(params, reader=read_bids), None, {}, {}
    kind, _, column = (selection.label_from or "").partition(":")
    if selection.label_from and (kind not in ("events", "participants") or not column):
        raise PrepError(f"--label-from must be events:COLUMN or participants:COLUMN, got {selection.label_from!r}")
    if kind == "participants":
        by_subject, classes = _participant_labels(root, column, {p.subject for p in chosen.values()})
        labels = {key: by_subject[p.subject] for key, p in chosen.items()}
    elif kind == "events":
        reject, table, classes = _event_labels(list(chosen), column, selection.label_from, root)
        rule = dataclasses.replace(rule, events=functools.partial(
            bids_events, column=column, window=params.window, stride=params.stride,
            labels=tuple((v, label) for v, label in sorted(table.items()) if label is not None)))

    # A sidecar is named as its recording up to the last "_" (sub-01_task-x_run-1_channels.tsv).
    owners = {(Path(key).parent, Path(key).name.rsplit("_", 1)[0]): Path(p.fpath).relative_to(root).as_posix()
              + ("" if key in chosen else ", which is not selected") for key, p in paths.items()}
    items = []
    for source in discover([str(root)], dataset):
        key = str(Path(source.path).resolve())
        bids = paths.get(key)
        if key in chosen:
            items.append(Item(source.path, source.recording, source.dataset, label=labels.get(key),
                              subject=f"sub-{bids.subject}", split=split_of.get(bids.subject, ""),
                              reject=reject.get(key, ""), session=bids.session or "", task=bids.task or "",
                              run=bids.run or ""))
        elif bids:
            items.append(Item(source.path, source.recording, source.dataset, skip=_left_out(bids, selection)))
        else:
            items.append(Item(source.path, source.recording, source.dataset,
                              skip=_not_read(Path(source.path), source.skip, root, owners)))
    name = items[0].dataset
    details = {**params.to_json(), "bids": {"tasks": list(selection.tasks) or "all",
                                            "subjects": list(selection.subjects) or "all",
                                            "sessions": list(selection.sessions) or "all"},
               "label_from": selection.label_from, "labels": classes}
    return Plan(tuple(items), rule, dataset=name, source=str(root), details=details,
                split_rule=_split_rule(selection) if selection.split_subjects else "")


def _split_of(selection: Selection, subjects: set[str], root: Path) -> dict[str, str]:
    if not selection.split_subjects:
        return {}
    split_of = {s: "train" for s in subjects}
    named: dict[str, str] = {}
    for split, members in selection.split_subjects:
        if split not in SPLITS:
            raise PrepError(f"--split-subjects: split {split!r} is not one of {', '.join(SPLITS)}")
        for subject in _strip(members, "sub-"):
            if subject not in subjects:
                raise PrepError(f"--split-subjects: sub-{subject} is not a selected subject of {root}")
            if named.setdefault(subject, split) != split:
                raise PrepError(f"--split-subjects: sub-{subject} is in both {named[subject]} and {split}")
            split_of[subject] = split
    return split_of


def _split_rule(selection: Selection) -> str:
    named = "; ".join(f"{split}: {', '.join(members)}" for split, members in selection.split_subjects)
    return f"by BIDS subject: {named}; train: every other selected subject"


def parse_split_subjects(words: Sequence[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`val=sub-03 test=sub-04,sub-05` -> (("val", ("sub-03",)), ("test", ("sub-04", "sub-05")))."""
    pairs = []
    for word in words:
        split, sep, members = word.partition("=")
        if not sep or not members:
            raise PrepError(f"--split-subjects: {word!r} is not SPLIT=SUBJECT[,SUBJECT...]")
        pairs.append((split, tuple(m for m in members.split(",") if m)))
    return tuple(pairs)


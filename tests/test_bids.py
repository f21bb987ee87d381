"""`labram prep BIDS_ROOT`: a BIDS tree written here with mne-bids from the bundled EEGMAT recordings (4 subjects,
rest and arithmetic as two tasks, cropped to 30 s), read back through mne-bids into shards."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import mne
import mne_bids
import numpy as np
import pytest

from data_prep.bids import Selection, label_map
from data_prep.prep import run
from labram_jax.cli import main
from labram_jax.data.pipeline import window_source
from labram_jax.data.records import Window, decode, encode
from labram_jax.errors import UserError

SAMPLE = Path(__file__).resolve().parents[1] / "labram_jax" / "sample_data" / "eegmat"
TASKS = {1: "rest", 2: "arithmetic"}  # EEGMAT's file suffix -> the task it records
# (onset s, duration s, trial_type): with 4-s windows every 4 s, the 9-s event gives windows at 2 and 6 s, the
# 6-s one at 12 s, the instantaneous one at 22 s, and the one at 28 s reaches past the recording's 30 s.
EVENTS = ((2.0, 9.0, "eyes"), (12.0, 6.0, "count"), (22.0, 0.0, "eyes"), (28.0, 0.0, "count"))


@pytest.fixture(scope="module")
def bids_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bids") / "eegmat-bids"
    for subject in range(4):
        for suffix, task in TASKS.items():
            raw = mne.io.read_raw_edf(SAMPLE / f"Subject{subject:02d}_{suffix}.edf", preload=True, verbose="error")
            raw.crop(0, 30).set_annotations(mne.Annotations(*zip(*EVENTS)))
            path = mne_bids.BIDSPath(subject=f"{subject:02d}", session="01", task=task, run=1, datatype="eeg",
                                     root=root)
            mne_bids.write_raw_bids(raw, path, allow_preload=True, format="EDF", overwrite=True, verbose="error")
    with (root / "participants.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    with (root / "participants.tsv").open("w", newline="") as f:  # a column of our own, classes in sorted order
        writer = csv.DictWriter(f, [*rows[0], "group"], delimiter="\t")
        writer.writeheader()
        writer.writerows({**row, "group": "patient" if i % 2 else "control"} for i, row in enumerate(rows))
    derived = root / "derivatives" / "clean" / "sub-00" / "eeg"
    derived.mkdir(parents=True)
    (derived / "sub-00_task-rest_eeg.edf").write_bytes((SAMPLE / "Subject00_1.edf").read_bytes()[:4096])
    return root


def _windows(folder: Path) -> list:
    source = window_source(folder)
    return [decode(source[i]) for i in range(len(source))]


def _all_files(root: Path) -> set[str]:
    return {str(Path(here, name)) for here, _, names in os.walk(root) for name in names}


def test_participants_labels_task_selection_and_subject_splits(bids_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["prep", str(bids_root), "--out", str(out), "--task", "rest", "--label-from", "participants:group",
                 "--split-subjects", "val=sub-02", "test=03", "--window", "5", "--workers", "1", "--quiet"]) == 0
    expected = {"train": {"sub-00", "sub-01"}, "val": {"sub-02"}, "test": {"sub-03"}}
    for split, subjects in expected.items():
        windows = _windows(out / split)
        assert {w.subject for w in windows} == subjects and len(windows) == 6 * len(subjects)
        assert {(w.session, w.task, w.run) for w in windows} == {("01", "rest", "1")}
        # participants.tsv: sub-00, sub-02 control (class 0), sub-01, sub-03 patient (class 1)
        assert all(w.label == int(w.subject[-1]) % 2 for w in windows)
        manifest = json.loads((out / split / "manifest.json").read_text())
        assert manifest["subject_ids"] == sorted(subjects)
        assert manifest["preprocessing"]["labels"] == {"0": "control", "1": "patient"}
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == {"from": "participants:group", "classes": {"0": "control", "1": "patient"}}
    assert report["split_rule"].startswith("by BIDS subject: val: sub-02; test: 03")
    written = [e for e in report["recordings"] if e["status"] == "written"]
    assert sorted((e["subject"], e["split"], e["task"]) for e in written) == [
        ("sub-00", "train", "rest"), ("sub-01", "train", "rest"), ("sub-02", "val", "rest"),
        ("sub-03", "test", "rest")]
    # Every file under the root is in the report; all but the four read are skipped, with why.
    assert {e["path"] for e in report["recordings"]} == _all_files(bids_root)
    skipped = {Path(e["path"]).name: e["reason"] for e in report["recordings"] if e["status"] == "skipped"}
    assert len(skipped) == len(_all_files(bids_root)) - 4
    assert skipped["sub-01_ses-01_task-arithmetic_run-1_eeg.edf"] == "task arithmetic not selected (--task)"
    assert "raw data" in skipped["sub-00_task-rest_eeg.edf"]  # derivatives/
    assert skipped["participants.tsv"] == skipped["sub-00_ses-01_scans.tsv"] == "BIDS metadata, not a recording"
    assert skipped["sub-00_ses-01_task-rest_run-1_channels.tsv"] == (
        "BIDS sidecar of sub-00/ses-01/eeg/sub-00_ses-01_task-rest_run-1_eeg.edf")
    assert skipped["sub-00_ses-01_task-arithmetic_run-1_events.tsv"].endswith(", which is not selected")


def test_event_windows_labelled_from_events_tsv(bids_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["prep", str(bids_root), "--out", str(out), "--subjects", "sub-00", "01", "--label-from",
                 "events:trial_type", "--window", "4", "--workers", "1", "--quiet"]) == 0
    windows = _windows(out)
    recordings = sorted({w.recording for w in windows})
    assert recordings == [f"sub-{s}/ses-01/eeg/sub-{s}_ses-01_task-{t}_run-1_eeg.edf"
                          for s in ("00", "01") for t in ("arithmetic", "rest")]
    for recording in recordings:
        mine = [w for w in windows if w.recording == recording]
        # classes in sorted order: count 0, eyes 1
        assert [(w.start, w.label) for w in mine] == [(2.0, 1), (6.0, 1), (12.0, 0), (22.0, 1)]
        assert all(w.signal.shape == (20, 4, 200) and w.task in recording for w in mine)
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == {"from": "events:trial_type", "classes": {"0": "count", "1": "eyes"}}
    written = [e for e in report["recordings"] if e["status"] == "written"]
    assert len(written) == 4 and all(len(e["notes"]) == 1 and "28 s reaches past" in e["notes"][0]
                                     for e in written)
    skipped = [e for e in report["recordings"] if e["status"] == "skipped"]
    assert len(skipped) == len(_all_files(bids_root)) - 4
    assert sum("subject 02 not selected (--subjects)" == e["reason"] for e in skipped) == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocessing"]["labels"]["classes"] == {"0": "count", "1": "eyes"}
    assert "--label-from events:trial_type" in manifest["preprocessing"]["commands"][0]
    shard = next(out.glob("*.array_record")).read_bytes()
    assert main(["prep", str(bids_root), "--out", str(out), "--subjects", "sub-00", "01", "--label-from",
                 "events:trial_type", "--window", "4", "--workers", "1", "--quiet"]) == 0  # resumes: all done
    assert next(out.glob("*.array_record")).read_bytes() == shard


@pytest.mark.parametrize("flags, message", [
    (["--subjects", "sub-09"], "--subjects: sub-09 is not in"),
    (["--label-from", "participants:handedness"], "participants.tsv: no column 'handedness'"),
    (["--label-from", "events:nope"], "no events.tsv under"),
    (["--label-from", "age"], "--label-from must be events:COLUMN or participants:COLUMN"),
    (["--split-subjects", "val=sub-01", "test=sub-01"], "sub-01 is in both val and test"),
    (["--split-subjects", "dev=sub-01"], "split 'dev' is not one of"),
])
def test_bad_bids_flags_are_one_line(bids_root: Path, tmp_path: Path, flags: list[str], message: str,
                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["prep", str(bids_root), "--out", str(tmp_path / "o"), "--quiet", *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error


def test_bids_flags_need_a_bids_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="need one BIDS dataset as INPUT"):
        run([str(SAMPLE)], tmp_path / "o", bids=Selection(tasks=("rest",)))


def test_label_map_numbers_stay_numbers_and_text_is_sorted_classes() -> None:
    assert label_map(["3", "n/a", "1"]) == ({"": None, "n/a": None, "1": 1, "3": 3}, None)
    assert label_map(["M", "F", "n/a", "M"])[1] == {"0": "F", "1": "M"}


def test_records_carry_bids_entities_and_other_records_are_unchanged() -> None:
    window = Window(signal=np.zeros((2, 1, 200), np.float32), channel_rows=np.array([1, 2], np.int16),
                    channel_names=("FP1", "FP2"), recording="r.edf", start=0.0, subject="sub-01")
    plain = encode(window)
    assert b'"session"' not in plain and decode(plain).task == ""  # as written before the fields existed
    tagged = decode(encode(dataclasses.replace(window, session="01", task="rest", run="2")))
    assert (tagged.subject, tagged.session, tagged.task, tagged.run) == ("sub-01", "01", "rest", "2")

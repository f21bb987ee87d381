"""The corpus engine under a dataset build (data_prep.build): a build killed in the middle, a worker killed under
it, and prep's quality checks on a builder's windows, on the bundled real EEGMAT recordings."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mne
import numpy as np
import pytest

from data_prep.build import build
from data_prep.builders import build_eegmat
from data_prep.builders.eegmat import plan_eegmat
from data_prep.plan import Item, Params, Plan, Rule
from data_prep.preprocess import read_recording
from labram_jax.data.shards import shard_paths

ROOT = Path(__file__).resolve().parents[1]
EEGMAT = ROOT / "sample_data" / "eegmat"
SPLITS = {"train": [0, 1], "test": [3]}


def files(root: Path) -> dict[str, bytes]:
    """{path: bytes} of everything under root but a staging folder."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".staging" not in p.parts}


@pytest.mark.slow
def test_a_killed_build_leaves_the_previous_build_and_its_rerun_completes_it(tmp_path):
    build_eegmat(EEGMAT, tmp_path / "reference", splits=SPLITS, shard_size=10)
    out = tmp_path / "out"
    build_eegmat(EEGMAT, out, seconds=4, splits=SPLITS, shard_size=10)  # the previous build: 4-s windows
    previous = files(out)
    code = (f"from data_prep.builders import build_eegmat\n"
            f"build_eegmat({str(EEGMAT)!r}, {str(out)!r}, splits={SPLITS!r}, shard_size=10)\n")
    job = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                           stderr=subprocess.PIPE, text=True)
    journal = out / ".staging" / "train" / ".progress-00000-of-00001.jsonl"
    deadline = time.monotonic() + 60
    while not (journal.exists() and journal.read_bytes().count(b"\n") >= 3):  # header + two closed shards
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read() if job.poll() else "timeout"
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert files(out) == previous  # killed mid-build: the previous build, byte for byte
    assert len(shard_paths(out / ".staging" / "train")) >= 2
    report = build_eegmat(EEGMAT, out, splits=SPLITS, shard_size=10)  # the rerun resumes the staged build
    assert files(out) == files(tmp_path / "reference")
    assert not (out / ".staging").exists() and not (out / ".previous").exists()
    assert report["splits"]["train"] == {"files": 4, "windows": 96, "subjects": 2}


def _dies_on_subject01_1(path: str) -> mne.io.BaseRaw:
    """A reader that segfaults (as the OOM killer or a broken reader would end it) on one file."""
    if path.endswith("Subject01_1.edf"):
        os.kill(os.getpid(), signal.SIGKILL)
    return read_recording(path)


def test_a_killed_worker_does_not_hang_a_build(tmp_path):
    plan = plan_eegmat(EEGMAT, splits={"train": [0, 1]})
    plan = Plan(plan.items, Rule(plan.rule.params, channels=plan.rule.channels, reader=_dies_on_subject01_1),
                dataset=plan.dataset, source=plan.source, split_rule=plan.split_rule, details=plan.details)
    report = build(plan, tmp_path / "out", workers=2)
    statuses = {e["recording"]: (e["status"], e.get("reason", "")) for e in report["recordings"] if "split" in e}
    assert statuses.pop("Subject01_1.edf") == ("rejected", "the preprocessing process died (a crash in the file "
                                                           "reader, or killed for using too much memory)")
    assert set(statuses.values()) == {("written", "")} and len(statuses) == 3
    assert report["splits"]["train"]["windows"] == 36 + 12 + 12


def test_builder_windows_get_the_quality_checks(tmp_path):
    corpus = tmp_path / "eegmat"
    corpus.mkdir()
    shutil.copy(EEGMAT / "Subject00_1.edf", corpus)
    raw = read_recording(EEGMAT / "Subject01_1.edf")
    data = raw.get_data()
    data[raw.ch_names.index("EEG Cz")] = np.random.default_rng(0).normal(0, 1e-9, raw.n_times)  # unplugged
    mne.export.export_raw(corpus / "Subject01_1.edf", mne.io.RawArray(data, raw.info, verbose="error"),
                          fmt="edf", verbose="error")
    whole = (EEGMAT / "Subject01_2.edf").read_bytes()
    (corpus / "Subject01_2.edf").write_bytes(whole[:len(whole) // 2])  # a copy cut short
    report = build_eegmat(corpus, tmp_path / "out", splits={"train": [0, 1]})
    reasons = {e["recording"]: e.get("reason") for e in report["recordings"]}
    assert reasons["Subject00_1.edf"] is None
    assert reasons["Subject01_1.edf"] == "flat channels CZ: the windows need all of their 20 channels"
    assert reasons["Subject01_2.edf"].startswith("truncated: the header announces 62 data records")
    assert report["splits"]["train"] == {"files": 1, "windows": 36, "subjects": 1}

    nan = np.random.default_rng(1).normal(0, 20e-6, (3, 5000))
    nan[1, 100] = np.nan
    mne.io.RawArray(nan, mne.create_info(["Fp1", "Cz", "O2"], 250.0, "eeg"), verbose="error").save(
        tmp_path / "nan_raw.fif", verbose="error")
    plan = Plan((Item(str(tmp_path / "nan_raw.fif"), "nan_raw.fif", "x", label=1, split="train"),),
                Rule(Params(window=4)), dataset="x")
    (entry,) = build(plan, tmp_path / "nan")["recordings"]
    assert (entry["status"], entry["reason"]) == ("rejected", "non-finite samples (NaN/Inf): 1 in Cz")
    assert not (tmp_path / "nan" / "train").exists()  # a split without windows gets no folder

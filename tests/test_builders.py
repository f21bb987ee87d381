"""Corpus builders: EEGMAT on the bundled real recordings, TUAB and TUEV on synthetic TUH-style trees, and the
EEGMAT TFDS builder without TensorFlow."""
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import mne
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from data_prep.builders import build_eegmat, build_tuab, build_tuev
from data_prep.builders.eegmat import plan_eegmat
from data_prep.builders.tuab import plan_tuab
from data_prep.preprocess import preprocess
from labram_jax.channels import TUH_CHANNELS, resolve_channels
from labram_jax.data.records import decode
from labram_jax.data.shards import MANIFEST, shard_paths

EEGMAT = Path(__file__).resolve().parents[1] / "sample_data" / "eegmat"
EEGMAT_CHANNELS = ("FP1", "FP2", "F3", "F4", "F7", "F8", "T3", "T4", "C3", "C4", "T5", "T6", "P3", "P4", "O1", "O2",
                   "FZ", "CZ", "PZ", "A2")
TUH_EDF = [f"EEG {name}-REF" for name in TUH_CHANNELS]
EXTRA = ["EEG EKG1-REF", "PHOTIC-REF", "EEG 26-REF"]
TUH_ROWS = [1, 3, 18, 22, 40, 44, 62, 66, 81, 83, 16, 24, 89, 91, 90, 92, 95, 96, 20, 42, 64, 113, 114]


def read_split(directory: Path) -> list:
    windows = []
    for path in shard_paths(directory):
        reader = ArrayRecordReader(str(path))
        windows += [decode(record) for record in reader.read_all()]
        reader.close()
    return windows


def tuh_edf(path: Path, seconds: float, seed: int, names=tuple(TUH_EDF), sfreq: float = 256.0) -> None:
    """A TUH-style EDF: the montage channels (plus non-EEG ones) in a shuffled order. The channel that belongs at
    TUH position k carries a (2 + k) Hz sine, so the output's channel order can be read off its spectra."""
    rng = np.random.default_rng(seed)
    names = list(names) + EXTRA
    t = np.arange(int(seconds * sfreq)) / sfreq
    freqs = [2.0 + TUH_EDF.index(n) if n in TUH_EDF else 30.0 for n in names]
    data = np.stack([50e-6 * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in freqs])
    data += rng.normal(0, 5e-6, data.shape)
    order = rng.permutation(len(names))
    raw = mne.io.RawArray(data[order], mne.create_info([names[i] for i in order], sfreq, "eeg"), verbose="error")
    path.parent.mkdir(parents=True, exist_ok=True)
    mne.export.export_raw(path, raw, fmt="edf", overwrite=True, verbose="error")


def assert_tuh_channels(window) -> None:
    assert window.channel_names == TUH_CHANNELS
    assert list(window.channel_rows) == TUH_ROWS
    signal = np.asarray(window.signal, np.float64).reshape(len(TUH_CHANNELS), -1)
    freqs = np.fft.rfftfreq(signal.shape[1], 1 / 200)
    # Above 1 Hz: a 0.1 Hz high-pass cannot remove the drift of recordings shorter than its 33-s FIR.
    spectrum = np.abs(np.fft.rfft(signal, axis=1)) * (freqs >= 1)
    peak = freqs[spectrum.argmax(axis=1)]
    np.testing.assert_allclose(peak, 2.0 + np.arange(23))  # rows come out in TUH order, whatever the file's order


# ---------------------------------------------------------------------------------------------------- EEGMAT

@pytest.fixture(scope="module")
def eegmat_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("eegmat")
    report = build_eegmat(EEGMAT, out, splits={"train": [0, 1], "val": [2], "test": [3]})
    return out, report


def test_eegmat_windows_labels_channels(eegmat_build):
    out, report = eegmat_build
    assert report["totals"]["written"] == 8 and report["totals"]["rejected"] == 0 and report["complete"]
    assert sorted(os.listdir(out)) == ["report.json", "test", "train", "val"]  # no staging or journal is left
    by_split = {split: read_split(out / split) for split in ("train", "val", "test")}
    assert {split: sorted({w.subject for w in ws}) for split, ws in by_split.items()} == {
        "train": ["Subject00", "Subject01"], "val": ["Subject02"], "test": ["Subject03"]}
    rows = list(resolve_channels(EEGMAT_CHANNELS).rows)
    for split, windows in by_split.items():
        for w in windows:
            assert w.label == {"1": 0, "2": 1}[w.recording[-5]]  # _1 rest, _2 task
            assert w.channel_names == EEGMAT_CHANNELS and list(w.channel_rows) == rows
            assert w.signal.shape == (20, 5, 200) and w.signal.dtype == np.float32 and w.dataset == "eegmat"
        for name in sorted({w.recording for w in windows}):
            raw = mne.io.read_raw_edf(EEGMAT / name, verbose="error")
            starts = [w.start for w in windows if w.recording == name]
            assert starts == [5.0 * i for i in range(int(raw.n_times / raw.info["sfreq"] // 5))]  # 36 or 12


def test_eegmat_manifest(eegmat_build):
    out, report = eegmat_build
    assert report["splits"]["train"] == {"files": 4, "windows": 96, "subjects": 2}
    manifest = json.loads((out / "train" / MANIFEST).read_text())
    assert manifest["windows"] == 96 and manifest["recordings"] == 4
    assert manifest["datasets"]["eegmat"]["labels"] == {"0": 72, "1": 24}
    assert manifest["subject_ids"] == ["Subject00", "Subject01"] and manifest["split"] == "train"
    assert manifest["preprocessing"]["window_s"] == 5 and manifest["preprocessing"]["notch"] == 50.0
    for split in ("val", "test"):
        assert json.loads((out / split / MANIFEST).read_text())["windows"] == 48


def test_eegmat_default_split(tmp_path):
    plan = plan_eegmat(EEGMAT)
    assert {item.split for item in plan.items} == {"train"} and len(plan.items) == 8  # 00-03: all train subjects
    (tmp_path / "Subject40_1.edf").write_bytes(b"")
    (tmp_path / "readme.edf").write_bytes(b"")
    plan = plan_eegmat(tmp_path)
    assert {i.recording: (i.split, i.reject) for i in plan.items} == {
        "readme.edf": ("", "not an EEGMAT file name (SubjectNN_1/2.edf)"),
        "Subject40_1.edf": ("", "subject 40 is in no split")}
    report = build_eegmat(tmp_path, tmp_path / "out")  # refused files are in the report, and nothing is written
    assert {e["recording"]: e["reason"] for e in report["recordings"] if e["status"] == "rejected"} == {
        "readme.edf": "not an EEGMAT file name (SubjectNN_1/2.edf)", "Subject40_1.edf": "subject 40 is in no split"}
    with pytest.raises(ValueError, match="both"):
        plan_eegmat(EEGMAT, splits={"train": [0, 1], "val": [1]})


def test_eegmat_tfds_without_tensorflow(tmp_path, eegmat_build):
    import tensorflow_datasets as tfds  # in the dev extra; TensorFlow deliberately is not

    from data_prep.tfds_builders import LabramEegmat

    assert importlib.util.find_spec("tensorflow") is None, "this test checks a build without TensorFlow"
    corpus = tmp_path / "eegmat"
    corpus.mkdir()
    for name in ("Subject00_1.edf", "Subject00_2.edf", "Subject01_1.edf", "Subject01_2.edf"):
        shutil.copy(EEGMAT / name, corpus / name)
    builder = LabramEegmat(data_dir=str(tmp_path / "tfds"), splits={"train": [0], "test": [1]})
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(corpus)))
    source = tfds.data_source("labram_eegmat", data_dir=str(tmp_path / "tfds"))
    assert sorted(source) == ["test", "train"] and len(source["train"]) == len(source["test"]) == 48
    records = {(w.recording, w.start): w for w in read_split(eegmat_build[0] / "train")}
    for i in (0, 35, 36, 47):
        example = source["train"][i]
        window = records[(example["recording"].decode(), float(example["start"]))]
        assert example["subject"] == b"Subject00" and example["label"] == window.label
        np.testing.assert_array_equal(example["x"], window.signal)  # the same windowing code made both
        np.testing.assert_array_equal(example["input_chans"], window.input_chans)
    assert "tensorflow" not in sys.modules


# ---------------------------------------------------------------------------------------------------- TUAB

@pytest.fixture(scope="module")
def tuab_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuab") / "v3.0.0"
    seed = 0
    for part, cls, subjects in [("train", "abnormal", ["aaaaaaab", "aaaaaaac", "aaaaaaad", "aaaaaaae", "aaaaaaaf"]),
                                ("train", "normal", ["aaaaaabb", "aaaaaabc", "aaaaaabd", "aaaaaabe", "aaaaaabf"]),
                                ("eval", "abnormal", ["aaaaaacb"]), ("eval", "normal", ["aaaaaadb"])]:
        for subject in subjects:
            seed += 1
            tuh_edf(root / "edf" / part / cls / "01_tcp_ar" / f"{subject}_s001_t000.edf", 25, seed)
    tuh_edf(root / "edf/train/abnormal/01_tcp_ar/aaaaaaab_s002_t001.edf", 21, 99)
    tuh_edf(root / "edf/train/normal/01_tcp_ar/aaaaaabg_s001_t000.edf", 25, 100, names=TUH_EDF[:-1])  # no T2
    tuh_edf(root / "edf/eval/normal/01_tcp_ar/aaaaaaeb_s001_t000.edf", 8, 101)  # shorter than a window
    return root


def expected_tuab_val(root: Path, seed: int) -> set[str]:
    """The original's per-class 80/20 subject split, with its unseeded shuffle given a seed and a sorted list."""
    rng = np.random.RandomState(seed)
    val = set()
    for cls in ("abnormal", "normal"):
        subjects = sorted({p.name.split("_")[0] for p in (root / "edf/train" / cls / "01_tcp_ar").glob("*.edf")})
        rng.shuffle(subjects)
        val |= set(subjects[int(len(subjects) * 0.8):])
    return val


def test_tuab_build(tuab_tree, tmp_path):
    report = build_tuab(tuab_tree, tmp_path, seed=7, workers=2)
    rejected = {e["recording"]: e["reason"] for e in report["recordings"] if e["status"] == "rejected"}
    assert sorted(rejected) == ["eval/normal/01_tcp_ar/aaaaaaeb_s001_t000.edf",
                                "train/normal/01_tcp_ar/aaaaaabg_s001_t000.edf"]
    reason = rejected["train/normal/01_tcp_ar/aaaaaabg_s001_t000.edf"]
    assert "22 channels" in reason and "missing: EEG T2-REF" in reason and "\n" not in reason
    assert rejected["eval/normal/01_tcp_ar/aaaaaaeb_s001_t000.edf"] == ("8.0 s after preprocessing, shorter than "
                                                                        "one 10-s window")
    splits = {split: read_split(tmp_path / split) for split in ("train", "val", "test")}
    val = expected_tuab_val(tuab_tree, 7)
    for split, windows in splits.items():
        for w in windows:
            assert_tuh_channels(w)
            assert w.signal.shape == (23, 10, 200) and w.dataset == "tuab"
            assert w.label == (1 if "/abnormal/" in w.recording else 0)
            assert w.subject == Path(w.recording).name.split("_")[0]
            assert w.recording.startswith("eval/" if split == "test" else "train/")
            if split != "test":
                assert (w.subject in val) == (split == "val")
        for name in {w.recording for w in windows}:  # 25 s -> 2 windows, 21 s -> 2, tail dropped
            assert [w.start for w in windows if w.recording == name] == [0.0, 10.0]
    assert {w.subject for w in splits["test"]} == {"aaaaaacb", "aaaaaadb"}
    assert not {w.subject for w in splits["train"]} & {w.subject for w in splits["val"]}
    # 5 subjects per class with a file: int(0.8 n) = 4 train, 1 val; the rejected file's subject counts, as in
    # the original's listing, and gives no window.
    assert len({w.subject for w in splits["val"]}) == len(val - {"aaaaaabg"}) >= 1
    assert report["splits"]["train"]["windows"] + report["splits"]["val"]["windows"] == 2 * 11
    manifest = json.loads((tmp_path / "train" / MANIFEST).read_text())
    assert manifest["preprocessing"]["seed"] == 7 and manifest["preprocessing"]["channels"] == list(TUH_CHANNELS)
    assert "not reproducible" in manifest["split_rule"]


def test_tuab_split_deterministic(tuab_tree):
    def val_subjects(seed):
        return {item.subject for item in plan_tuab(tuab_tree, seed=seed).items if item.split == "val"}

    assert val_subjects(3) == val_subjects(3) == expected_tuab_val(tuab_tree, 3)
    assert len({frozenset(val_subjects(seed)) for seed in range(10)}) > 1  # the seed does choose the split
    plan = plan_tuab(tuab_tree / "edf", seed=3)  # the release folder or its edf folder
    assert {item.subject for item in plan.items if item.split == "test"} == {"aaaaaacb", "aaaaaadb", "aaaaaaeb"}


# ---------------------------------------------------------------------------------------------------- TUEV

TUEV_SECONDS = 20
TUEV_EVENTS = [  # channel, start s, end s, code; the notes say what the original does with them
    (0, 0.0, 1.0, 1),  # window starts 2 s before the recording: wraps to its end
    (3, 7.123, 8.123, 2),  # times between samples: first sample at or after each
    (5, 18.9, 19.9, 6),  # window ends 1.9 s after the recording: wraps to its start
    (2, 10.0, 11.0, 3),
    (2, 10.0, 11.0, 4),  # same span, another row: another example
    (1, 12.0, 13.0, 5),
    (4, 3.0, 5.0, 6),  # 2-s event: the original's 5-s array cannot hold it
    (4, 6.0, 7.0, 7),  # no such class
]


def write_rec(path: Path, rows) -> None:
    path.write_text("".join(f"{c},{s},{e},{k}\n" for c, s, e, k in rows))


@pytest.fixture(scope="module")
def tuev_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuev") / "v2.0.0"
    subjects = [f"aaaaaa{a}{b}" for a in "ab" for b in "abcde"]
    for i, subject in enumerate(subjects + ["aaaaaaza"]):
        part = "eval" if subject == "aaaaaaza" else "train"
        edf = root / "edf" / part / subject / f"{subject}_00000001.edf"
        tuh_edf(edf, TUEV_SECONDS, i)
        write_rec(edf.with_suffix(".rec"), TUEV_EVENTS if i == 0 else TUEV_EVENTS[i % 6:i % 6 + 1])
    second = root / "edf" / "train" / subjects[1] / f"{subjects[1]}_00000002.edf"  # a subject counts once
    tuh_edf(second, TUEV_SECONDS, 40)
    write_rec(second.with_suffix(".rec"), TUEV_EVENTS[3:4])
    bad = root / "edf/train/aaaaaazb/aaaaaazb_00000001.edf"  # 22 channels: the original skips it
    tuh_edf(bad, TUEV_SECONDS, 50, names=TUH_EDF[1:])
    write_rec(bad.with_suffix(".rec"), TUEV_EVENTS[:1])
    tuh_edf(root / "edf/train/aaaaaazc/aaaaaazc_00000001.edf", TUEV_SECONDS, 51)  # no .rec
    return root, subjects


def original_event_windows(edf: Path, rec: Path) -> list[tuple[np.ndarray, int]]:
    """make_TUEV.py's BuildEvents, restated: times from raw[:], np.where, the signal concatenated 3 times."""
    raw = mne.io.read_raw_edf(edf, preload=True, verbose="error").reorder_channels(TUH_EDF)
    signals = preprocess(raw).signal
    times = np.arange(signals.shape[1], dtype=float) / 200.0
    offset = signals.shape[1]
    tiled = np.concatenate([signals, signals, signals], axis=1)
    out = []
    for _, t_start, t_end, code in np.genfromtxt(rec, delimiter=",", ndmin=2):
        start = np.where(times >= t_start)[0][0]
        end = np.where(times >= t_end)[0][0]
        if end - start != 200 or not 1 <= code <= 6:
            continue  # rows the original cannot store
        out.append((tiled[:, offset + start - 400:offset + end + 400], int(code) - 1))
    return out


def test_tuev_event_windows(tuev_tree, tmp_path):
    root, subjects = tuev_tree
    report = build_tuev(root, tmp_path)
    reasons = {e["recording"]: e["reason"] for e in report["recordings"] if e["status"] == "rejected"}
    assert sorted(reasons) == ["train/aaaaaazb/aaaaaazb_00000001.edf", "train/aaaaaazc/aaaaaazc_00000001.edf"]
    assert "22 channels" in reasons["train/aaaaaazb/aaaaaazb_00000001.edf"]
    assert "missing: EEG FP1-REF" in reasons["train/aaaaaazb/aaaaaazb_00000001.edf"]
    assert reasons["train/aaaaaazc/aaaaaazc_00000001.edf"] == "no aaaaaazc_00000001.rec beside it"
    first = f"train/{subjects[0]}/{subjects[0]}_00000001.edf"
    assert {e["recording"]: e["notes"] for e in report["recordings"] if "notes" in e} == {first: [
        ".rec row 7 dropped: event 3-5 s spans 400 samples, not the 200 that fit a 5-s window",
        ".rec row 8 dropped: code 7 is not one of 1..6"]}
    windows = read_split(tmp_path / "train") + read_split(tmp_path / "val")
    ours = [w for w in windows if w.recording == first]
    expected = original_event_windows(root / "edf" / first, (root / "edf" / first).with_suffix(".rec"))
    assert len(ours) == len(expected) == 6
    for w, (signal, label) in zip(ours, expected):
        assert w.signal.shape == (23, 5, 200) and w.label == label
        np.testing.assert_array_equal(w.signal.reshape(23, 1000), signal.astype(np.float32))
        assert_tuh_channels(w)
    assert [w.start for w in ours] == [-2.0, 5.125, 16.9, 8.0, 8.0, 10.0]  # (first sample - 400) / 200
    assert [w.label for w in ours] == [0, 1, 5, 2, 3, 4]
    test = read_split(tmp_path / "test")
    assert {w.subject for w in test} == {"aaaaaaza"} and all(0 <= w.label <= 5 for w in windows + test)


def test_tuev_split_matches_original(tuev_tree, tmp_path):
    root, subjects = tuev_tree
    build_tuev(root, tmp_path, dtype="float16")
    state = np.random.get_state()
    try:  # the original's call on its train subjects (the rejected ones give no example, so are not among them)
        np.random.seed(4523)
        val = set(np.random.choice(sorted(subjects), size=int(len(subjects) * 0.2), replace=False))
    finally:
        np.random.set_state(state)
    assert len(val) == 2
    assert {w.subject for w in read_split(tmp_path / "val")} == val
    train = read_split(tmp_path / "train")
    assert {w.subject for w in train} == set(subjects) - val
    assert train[0].signal.dtype == np.float16
    manifest = json.loads((tmp_path / "val" / MANIFEST).read_text())
    assert manifest["subject_ids"] == sorted(val) and manifest["preprocessing"]["seed"] == 4523

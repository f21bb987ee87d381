"""`labram prep` on real recordings (bundled eegmat EDF at 500 Hz, EEGLAB .set at 128 Hz, BrainVision at 200 Hz, and
an XDF file written here from the EDF's samples) and on broken ones, written next to the good ones in the same job."""
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mne
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from scipy.signal import welch

import labram_jax
from data_prep import checks, preprocess, read_recording, windows
from data_prep.discover import DiscoveryError, discover
from data_prep.engine import entry
from data_prep.plan import Item, Params, default_window
from data_prep.pool import ordered_map
from data_prep.prep import run
from data_prep.progress import Progress
from labram_jax.channels import resolve_channels
from labram_jax.cli import main
from labram_jax.data.records import decode
from labram_jax.data.shards import shard_paths

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "eeg"
EEGMAT = ROOT / "sample_data" / "eegmat"
EEGLAB, BRAINVISION, SUBJECT00_2 = FIXTURES / "eeglab_data.set", FIXTURES / "testbva.vhdr", EEGMAT / "Subject00_2.edf"
EEGMAT_CHANNELS = ("FP1", "FP2", "F3", "F4", "F7", "F8", "T3", "T4", "C3", "C4", "T5", "T6", "P3", "P4", "O1", "O2",
                   "FZ", "CZ", "PZ", "A2")
LABELS = "recording,label,subject\nSubject00_2,1,s00\neeglab_data.set,0.5,\n"


def raw_records(shard):
    reader = ArrayRecordReader(str(shard))
    try:
        return reader.read_all()
    finally:
        reader.close()


def records(out):
    """Every window in the shards of `out`, in shard order."""
    return [decode(r) for shard in shard_paths(out) for r in raw_records(shard)]


def output_files(out):
    """{name: bytes} of a finished output folder, the manifest without its timestamp."""
    files = {p.name: p.read_bytes() for p in sorted(Path(out).iterdir()) if p.name != ".lock"}
    manifest = json.loads(files.pop("manifest.json"))
    manifest.pop("updated")
    return files, manifest


def export_edf(path, data_volts, names, sfreq):
    raw = mne.io.RawArray(np.asarray(data_volts, float), mne.create_info(list(names), sfreq, "eeg"),
                          verbose="error")
    path.parent.mkdir(parents=True, exist_ok=True)
    mne.export.export_raw(path, raw, fmt="edf", overwrite=True, verbose="error")
    return path


def xdf_chunk(tag: int, content: bytes, stream: int | None = None) -> bytes:
    body = struct.pack("<H", tag) + (b"" if stream is None else struct.pack("<I", stream)) + content
    return b"\x04" + struct.pack("<I", len(body)) + body


def write_xdf(path, data_uv, names, rate, marker_type="Markers"):
    """A minimal XDF 1.0 file (pyxdf only reads them): the file header, a marker stream and an EEG stream (float32
    µV, each channel described by label and unit), the EEG samples in chunks of 1000 with a time stamp on each
    chunk's first sample only (readers deduce the rest from the nominal rate), and both footers."""
    xml = "<?xml version='1.0'?><info>{}</info>".format
    channels = "".join(f"<channel><label>{n}</label><unit>microvolts</unit><type>EEG</type></channel>"
                       for n in names)
    eeg = xml(f"<name>amplifier</name><type>EEG</type><channel_count>{len(names)}</channel_count><nominal_srate>"
              f"{rate:g}</nominal_srate><channel_format>float32</channel_format><desc><channels>{channels}"
              "</channels></desc>")
    markers = xml(f"<name>events</name><type>{marker_type}</type><channel_count>1</channel_count><nominal_srate>0"
                  "</nominal_srate><channel_format>string</channel_format>")
    out = [b"XDF:", xdf_chunk(1, xml("<version>1.0</version>").encode()), xdf_chunk(2, markers.encode(), 1),
           xdf_chunk(2, eeg.encode(), 2), xdf_chunk(3, b"\x01\x01\x08" + struct.pack("<d", 1.0) + b"\x01\x04rest", 1)]
    samples = np.asarray(data_uv, "<f4").T
    for start in range(0, len(samples), 1000):
        block = samples[start:start + 1000]
        body = [b"\x04" + struct.pack("<I", len(block))]
        for i, row in enumerate(block):
            body += [b"\x08" + struct.pack("<d", start / rate) if i == 0 else b"\x00", row.tobytes()]
        out.append(xdf_chunk(3, b"".join(body), 2))
    for stream, count in ((1, 1), (2, len(samples))):
        out.append(xdf_chunk(6, xml(f"<sample_count>{count}</sample_count>").encode(), stream))
    path.write_bytes(b"".join(out))
    return path


def xdf_of(edf, path):
    """An XDF file holding the samples of a real EDF recording."""
    raw = read_recording(edf)
    return write_xdf(path, raw.get_data(units="uV"), raw.ch_names, raw.info["sfreq"])


def test_xdf_reads_the_eeg_stream(good, tmp_path):
    edf = read_recording(SUBJECT00_2)
    raw = read_recording(xdf_of(SUBJECT00_2, tmp_path / "Subject00_2.xdf"))
    assert raw.ch_names == edf.ch_names and raw.info["sfreq"] == 500.0 and raw.n_times == edf.n_times
    np.testing.assert_allclose(raw.get_data(), edf.get_data(), rtol=1e-6, atol=1e-12)  # volts, as MNE reads
    run([str(tmp_path / "Subject00_2.xdf")], tmp_path / "out", workers=1, progress=None)
    ours, theirs = records(tmp_path / "out"), by_recording(good[2])["Subject00_2.edf"]
    assert len(ours) == len(theirs) == 5 and ours[0].channel_names == EEGMAT_CHANNELS
    np.testing.assert_allclose(np.stack([w.signal for w in ours]), np.stack([w.signal for w in theirs]),
                               atol=1e-3)
    damaged = tmp_path / "damaged.xdf"
    damaged.write_bytes((tmp_path / "Subject00_2.xdf").read_bytes()[:300_000])  # cut inside a samples chunk
    with pytest.raises(ValueError, match=r"damaged\.xdf: cannot read as an EEG recording: damaged XDF file: "):
        read_recording(damaged)
    write_xdf(tmp_path / "two.xdf", np.zeros((2, 10)), ["Cz", "Pz"], 100.0, marker_type="eeg")
    with pytest.raises(ValueError, match=r"2 streams of type EEG .*labram reads files with one"):
        read_recording(tmp_path / "two.xdf")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """The two fixture recordings (a folder input) and one eegmat file, labelled, in 10-window shards."""
    tmp = tmp_path_factory.mktemp("good")
    (tmp / "labels.csv").write_text(LABELS)
    out = tmp / "out"
    summary = run([str(FIXTURES), str(SUBJECT00_2)], out, labels=tmp / "labels.csv", workers=1, shard_windows=10,
                  progress=None)
    return out, summary, records(out)


def by_recording(found):
    grouped = {}
    for window in found:
        grouped.setdefault(window.recording, []).append(window)
    return grouped


def test_channels_rates_and_windows(good):
    out, summary, found = good
    grouped = by_recording(found)
    assert list(grouped) == ["eeglab_data.set", "testbva.vhdr", "Subject00_2.edf"]  # sorted by (dataset, id)
    for path, dataset in ((EEGLAB, "eeg"), (BRAINVISION, "eeg"), (SUBJECT00_2, "eegmat")):
        raw = read_recording(path)
        expected = preprocess(raw)
        n, seconds = len(expected.channels.names), default_window(len(expected.channels.names))
        # Exactly 200 Hz: the length is the file's duration at 200 Hz, whatever the source rate.
        assert expected.signal.shape[1] == int(raw.n_times / raw.info["sfreq"] * 200)
        got = grouped[path.name]
        assert len(got) == expected.signal.shape[1] // (seconds * 200)
        assert [w.start for w in got] == [float(i * seconds) for i in range(len(got))]
        np.testing.assert_array_equal(np.stack([w.signal for w in got]), windows(expected.signal, seconds))
        for w in got:
            assert w.signal.shape == (n, seconds, 200) and w.signal.dtype == np.float32
            assert w.channel_names == resolve_channels(raw.ch_names, drop_unknown=True).names
            assert w.channel_rows.dtype == np.int16 and tuple(w.channel_rows) == expected.channels.rows
            assert w.dataset == dataset and w.sfreq == 200.0
    # 500 Hz eegmat: 20 channels (ECG dropped, A2-A1 kept as A2) -> 12-s windows of 240 tokens.
    eegmat = grouped["Subject00_2.edf"]
    assert eegmat[0].channel_names == EEGMAT_CHANNELS and eegmat[0].channel_rows[-1] == 96
    assert len(eegmat) == 5 and eegmat[0].signal.shape == (20, 12, 200)
    # 128 Hz EEGLAB: 30 of 32 channels (EOG dropped) -> 8-s windows; 238.3 s -> 47662 samples -> 29 windows.
    assert len(grouped["eeglab_data.set"]) == 29 and grouped["eeglab_data.set"][0].signal.shape == (30, 8, 200)
    assert len(grouped["testbva.vhdr"]) == 1 and grouped["testbva.vhdr"][0].signal.shape == (29, 8, 200)
    # µV: scalp EEG has per-channel std of tens of µV (A2-A1, between the ears, is smaller).
    std = np.concatenate([w.signal for w in eegmat], axis=1).reshape(20, -1).std(axis=1)
    assert 5 < np.median(std) < 100 and std.min() > 1 and std.max() < 100, std
    # Labels: an int by stem, a float by relative path, none without a row.
    assert {(w.recording, w.label, w.subject) for w in found} == {
        ("Subject00_2.edf", 1, "s00"), ("eeglab_data.set", 0.5, ""), ("testbva.vhdr", None, "")}
    assert isinstance(eegmat[0].label, int)


def test_manifest_and_report(good):
    out, summary, found = good
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labram_jax_version"] == labram_jax.__version__ and manifest["version"] == 1
    assert manifest["windows"] == len(found) == 35 and manifest["recordings"] == 3
    assert manifest["hours"] == pytest.approx((29 * 8 + 8 + 5 * 12) / 3600)
    assert manifest["shards"] == ["windows-00000.array_record", "windows-00001.array_record"]
    assert sum(manifest["channel_sets"].values()) == 35
    assert manifest["channel_sets"][" ".join(EEGMAT_CHANNELS)] == 5
    eeg, eegmat = manifest["datasets"]["eeg"], manifest["datasets"]["eegmat"]
    assert (eeg["recordings"], eeg["windows"], eegmat["recordings"], eegmat["windows"]) == (2, 30, 1, 5)
    assert eegmat["labels"] == {"1": 5} and eegmat["subjects"] == 1 and eeg["labels"] == {"0.5": 29}
    signal = np.concatenate([w.signal.ravel() for w in found if w.dataset == "eegmat"]).astype(np.float64)
    assert eegmat["mean_uv"] == pytest.approx(signal.mean(), abs=1e-6)
    assert eegmat["std_uv"] == pytest.approx(signal.std(), rel=1e-6)
    params = manifest["preprocessing"]
    assert (params["l_freq"], params["h_freq"], params["notch"], params["sfreq"]) == (0.1, 75.0, 50.0, 200.0)
    assert params["dtype"] == "float32" and params["window"].startswith("auto") and params["stride"] == "window"
    assert params["shard_windows"] == 10 and params["labels"].endswith("labels.csv")
    assert manifest["complete"] and manifest["num_shards"] == 1 and manifest["rejected"] == 0

    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["totals"]["written"] == 3 and report["totals"]["windows"] == 35
    entries = {Path(e["path"]).name: e for e in report["recordings"] if e["status"] != "skipped"}
    assert list(entries) == ["eeglab_data.set", "testbva.vhdr", "Subject00_2.edf"]
    skipped = [e for e in report["recordings"] if e["status"] == "skipped"]
    assert {Path(e["path"]).name: e["reason"].split(";")[0] for e in skipped} == {
        "README.md": "not a recording format read from a folder (.md)", "eeglab_data.fdt": "data file of "
        "eeglab_data.set (EEGLAB)", "testbva.dat": "data file of testbva.vhdr (BrainVision)",
        "testbva.vmrk": "marker file of testbva.vhdr (BrainVision)"}
    assert entries["Subject00_2.edf"] == {
        "path": str(SUBJECT00_2), "dataset": "eegmat", "recording": "Subject00_2.edf", "status": "written",
        "windows": 5, "hours": pytest.approx(62 / 3600, abs=1e-6), "channels_kept": list(EEGMAT_CHANNELS),
        "channels_dropped": ["ECG ECG"], "channels_flat": [], "window": 12}
    assert entries["eeglab_data.set"]["channels_dropped"] == ["EOG1", "EOG2"]
    assert entries["testbva.vhdr"]["channels_dropped"] == ["Eog", "Ekg1", "Ekg2"]
    assert summary["written"] == 3 and summary["shards"] == manifest["shards"]


def test_float16(good, tmp_path):
    run([str(SUBJECT00_2)], tmp_path, params=Params(dtype="float16"), workers=1, progress=None)
    half = records(tmp_path)
    full = by_recording(good[2])["Subject00_2.edf"]
    assert len(half) == len(full) and all(w.signal.dtype == np.float16 for w in half)
    np.testing.assert_allclose(np.stack([w.signal for w in half]).astype(np.float32),
                               np.stack([w.signal for w in full]), rtol=1e-3, atol=1e-2)
    assert json.loads((tmp_path / "manifest.json").read_text())["preprocessing"]["dtype"] == "float16"


def test_filters_remove_mains_and_drift(tmp_path):
    fs, seconds = 250.0, 200
    t = np.arange(int(fs * seconds)) / fs
    noise = np.random.default_rng(0).normal(0, 10e-6, (3, t.size))
    raw = noise + 100e-6 * np.sin(2 * np.pi * 50 * t) + 200e-6 * np.sin(2 * np.pi * 0.03 * t)
    path = export_edf(tmp_path / "mains" / "mains.edf", raw, ["Fp1", "Cz", "O2"], fs)
    run([str(path)], tmp_path / "out", workers=1, progress=None)
    found = records(tmp_path / "out")
    assert len(found) == 12 and found[0].signal.shape == (3, 16, 200)  # 3 channels -> 16-s windows
    out = np.concatenate([w.signal.reshape(3, -1) for w in found], axis=1)  # contiguous: stride = window
    covered = raw[:, :int(out.shape[1] / 200 * fs)] * 1e6

    before, after = spectrum(covered, fs), spectrum(out, 200.0)
    assert after["mains"] < 1e-4 * before["mains"]
    # The original's 0.1 Hz high-pass (MNE's 0.1 Hz transition band, -6 dB at 0.05 Hz) takes 0.03 Hz down ~15 dB.
    assert after["drift"] < 0.05 * before["drift"]
    assert after["eeg"] == pytest.approx(before["eeg"], rel=0.2)  # the EEG band passes


def spectrum(signal, rate):
    """Power at 50 Hz, below 0.1 Hz, and 5-20 Hz (µV²/Hz), channel mean, 0.01 Hz resolution."""
    f, p = welch(signal, fs=rate, nperseg=int(rate * 100))
    p = p.mean(axis=0)
    return {"mains": p[np.abs(f - 50) <= 0.5].max(), "drift": p[f < 0.1].sum(), "eeg": p[(f > 5) & (f < 20)].mean()}


def bad_corpus(root):
    """One folder with two good recordings and one of each kind of broken input."""
    bad = root / "mixed"
    bad.mkdir()
    rng = np.random.default_rng(0)
    names = ["Fp1", "Cz", "O2"]
    shutil.copy(SUBJECT00_2, bad / "good.edf")
    flat_channel = rng.normal(0, 20e-6, (3, 5000))
    flat_channel[1] = rng.normal(0, 1e-8, 5000)
    export_edf(bad / "flatchannel.edf", flat_channel, names, 250.0)
    data = SUBJECT00_2.read_bytes()
    (bad / "truncated.edf").write_bytes(data[:len(data) // 2])
    header = bytearray(data)
    header[252:256] = b"abcd"  # number of signals
    (bad / "header.edf").write_bytes(bytes(header))
    (bad / "notes.edf").write_text("subject 12, session 2: electrodes re-gelled at 10:32\n")
    (bad / "random.bdf").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    info = mne.create_info(names, 250.0, "eeg")
    mne.io.RawArray(rng.normal(0, 20e-6, (3, 125)), info, verbose="error").save(bad / "short_raw.fif",
                                                                                 verbose="error")
    nan = rng.normal(0, 20e-6, (3, 5000))
    nan[1, 1000:1010] = np.nan
    mne.io.RawArray(nan, info, verbose="error").save(bad / "nan_raw.fif", verbose="error")
    export_edf(bad / "flat.edf", rng.normal(0, 1e-8, (3, 5000)), names, 250.0)
    export_edf(bad / "absurd.edf", rng.normal(0, 0.02, (3, 5000)), names, 250.0)
    export_edf(bad / "nomap.edf", rng.normal(0, 20e-6, (3, 5000)), ["ECG", "EMG", "Resp"], 250.0)
    export_edf(bad / "tooshort.edf", rng.normal(0, 20e-6, (3, 750)), names, 250.0)
    (bad / "readme.txt").write_text("not a recording")
    (bad / "participants.json").write_text("{}")
    xdf = xdf_of(SUBJECT00_2, bad / "session.xdf")
    (bad / "cut.xdf").write_bytes(xdf.read_bytes()[:300_000])  # a copy cut short inside a samples chunk
    (bad / "junk.xdf").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (bad / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (bad / ".git").mkdir()
    (bad / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return bad


def test_bad_inputs_are_rejected_and_the_rest_written(tmp_path, capsys):
    bad = bad_corpus(tmp_path)
    out = tmp_path / "out"
    assert main(["prep", str(bad), str(FIXTURES / "testbva.dat"), "--out", str(out), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "this run: 3 written, 12 rejected, 5 skipped of 20 recordings" in captured.out
    assert captured.err.count("rejected ") == 12
    report = json.loads((out / "report.json").read_text())
    entries = {Path(e["path"]).name: e for e in report["recordings"]}
    # Every input is accounted for: each name in the folder (a hidden folder as one), and the file named alone.
    assert set(entries) == set(os.listdir(bad)) | {"testbva.dat"} and len(report["recordings"]) == 20
    expected = {
        "absurd.edf": r"^absurd amplitude: median channel std \S+ µV > 1000 µV",
        "cut.xdf": r"^cannot read as an EEG recording: damaged XDF file: found likely XDF file corruption",
        "flat.edf": r"^flat: every channel's std is below 0.5 µV",
        "header.edf": r"^cannot read as an EEG recording: invalid literal for int\(\)",
        "junk.xdf": r"^cannot read as an EEG recording: Invalid XDF file",
        "nan_raw.fif": r"^non-finite samples \(NaN/Inf\): 10 in Cz$",
        "nomap.edf": r"^no channel could be mapped to the LaBraM 10-20 vocabulary",
        "notes.edf": r"^cannot read as an EEG recording: ",
        "random.bdf": r"^cannot read as an EEG recording: ",
        "short_raw.fif": r"^0.50 s after resampling, shorter than one 200-sample patch$",
        "tooshort.edf": r"^3.0 s after preprocessing, shorter than one 16-s window$",
        "truncated.edf": r"^truncated: the header announces 62 data records \(1314956 bytes\), the file holds "
                         r"657478 bytes \(30 whole records\)$",
    }
    skipped = {
        ".DS_Store": "hidden file", ".git": "hidden folder, not searched",
        "readme.txt": "not a recording format read from a folder (.txt); name the file as an INPUT to have it tried",
        "participants.json": "not a recording format read from a folder (.json); name the file as an INPUT to have "
                             "it tried",
    }
    for name, reason in expected.items():
        assert entries[name]["status"] == "rejected" and entries[name]["windows"] == 0, name
        assert "\n" not in entries[name]["reason"]
        assert re.search(reason, entries[name]["reason"]), (name, entries[name]["reason"])
    for name, reason in skipped.items():
        assert (entries[name]["status"], entries[name]["reason"]) == ("skipped", reason), name
    assert entries["nomap.edf"]["channels_dropped"] == []  # nothing resolved, so nothing was known to drop
    assert entries["absurd.edf"]["hours"] == pytest.approx(20 / 3600, abs=1e-6)
    assert entries["testbva.dat"]["status"] == "skipped"
    assert entries["testbva.dat"]["reason"].startswith("data file of testbva.vhdr (BrainVision)")
    assert entries["good.edf"]["status"] == "written" and entries["good.edf"]["windows"] == 5
    assert entries["session.xdf"]["status"] == "written" and entries["session.xdf"]["windows"] == 5
    assert entries["session.xdf"]["channels_kept"] == list(EEGMAT_CHANNELS)
    flat = entries["flatchannel.edf"]
    assert (flat["status"], flat["channels_kept"], flat["channels_flat"]) == ("written", ["FP1", "O2"], ["CZ"])
    found = records(out)
    assert {w.recording for w in found} == {"good.edf", "flatchannel.edf", "session.xdf"}
    assert all(w.channel_names == ("FP1", "O2") for w in found if w.recording == "flatchannel.edf")
    # Hours of the rejected recordings that could be read (absurd, flat, nan, nomap, tooshort, short).
    assert report["totals"] == {"inputs": 20, "written": 3, "rejected": 12, "skipped": 5, "windows": 11,
                                "hours_written": pytest.approx((2 * 62 + 20) / 3600, abs=1e-5),
                                "hours_rejected": pytest.approx((4 * 20 + 3 + 0.5) / 3600, abs=1e-5)}
    assert json.loads((out / "manifest.json").read_text())["rejected"] == 12


def test_workers_give_identical_output(good, tmp_path):
    labels = good[0].parent / "labels.csv"  # the reference run's: the manifest records its path
    run([str(FIXTURES), str(SUBJECT00_2)], tmp_path / "out", labels=labels, workers=2, shard_windows=10,
        progress=None)
    assert output_files(tmp_path / "out") == output_files(good[0])


def test_num_shards_partition_the_recordings(good, tmp_path):
    labels = good[0].parent / "labels.csv"
    out = tmp_path / "out"
    first = run([str(FIXTURES), str(SUBJECT00_2)], out, labels=labels, workers=1, num_shards=2, shard_index=0,
                progress=None)
    assert not first["report"]["complete"] and first["report"]["shard_indices_complete"] == [0]
    # Sorted positions 0 and 2 go to index 0, position 1 to index 1.
    read = lambda report: [e["recording"] for e in report["recordings"] if e["status"] != "skipped"]  # noqa: E731
    assert read(first["report"]) == ["eeglab_data.set", "Subject00_2.edf"]
    second = run([str(FIXTURES), str(SUBJECT00_2)], out, labels=labels, workers=1, num_shards=2, shard_index=1,
                 progress=None)
    report = second["report"]
    assert report["complete"] and report["shard_indices_complete"] == [0, 1] and second["written"] == 1
    assert read(report) == ["eeglab_data.set", "testbva.vhdr", "Subject00_2.edf"] and report["totals"]["skipped"] == 4
    names = [p.name for p in shard_paths(out)]
    assert names == ["windows-00000-of-00002-00000.array_record", "windows-00001-of-00002-00000.array_record"]
    parts = [raw_records(shard) for shard in shard_paths(out)]
    assert not {decode(r).recording for r in parts[0]} & {decode(r).recording for r in parts[1]}
    whole = [r for shard in shard_paths(good[0]) for r in raw_records(shard)]
    assert sorted(parts[0] + parts[1]) == sorted(whole)  # the same records, byte for byte
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["windows"] == 35 and manifest["num_shards"] == 2 and manifest["complete"]
    assert len(manifest["preprocessing"]["commands"]) == 2


def prep_process(cwd, inputs, *flags):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "labram_jax.cli", "prep", *inputs, "--out", "out", *flags],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_and_resume_is_identical(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.edf").write_text("not EEG\n")
    inputs = [str(bad), str(FIXTURES), str(EEGMAT)]
    flags = ("--workers", "1", "--shard-windows", "4")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reference = prep_process(tmp_path / "a", inputs, *flags)
    assert reference.wait(timeout=120) == 0, reference.stderr.read()

    job = prep_process(tmp_path / "b", inputs, *flags)
    journal = tmp_path / "b" / "out" / ".progress-00000-of-00001.jsonl"
    deadline = time.monotonic() + 60
    while not (journal.exists() and journal.read_bytes().count(b"\n") >= 2):  # header + the first closed shard
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read() if job.poll() else "timeout"
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    lines = journal.read_text().splitlines()
    interrupted = sum(len(json.loads(line)["entries"]) for line in lines[1:])
    assert 0 < interrupted < 11 and not (tmp_path / "b" / "out" / "manifest.json").exists()

    (tmp_path / "b" / "out" / "windows-00001.array_record.tmp").write_bytes(b"half a shard")  # killed mid-write
    resumed = prep_process(tmp_path / "b", inputs, *flags)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"({interrupted} done before)" in out
    files, manifest = output_files(tmp_path / "b" / "out")
    assert not [name for name in files if name.endswith(".tmp")]
    assert (files, manifest) == output_files(tmp_path / "a" / "out")
    assert len(shard_paths(tmp_path / "a" / "out")) > 5 and manifest["windows"] == 29 + 1 + 4 * 15 + 4 * 5

    # Another job in the same folder is refused, and leaves the output alone.
    changed = prep_process(tmp_path / "b", inputs, *flags, "--window", "4")
    assert changed.wait(timeout=60) == 2
    assert "holds the output of another job (params differ)" in changed.stderr.read()
    assert output_files(tmp_path / "b" / "out") == (files, manifest)


def test_discover(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "rec.mff").mkdir()
    for name in ("x.edf", "sub/y.BDF", ".hidden.edf", "._x.edf", "notes.txt", "meta.json", "bv.eeg", "bv.vmrk",
                 "nk.eeg", "rec.mff/signal1.bin", "eeglab.set", "eeglab.fdt"):
        (a / name).write_bytes(b"")
    (a / "bv.vhdr").write_text("[Common Infos]\nDataFile=bv.eeg\nMarkerFile=bv.vmrk\n")
    ids = [s.recording for s in discover([str(a)]) if not s.skip]
    assert ids == ["bv.vhdr", "eeglab.set", "nk.eeg", "rec.mff", "sub/y.BDF", "x.edf"]
    assert {s.recording: s.skip for s in discover([str(a)]) if s.skip} == {
        ".hidden.edf": "hidden file", "._x.edf": "hidden file",
        "bv.eeg": "data file of bv.vhdr (BrainVision); name the .vhdr to read the recording",
        "bv.vmrk": "marker file of bv.vhdr (BrainVision); name the .vhdr to read the recording",
        "eeglab.fdt": "data file of eeglab.set (EEGLAB); name the .set to read the recording",
        "meta.json": "not a recording format read from a folder (.json); name the file as an INPUT to have it tried",
        "notes.txt": "not a recording format read from a folder (.txt); name the file as an INPUT to have it tried"}
    assert {s.dataset for s in discover([str(a)])} == {"a"}
    assert [(s.recording, s.dataset) for s in discover([str(a / "*.edf")])] == [("x.edf", "a")]
    assert [(s.recording, s.dataset) for s in discover([str(a / "s*")])] == [("sub/y.BDF", "a")]  # a folder
    (named,) = [s for s in discover([str(a), str(a / "notes.txt")]) if s.recording == "notes.txt"]
    assert not named.skip  # in the folder and named on its own: tried
    assert [s.recording for s in discover([str(a / "x.edf"), str(a)], dataset="d") if not s.skip] == [
        "bv.vhdr", "eeglab.set", "nk.eeg", "rec.mff", "sub/y.BDF", "x.edf"]
    (skipped,) = discover([str(a / "bv.eeg")])
    assert skipped.skip.startswith("data file of bv.vhdr (BrainVision)")
    assert discover([str(a / "eeglab.fdt")])[0].skip.startswith("data file of eeglab.set (EEGLAB)")
    (text,) = discover([str(a / "notes.txt")])  # named explicitly: tried, so a failure gets reported
    assert not text.skip and text.stem == "notes"
    with pytest.raises(DiscoveryError, match="no such file"):
        discover([str(a / "missing.edf")])
    with pytest.raises(DiscoveryError, match="matches nothing"):
        discover([str(a / "*.gdf")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiscoveryError, match="no EEG recordings found"):
        discover([str(tmp_path / "empty")])
    for side in ("p", "q"):
        (tmp_path / side / "a").mkdir(parents=True)
        (tmp_path / side / "a" / "x.edf").write_bytes(b"")
    with pytest.raises(DiscoveryError, match="same dataset and id"):
        discover([str(tmp_path / "p" / "a"), str(tmp_path / "q" / "a")])


def test_a_job_that_writes_nothing_exits_3(tmp_path, capsys):
    """Every input rejected (a text file renamed .edf): not exit 0, which a script takes for success; one line
    pointing at the reasons. A job that wrote some recordings keeps 0 (test_bad_inputs_...)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.edf").write_text("not an EDF at all\n" * 20)
    assert main(["prep", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err.endswith(f"labram prep: no recording written (1 rejected, 0 skipped; the reasons are in "
                        f"{tmp_path / 'out' / 'report.json'})\n"), err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["totals"]["written"] == 0 and report["totals"]["rejected"] == 1


def test_a_nan_record_duration_is_named_and_the_reports_are_strict_json(tmp_path):
    """An EDF whose header says `nan` seconds a record: rejected with the field and its value, and report.json and
    manifest.json hold no NaN or Infinity (JavaScript's JSON.parse refuses them)."""
    (tmp_path / "in").mkdir()
    shutil.copy(SUBJECT00_2, tmp_path / "in" / "good.edf")
    data = bytearray(SUBJECT00_2.read_bytes())
    data[244:252] = b"nan     "
    (tmp_path / "in" / "nan.edf").write_bytes(bytes(data))
    assert main(["prep", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--quiet"]) == 0

    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))
    report = strict((tmp_path / "out" / "report.json").read_text())
    strict((tmp_path / "out" / "manifest.json").read_text())
    rejected = [e for e in report["recordings"] if e["status"] == "rejected"]
    assert [e["reason"] for e in rejected] == ["EDF header: the duration of a data record is 'nan', not a positive "
                                               "number of seconds"], rejected


def test_usage_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["prep", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"labram prep: no EEG recordings found in {tmp_path / 'empty'}")
    assert main(["prep", str(SUBJECT00_2), "--out", str(tmp_path / "out"), "--shard-index", "1"]) == 2
    assert capsys.readouterr().err == "labram prep: --num-shards and --shard-index go together\n"
    assert main(["prep", str(SUBJECT00_2), "--out", str(tmp_path / "o"), "--num-shards", "2",
                 "--shard-index", "2"]) == 2
    assert "--shard-index must be 0..1" in capsys.readouterr().err
    (tmp_path / "labels.csv").write_text("file,label\nx,1\n")
    assert main(["prep", str(SUBJECT00_2), "--out", str(tmp_path / "o"), "--labels",
                 str(tmp_path / "labels.csv")]) == 2
    assert "needs the columns recording,label[,subject]" in capsys.readouterr().err
    for flags in (["--window", "601"], ["--dtype", "float64"], ["--stride", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["prep", str(SUBJECT00_2), "--out", str(tmp_path / "o"), *flags])
        assert exit_info.value.code == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.array_record").write_bytes(b"")
    assert main(["prep", str(SUBJECT00_2), "--out", str(foreign)]) == 2
    assert "did not write (no journal)" in capsys.readouterr().err


def test_default_window():
    assert [default_window(n) for n in (1, 16, 20, 23, 29, 32, 64, 128)] == [16, 16, 12, 11, 8, 8, 4, 2]


def test_float16_range():
    with pytest.raises(checks.Rejected, match="exceeds the float16 range"):
        checks.check_dtype_range(np.array([70000.0], np.float32), "float16")
    checks.check_dtype_range(np.array([70000.0], np.float32), "float32")


def _exit_on_three(x: int) -> int:
    if x == 3:
        os._exit(1)  # what a segfaulting reader or the OOM killer does to a worker
    return x * 10


def test_ordered_map_survives_a_dying_worker():
    results = []
    for result in ordered_map(_exit_on_three, range(7), 2, lambda x, reason: (x, reason)):
        results.append(result)
        time.sleep(0.1)  # a slow consumer: the pool breaks between two results, and later submits find it broken
    assert results[:3] == [0, 10, 20] and results[4:] == [40, 50, 60]
    assert results[3][0] == 3 and "process died" in results[3][1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line():
    terminal = _Terminal()
    bar = Progress(terminal, total=3, done=0, job="build")
    bar.resumed(1)  # one done by an earlier run: not counted in this run's pace
    item = Item("x.edf", "x.edf", "d")
    bar.update(entry(item, "written", hours=1.5, windows=3))
    assert re.search(r"build 2/3 recordings \| 1.50 h of EEG written \| \S+ h/min \| 0 rejected \| ETA \d+m\d\ds$",
                     bar.line())
    bar.update(entry(item, "rejected", "flat"))
    bar.close()
    text = terminal.getvalue()
    assert "\r\033[K" in text and "rejected x.edf: flat" in text
    assert "build 3/3 recordings | 1.50 h of EEG written |" in text and text.endswith("1 rejected | ETA 0m00s\n")
    plain = io.StringIO()
    bar = Progress(plain, total=1, done=0)
    assert bar.line().endswith("ETA ?")  # nothing done yet in this run
    bar.update(entry(item, "written", hours=1.0, windows=3))
    assert plain.getvalue() == ""  # not a terminal: a plain line every 30 s, none for a fast job
    quiet = Progress(None, total=1, done=0)
    quiet.update(entry(item, "rejected", "flat"))  # --quiet: nothing is written anywhere
    quiet.close()


def test_quiet_prints_no_progress(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "notes.edf").write_text("not EEG\n")
    assert main(["prep", str(tmp_path / "bad"), "--out", str(tmp_path / "loud"), "--workers", "1"]) == 3
    assert "prep 1/1 recordings" in capsys.readouterr().err
    assert main(["prep", str(tmp_path / "bad"), "--out", str(tmp_path / "quiet"), "--workers", "1", "--quiet"]) == 3
    err = capsys.readouterr().err  # no progress; the outcome (nothing written) still says why it is not 0
    assert err.count("\n") == 1 and err.startswith("labram prep: no recording written")

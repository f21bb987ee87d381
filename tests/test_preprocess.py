"""data_prep on the bundled real sample (PhysioNet eegmat, 500 Hz EDF) and on small synthetic recordings."""
from pathlib import Path

import mne
import numpy as np
import pytest
from scipy.signal import welch

from data_prep import Recording, preprocess, read_recording, to_model_input, windows

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "eegmat" / "Subject00_1.edf"
SCALP = ("FP1", "FP2", "F3", "F4", "F7", "F8", "T3", "T4", "C3", "C4", "T5", "T6", "P3", "P4", "O1", "O2",
         "FZ", "CZ", "PZ")


@pytest.fixture(scope="module")
def raw() -> mne.io.BaseRaw:
    return read_recording(SAMPLE)


@pytest.fixture(scope="module")
def recording(raw) -> Recording:
    return preprocess(raw)


def synthetic(names, sfreq, seconds, seed=0):
    info = mne.create_info(list(names), sfreq, "eeg")
    data = np.random.default_rng(seed).normal(0, 20e-6, (len(names), int(seconds * sfreq)))
    return mne.io.RawArray(data, info, verbose="error")


def test_channels(raw, recording):
    # EEG A2-A1 is kept as A2 (row 96), as the resolver and the original's TUH name rule both map it.
    assert recording.channels.names == SCALP + ("A2",)
    assert recording.channels.rows[-1] == 96
    assert recording.channels.dropped == ("ECG ECG",)
    assert recording.signal.shape[0] == 20 and recording.signal.dtype == np.float32
    assert recording.source == str(SAMPLE)
    assert len(raw.ch_names) == 21 and raw.info["sfreq"] == 500  # the caller's raw is untouched


def test_rate_length_and_amplitude(raw, recording):
    assert recording.sfreq == 200.0
    assert recording.signal.shape[1] == round(raw.n_times / raw.info["sfreq"] * 200) == 36400
    assert recording.duration == pytest.approx(182.0)
    std = recording.signal.std(axis=1)
    assert np.all((std > 1) & (std < 200)), std  # µV scalp EEG, not V and not mV
    assert np.abs(recording.signal.mean(axis=1)).max() < 5  # the 0.1 Hz high-pass removed the offsets


def line_ratio(signal, fs):
    """Power at 50 Hz over power at 2-5 Hz on either side of it."""
    f, p = welch(signal, fs=fs, nperseg=int(2 * fs))
    p = p.mean(axis=0)
    return p[np.abs(f - 50) <= 0.5].mean() / p[(np.abs(f - 50) >= 2) & (np.abs(f - 50) <= 5)].mean()


def test_notch_removes_mains(raw):
    # The file was notch-filtered at acquisition, so a 30 µV mains line is put back to have something to remove.
    noisy = raw.copy()
    noisy.apply_function(lambda x: x + 30e-6 * np.sin(2 * np.pi * 50 * noisy.times), picks="all")
    before = line_ratio(noisy.get_data(picks=list(range(20)), units="uV"), 500)
    after = line_ratio(preprocess(noisy).signal, 200)
    assert before > 1e4
    assert after < before * 1e-3 and after < 10


def test_low_rate_skips_lowpass_and_notch():
    rec = preprocess(synthetic(["Fp1", "Cz", "O2"], 100.0, 20), source="slow")  # Nyquist 50 Hz
    assert rec.signal.shape == (3, 4000) and rec.channels.names == ("FP1", "CZ", "O2")


def test_errors_name_the_source(tmp_path):
    with pytest.raises(ValueError, match=r"^nomap: .*no channel could be mapped"):
        preprocess(synthetic(["ECG", "EMG"], 250.0, 5), source="nomap")
    with pytest.raises(ValueError, match=r"^short: .*shorter than one 200-sample patch"):
        preprocess(synthetic(["Cz"], 250.0, 0.5), source="short")
    text = tmp_path / "notes.txt"
    text.write_text("not EEG\n")
    fake = tmp_path / "fake.edf"
    fake.write_bytes(b"0" * 300)
    for path in (text, fake, tmp_path / "missing.edf"):
        with pytest.raises(ValueError, match=rf"^{path}: cannot read as an EEG recording: ") as info:
            read_recording(path)
        assert "\n" not in str(info.value)


def test_windows(recording):
    w = windows(recording.signal, 4)
    assert w.shape == (45, 20, 4, 200) and w.dtype == np.float32
    np.testing.assert_array_equal(w[3, 5].reshape(-1), recording.signal[5, 3 * 800:4 * 800])
    strided = windows(recording.signal, 10, stride=2)
    assert strided.shape == (87, 20, 10, 200)
    np.testing.assert_array_equal(strided[1, 0, 0], recording.signal[0, 400:600])
    assert windows(recording.signal[:, :700], 4).shape == (0, 20, 4, 200)
    for bad in (0, 601, 2.5):
        with pytest.raises(ValueError, match="seconds"):
            windows(recording.signal, bad)
    with pytest.raises(ValueError, match="stride"):
        windows(recording.signal, 4, stride=0)


def test_model_input(recording):
    w = windows(recording.signal, 4)
    x = to_model_input(w)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x * 100, w, rtol=1e-6)

"""Per-recording preprocessing as the original's dataset makers do it (make_TUAB.py, make_h5dataset_for_pretrain.py).

Pick the channels LaBraM has a pos_embed row for, band-pass 0.1-75 Hz and notch 50 Hz with MNE's default FIR
filters, resample to 200 Hz, take the signal in µV; windows are then cut into 1-s patches and divided by 100.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import mne
import numpy as np

from data_prep.xdf import read_xdf
from labram_jax.channels import ResolvedChannels, resolve_channels
from labram_jax.configs import MAX_WINDOW_S, PATCH_SIZE
from labram_jax.errors import one_line


def read_recording(path: str | os.PathLike) -> mne.io.BaseRaw:
    """Any recording MNE reads (EDF, BDF, BrainVision, EEGLAB, FIF, ...) or an XDF file's EEG stream, loaded into
    memory, in volts."""
    try:
        if os.fspath(path).lower().endswith((".xdf", ".xdfz")):
            return read_xdf(path)
        return mne.io.read_raw(path, preload=True, verbose="error")
    except Exception as error:  # MNE raises many types (OSError, ValueError, RuntimeError, struct.error, ...)
        raise ValueError(f"{os.fspath(path)}: cannot read as an EEG recording: {one_line(error)}") from None


@dataclass(frozen=True)
class Recording:
    signal: np.ndarray  # float32 [N, S], µV
    channels: ResolvedChannels  # row n of signal is channels.names[n]
    source: str
    sfreq: float = 200.0

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.signal.shape[1] / self.sfreq


def _notch_fits(freq: float, nyquist: float) -> bool:
    # MNE's FIR notch stops freq +- freq/400 with 0.5 Hz transitions, and refuses a band edge at or above Nyquist.
    return freq * (1 + 1 / 400) + 0.5 < nyquist


def preprocess(raw: mne.io.BaseRaw, *, notch: float | None = 50.0, l_freq: float | None = 0.1,
               h_freq: float | None = 75.0, sfreq: float = 200.0, source: str = "") -> Recording:
    """The original's preprocessing of one recording; `raw` itself is left unchanged.

    Channels are those `resolve_channels(..., drop_unknown=True)` maps, in file order. A recording whose Nyquist
    frequency is at or below h_freq (a 128 Hz file has 64 Hz) is only high-passed, since MNE refuses such a
    low-pass and there is nothing above Nyquist to remove; likewise the notch is skipped when its stop band would
    reach Nyquist. Resampling applies its own anti-aliasing low-pass.
    """
    source = source or next((os.fspath(f) for f in raw.filenames if f), "recording")
    try:
        channels = resolve_channels(raw.ch_names, drop_unknown=True)
    except ValueError as error:
        raise ValueError(f"{source}: {one_line(error)}") from None
    names = [raw.ch_names[i] for i in channels.kept]
    raw = raw.copy().pick(names).load_data(verbose="error")
    # Every kept channel is a scalp electrode by name; typing them all EEG makes filtering and the µV
    # conversion cover them even where a reader typed some as misc.
    raw.set_channel_types({name: "eeg" for name in names}, verbose="error")
    nyquist = raw.info["sfreq"] / 2
    if h_freq is not None and h_freq >= nyquist:
        h_freq = None
    if l_freq is not None or h_freq is not None:
        raw.filter(l_freq, h_freq, picks="all", verbose="error")
    if notch is not None and _notch_fits(notch, nyquist):
        raw.notch_filter(notch, picks="all", verbose="error")
    raw.resample(sfreq, verbose="error")
    signal = raw.get_data(units="uV").astype(np.float32)
    if signal.shape[1] < PATCH_SIZE:
        raise ValueError(f"{source}: {signal.shape[1] / sfreq:.2f} s after resampling, shorter than one "
                         f"{PATCH_SIZE}-sample patch")
    return Recording(signal=signal, channels=channels, source=source, sfreq=float(sfreq))


def windows(signal: np.ndarray, seconds: int, stride: int | None = None) -> np.ndarray:
    """float32 [W, N, seconds, 200]: windows of `seconds` 1-s patches every `stride` seconds (default: no overlap),
    the tail that does not fill a window dropped."""
    if not (isinstance(seconds, (int, np.integer)) and 1 <= seconds <= MAX_WINDOW_S):
        raise ValueError(f"seconds must be an integer from 1 to {MAX_WINDOW_S}, got {seconds!r}")
    stride = seconds if stride is None else stride
    if not (isinstance(stride, (int, np.integer)) and stride >= 1):
        raise ValueError(f"stride must be a positive integer number of seconds, got {stride!r}")
    signal = np.asarray(signal)
    if signal.ndim != 2:
        raise ValueError(f"signal must be [channels, samples], got shape {signal.shape}")
    n, length = signal.shape[0], seconds * PATCH_SIZE
    if signal.shape[1] < length:
        return np.zeros((0, n, seconds, PATCH_SIZE), np.float32)
    views = np.lib.stride_tricks.sliding_window_view(signal, length, axis=1)[:, ::stride * PATCH_SIZE]
    return views.transpose(1, 0, 2).reshape(-1, n, seconds, PATCH_SIZE).astype(np.float32)


def to_model_input(windows: np.ndarray) -> np.ndarray:
    """µV -> the original's model unit, 0.1 mV (its training loops divide by 100)."""
    return (np.asarray(windows, np.float32) / 100).astype(np.float32)

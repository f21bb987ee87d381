"""Signal-quality checks that reject a recording (or drop a channel) before its windows reach a shard.

The thresholds are deliberately loose: they catch broken files and wrong units, not noisy EEG, which LaBraM's
pretraining corpus contains plenty of and which the original did not filter.

- Non-finite samples (NaN/Inf) in a kept channel reject the recording: a filter would smear them over the whole
  channel, and the loss would turn NaN on the first batch holding one.
- A flat channel (std < `FLAT_UV` after the 0.1 Hz high-pass) is an unplugged or saturated electrode; it is
  dropped and reported, and the rest of the recording is kept, since the other electrodes are usually fine and a
  constant channel only teaches the model to predict a constant. A recording whose channels are all flat is
  rejected: nothing was recorded, or the file stores volts but says microvolts, so the values are a million times
  too small.
- Absurd amplitude: a median channel std above `ABSURD_UV` is not scalp EEG (tens of µV) even with heavy
  artefacts; it is the opposite unit error (µV stored as V, read x 1e6) or garbage scaling.
- float16 output: a value beyond float16's range would be stored as inf.
- A truncated EDF/BDF (a copy or download cut short) is rejected: MNE reads what is there and pads nothing, so
  without this check a partial recording would pass as a shorter one.
"""
from __future__ import annotations

import dataclasses
import math
import os

import mne
import numpy as np

from data_prep.preprocess import Recording
from labram_jax.channels import ResolvedChannels

FLAT_UV = 0.5
ABSURD_UV = 1000.0
FLOAT16_MAX = float(np.finfo(np.float16).max)


class Rejected(ValueError):
    """A recording that must not be written; the message is the one-line reason for the report."""


def check_edf_complete(path: str | os.PathLike) -> None:
    """Reject an EDF/BDF file shorter than its header says, or whose record duration is not a positive number. A
    header that cannot be parsed is left to the reader, which rejects it with its own message; a record count of
    -1 (a recording never closed) is legal."""
    with open(path, "rb") as f:
        head = f.read(256)
        try:
            header_bytes, records, signals = int(head[184:192]), int(head[236:244]), int(head[252:256])
            # Signal headers are stored field by field; samples per record follow label, transducer, unit,
            # physical and digital ranges and prefiltering (216 bytes per signal).
            f.seek(256 + signals * 216)
            samples = [int(f.read(8)) for _ in range(signals)]
        except ValueError:
            return
    # A header that parses, whose record duration does not: every time and the hours in the reports scale with it.
    duration = head[244:252].decode("ascii", "replace").strip()
    try:
        seconds = float(duration)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise Rejected(f"EDF header: the duration of a data record is {duration!r}, not a positive number of "
                       "seconds")
    if records < 0:
        return
    bytes_per_sample = 3 if head[:8] == b"\xffBIOSEMI" else 2
    expected = header_bytes + records * sum(samples) * bytes_per_sample
    size = os.path.getsize(path)
    if size < expected:
        record_bytes = sum(samples) * bytes_per_sample
        whole = (size - header_bytes) // record_bytes if record_bytes else 0
        raise Rejected(f"truncated: the header announces {records} data records ({expected} bytes), the file "
                       f"holds {size} bytes ({max(whole, 0)} whole records)")


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_finite(raw: mne.io.BaseRaw, picks: tuple[int, ...]) -> None:
    """Reject NaN or Inf samples in the channels that will be kept; one channel at a time to bound the copy."""
    bad = {}
    for pick in picks:
        count = int(np.count_nonzero(~np.isfinite(raw.get_data(picks=[pick]))))
        if count:
            bad[raw.ch_names[pick]] = count
    if bad:
        raise Rejected(f"non-finite samples (NaN/Inf): {sum(bad.values())} in {_names(list(bad))}")


def drop_flat(recording: Recording) -> tuple[Recording, tuple[str, ...]]:
    """The recording without its flat channels, and their names; Rejected when every channel is flat."""
    std = recording.signal.std(axis=1, dtype=np.float64)
    flat = std < FLAT_UV
    if flat.all():
        raise Rejected(f"flat: every channel's std is below {FLAT_UV} µV (largest {std.max():.3g} µV); nothing "
                       "recorded, or volts stored as microvolts")
    if not flat.any():
        return recording, ()
    keep = np.flatnonzero(~flat)
    channels = recording.channels
    kept_channels = ResolvedChannels(names=tuple(channels.names[i] for i in keep),
                                     rows=tuple(channels.rows[i] for i in keep),
                                     kept=tuple(channels.kept[i] for i in keep), dropped=channels.dropped)
    flat_names = tuple(channels.names[i] for i in np.flatnonzero(flat))
    return dataclasses.replace(recording, signal=recording.signal[keep], channels=kept_channels), flat_names


def check_amplitude(recording: Recording) -> None:
    median = float(np.median(recording.signal.std(axis=1, dtype=np.float64)))
    if median > ABSURD_UV:
        raise Rejected(f"absurd amplitude: median channel std {median:.3g} µV > {ABSURD_UV:g} µV (not scalp EEG: "
                       "microvolts stored as volts, or a wrong scale in the header)")


def check_dtype_range(windows: np.ndarray, dtype: str) -> None:
    if dtype == "float16" and windows.size:
        peak = float(np.abs(windows).max())
        if peak > FLOAT16_MAX:
            raise Rejected(f"amplitude {peak:.3g} µV exceeds the float16 range ({FLOAT16_MAX:g}); use --dtype "
                           "float32")

"""Lab Streaming Layer recordings (.xdf) as MNE raws, read with pyxdf.

An XDF file holds any number of streams (EEG, markers, eye tracking, audio, ...). The one stream of type EEG
(case-insensitive) is read, with its channel labels and its nominal rate; a file with none, or with several (they
need not share a rate or a clock), is refused with the reason. Samples are converted to volts, what MNE's other
readers return, from each channel's `unit` (XDF's convention for EEG is microvolts, assumed where no unit is given).

pyxdf reads a damaged file as far as it can and only logs the damage; here a logged error refuses the file, since a
recording cut short would otherwise pass as a shorter one.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import mne
import numpy as np

# Unit strings seen in LSL apps (BrainVision, OpenBCI, g.tec, Muse, the liblsl examples) -> volts per unit.
_VOLTS = {"v": 1.0, "volt": 1.0, "volts": 1.0, "mv": 1e-3, "millivolt": 1e-3, "millivolts": 1e-3,
          "uv": 1e-6, "µv": 1e-6, "μv": 1e-6, "microvolt": 1e-6, "microvolts": 1e-6, "nv": 1e-9, "nanovolts": 1e-9}
_ASSUMED_UNIT = "microvolts"


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _first(info: dict[str, Any], key: str, default: str = "") -> str:
    value = info.get(key)
    return (value[0] if value else default) or default


def _channels(info: dict[str, Any], count: int) -> list[tuple[str, str]]:
    """(label, unit) per channel; labels default to 1..N as LSL apps without a description write nothing."""
    try:
        described = info["desc"][0]["channels"][0]["channel"]
    except (KeyError, IndexError, TypeError):
        described = []
    if described and len(described) != count:
        raise ValueError(f"the EEG stream describes {len(described)} channels but holds {count}")
    if not described:
        return [(str(i + 1), _ASSUMED_UNIT) for i in range(count)]
    return [(_first(c, "label", str(i + 1)), _first(c, "unit", _ASSUMED_UNIT)) for i, c in enumerate(described)]


def read_xdf(path: str | os.PathLike) -> mne.io.RawArray:
    """The EEG stream of an XDF file as a RawArray in volts; ValueError with the reason otherwise."""
    import pyxdf

    path = os.fspath(path)
    errors = _Errors()
    logger = logging.getLogger("pyxdf.pyxdf")
    logger.addHandler(errors)
    try:
        infos = pyxdf.resolve_streams(path)
        eeg = [i for i in infos if (i.get("type") or "").lower() == "eeg"]
        if len(eeg) != 1:
            found = ", ".join(f"{i.get('name')!r} ({i.get('type')})" for i in infos) or "none"
            raise ValueError(f"{len(eeg)} streams of type EEG (streams: {found}); labram reads files with one")
        streams, _ = pyxdf.load_xdf(path, select_streams=[eeg[0]["stream_id"]], synchronize_clocks=False,
                                    dejitter_timestamps=False)
    finally:
        logger.removeHandler(errors)
    if errors.messages:
        raise ValueError(f"damaged XDF file: {errors.messages[0]}")
    (stream,) = streams
    info = stream["info"]
    rate = float(_first(info, "nominal_srate", "0"))
    if rate <= 0:
        raise ValueError(f"the EEG stream {_first(info, 'name')!r} has no nominal rate (irregular sampling)")
    samples = np.asarray(stream["time_series"], np.float64)  # [samples, channels]
    channels = _channels(info, samples.shape[1])
    scale = []
    for label, unit in channels:
        if unit.strip().lower() not in _VOLTS:
            raise ValueError(f"channel {label!r} has unit {unit!r}, not a voltage unit (V, mV, uV, microvolts)")
        scale.append(_VOLTS[unit.strip().lower()])
    data = samples.T * np.asarray(scale)[:, None]
    return mne.io.RawArray(data, mne.create_info([label for label, _ in channels], rate, "eeg"), verbose="error")

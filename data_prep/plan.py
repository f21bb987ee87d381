"""A plan: what the corpus engine (data_prep.engine) is to write, as plain data.

Every source of shards ends here: `labram prep` turns its inputs (files, folders, a labels CSV) into a plan, and
each dataset builder (data_prep.builders) turns its corpus into one, with its labels, subjects, splits and window
rule. The engine runs any plan the same way: crash-safe pool, journal and resume, quality checks, atomic shards,
manifest.json and report.json. A plan does no I/O of its own.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import mne

from data_prep.preprocess import Recording, read_recording
from labram_jax.configs import MAX_PATCHES, MAX_WINDOW_S
from labram_jax.errors import UserError

MAX_TOKENS = 256  # the original picks each pretraining dataset's window so that channels x seconds <= 256
SPLITS = ("train", "val", "test")


class PrepError(UserError):
    """A usage error: bad flags, no inputs, or an output folder that holds another job."""


@dataclasses.dataclass(frozen=True)
class Params:
    """Everything about preprocessing and fixed windows that decides the content of the windows."""

    window: int | None = None  # seconds; None: default_window(channels) per recording
    stride: int | None = None  # seconds; None: the window
    dtype: str = "float32"
    notch: float | None = 50.0
    l_freq: float = 0.1
    h_freq: float = 75.0
    sfreq: float = 200.0

    def __post_init__(self) -> None:
        if self.window is not None and not 1 <= self.window <= MAX_WINDOW_S:
            raise PrepError(f"--window must be 1..{MAX_WINDOW_S} seconds, got {self.window}")
        if self.stride is not None and self.stride < 1:
            raise PrepError(f"--stride must be at least 1 second, got {self.stride}")
        if self.dtype not in ("float32", "float16"):
            raise PrepError(f"--dtype must be float32 or float16, got {self.dtype}")
        if self.notch is not None and self.notch <= 0:
            raise PrepError(f"--notch must be a positive frequency, got {self.notch}")

    def to_json(self) -> dict[str, Any]:
        return {"l_freq": self.l_freq, "h_freq": self.h_freq, "notch": self.notch, "sfreq": self.sfreq,
                "window": self.window or f"auto: {MAX_TOKENS} // channels, 1..{MAX_PATCHES}",
                "stride": self.stride or "window", "dtype": self.dtype, "unit": "uV",
                "filters": "MNE FIR (firwin, zero-phase): band-pass l_freq-h_freq (high-pass only when h_freq "
                           ">= Nyquist), notch at `notch` Hz; resampled to sfreq"}


def default_window(channels: int) -> int:
    """The longest window of whole seconds with channels x seconds <= 256 tokens, within 1..16 s."""
    return max(1, min(MAX_PATCHES, MAX_TOKENS // max(channels, 1)))


@dataclasses.dataclass(frozen=True)
class Item:
    """One input: a recording to read, or a file the report lists with why it is not read."""

    path: str  # for reading and for the report
    recording: str  # its id in the records: a path relative to the input or corpus root
    dataset: str
    label: int | float | None = None  # per recording; an events rule labels each window instead
    subject: str = ""
    split: str = ""  # "" writes into the output folder itself (labram prep), else out/<split>/ (a build)
    skip: str = ""  # listed as skipped with this reason, never read
    reject: str = ""  # listed as rejected with this reason, never read (a builder knows it cannot be used)
    # BIDS entities (data_prep.bids), also in the recording id, which the journal's fingerprint covers
    session: str = ""
    task: str = ""
    run: str = ""


@dataclasses.dataclass(frozen=True)
class Events:
    """What an events rule returns for one recording: windows [W, N, A, 200] with their starts (s) and labels,
    and one-line notes on events left out."""

    windows: Any
    starts: tuple[float, ...]
    labels: tuple[int | float | None, ...]
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Rule:
    """How every recording of a plan becomes windows. The callables are module-level functions (workers receive
    them pickled) and are named in the journal, so a changed rule is not mixed into an earlier job's output."""

    params: Params = Params()
    # Vocabulary names the windows hold, in this order: a recording without one of them, or with one of them
    # flat, is rejected. None: every channel LaBraM knows, in file order, flat ones dropped.
    channels: tuple[str, ...] | None = None
    reader: Callable[[str], mne.io.BaseRaw] = read_recording  # path -> raw; ValueError(reason) refuses the file
    # (preprocessed recording, item) -> Events: windows around events instead of fixed windows (TUEV).
    events: Callable[[Recording, Item], Events] | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.params.to_json(), "channels": list(self.channels) if self.channels else "all known",
                "reader": _name(self.reader), "events": _name(self.events) if self.events else None}


def _name(fn: Callable) -> str:
    if isinstance(fn, functools.partial):
        return f"{_name(fn.func)}({', '.join(f'{k}={v!r}' for k, v in sorted(fn.keywords.items()))})"
    return f"{fn.__module__}.{fn.__qualname__}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Items and the rule for all of them; a build also names itself, its source and its split rule, and gives
    the parameters its manifests record."""

    items: tuple[Item, ...]
    rule: Rule = Rule()
    dataset: str = ""
    source: str = ""
    split_rule: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def of_split(self, split: str) -> list[Item]:
        return [item for item in self.items if item.split == split]

"""`labram prep`: EEG recordings -> ArrayRecord shards of LaBraM windows, with a manifest and a report.

Layout of the output folder DIR:

- `<prefix>-NNNNN.array_record` (or `<prefix>-IIIII-of-KKKKK-NNNNN.array_record` with `--num-shards K`): windows
  (`labram_jax.data.records.Window`) of consecutive recordings in the sorted input order. A shard is closed at the
  first recording boundary where it holds at least `--shard-windows` windows, counting from the previous shard of
  the same index, so its contents depend only on the inputs and the flags.
- `.progress-IIIII-of-KKKKK.jsonl`: the journal of shard index I. Its first line describes the job (parameters and
  a fingerprint of the sorted recordings with their labels); after each shard is renamed into place one line gives
  the shard's name, the report entries of its recordings (rejected ones in between included) and its per-dataset
  statistics. Trailing recordings that produced no windows get a last line without a shard.
- `manifest.json` and `report.json`, rebuilt at the end of every run from all journals in DIR, so whichever index
  finishes last leaves a manifest and report that cover everything finished. The report lists every input with
  `status` written / rejected (with a one-line `reason`) / skipped (a BrainVision or EEGLAB data file named on its
  own), `windows`, `hours` (the recording's length as read, also for rejected ones where it could be read),
  `channels_kept` (vocabulary names), `channels_dropped` (file names with no pos_embed row), `channels_flat`
  (dropped by data_prep.checks) and, when written, `window` (seconds). The manifest's hours count windows.

Resume: a rerun deletes its index's `*.tmp` shards, replays the journal and continues with the first recording the
journal does not list; the batch rule above then recreates the same shards under the same names, so the output of
an interrupted and resumed job is identical, byte for byte, to that of an uninterrupted one. A rerun with other
parameters or other recordings is refused rather than mixed in.

Stopping: on SIGTERM or SIGINT the job abandons the shard it is writing at the next recording boundary (its
`.tmp` file goes at the rerun), closes the journal and raises labram_jax.preemption.Preempted (`labram prep`
exits with status 75); the rerun resumes as after a crash, so at most one shard's recordings are done again.

Scale-out: with `--num-shards K --shard-index I` this index takes the recordings at positions p of the sorted list
with p % K == I. Positions, not hashes of names, give every index the same number of recordings (to one), and any
scheduler can run the K indices independently, one after the other or all at once into one DIR.

Memory: workers read and preprocess one recording each, at most 2 x workers recordings are in flight, and the
writer streams each recording's windows into the open shard, so the job holds a few recordings, never a shard.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

import numpy as np

from data_prep import checks
from data_prep.discover import Source, discover
from data_prep.preprocess import preprocess, read_recording, windows
from labram_jax.channels import resolve_channels
from labram_jax.configs import MAX_PATCHES
from labram_jax.data.records import Window
from labram_jax.data.shards import SHARD_SUFFIX, DatasetStats, write_manifest, write_shard
from labram_jax.errors import UserError
from labram_jax.files import write_json
from labram_jax.preemption import Preempted, StopSignals, ignore_in_worker

# A LaBraM window of up to 256 tokens is <= 205 KB in float32, so 2000 windows make shards of at most ~400 MB
# (~200 MB in float16): large enough that a 25,000-hour corpus fits in a few thousand files (one open handle
# each in the loader), small enough that a crash loses at most a few minutes of work and that cloud storage
# copies them in one piece.
DEFAULT_SHARD_WINDOWS = 2000
MAX_TOKENS = 256  # the original picks each pretraining dataset's window so that channels x seconds <= 256
REPORT = "report.json"
JOURNAL_FORMAT = "labram-jax/prep-journal"
_PLAIN_PROGRESS_EVERY_S = 30.0
# MNE imports its readers and filters on first use, ~0.5 s that every worker would otherwise pay again.
_WORKER_PRELOAD = ("scipy.signal", "mne.filter", "mne.io")

T = TypeVar("T")
R = TypeVar("R")
_END = object()


class PrepError(UserError):
    """A usage error: bad flags, no inputs, or an output folder that holds another job."""


@dataclasses.dataclass(frozen=True)
class Params:
    """Everything that decides the content of the windows."""

    window: int | None = None  # seconds; None: default_window(channels) per recording
    stride: int | None = None  # seconds; None: the window
    dtype: str = "float32"
    notch: float | None = 50.0
    l_freq: float = 0.1
    h_freq: float = 75.0
    sfreq: float = 200.0

    def __post_init__(self) -> None:
        if self.window is not None and not 1 <= self.window <= MAX_PATCHES:
            raise PrepError(f"--window must be 1..{MAX_PATCHES} seconds (rows of time_embed), got {self.window}")
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
class Task:
    source: Source
    params: Params
    label: int | float | None = None
    subject: str = ""


@dataclasses.dataclass
class Prepared:
    """A worker's result for one recording: its report entry and, when written, its windows."""

    task: Task
    entry: dict[str, Any]
    windows: np.ndarray | None = None  # [W, N, A, 200] in the output dtype
    channel_names: tuple[str, ...] = ()
    channel_rows: tuple[int, ...] = ()
    stride: int = 0
    stats: DatasetStats | None = None
    seconds: float = 0.0  # worker time; benchmarks only, never journaled since it differs between runs

    def records(self) -> Iterator[Window]:
        source, rows = self.task.source, np.asarray(self.channel_rows, np.int16)
        for i, signal in enumerate(self.windows if self.windows is not None else ()):
            yield Window(signal=signal, channel_rows=rows, channel_names=self.channel_names,
                         recording=source.recording, start=float(i * self.stride), dataset=source.dataset,
                         subject=self.task.subject, label=self.task.label, sfreq=self.task.params.sfreq)


def _entry(source: Source, status: str, reason: str = "", **fields: Any) -> dict[str, Any]:
    entry = {"path": source.path, "dataset": source.dataset, "recording": source.recording, "status": status}
    if reason:
        # Readers quote garbage header bytes in their messages; the report is read by people and by json.
        entry["reason"] = "".join(c if c.isprintable() else "?" for c in " ".join(reason.split()))
    entry.update({"windows": 0, "hours": 0.0, "channels_kept": [], "channels_dropped": [], "channels_flat": []})
    entry.update(fields)
    return entry


def _reason(error: Exception, source: Source) -> str:
    text = " ".join(str(error).split())
    prefix = f"{source.path}: "
    # read_recording and preprocess name the file; the report entry already does.
    text = text[len(prefix):] if text.startswith(prefix) else text
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


def prepare(task: Task) -> Prepared:
    """Read, preprocess, check and window one recording; never raises, a failure is a rejected entry."""
    tic = time.perf_counter()
    source, params = task.source, task.params
    if source.skip:
        return Prepared(task, _entry(source, "skipped", source.skip))
    known: dict[str, Any] = {}
    try:
        if source.path.lower().endswith((".edf", ".bdf")):
            checks.check_edf_complete(source.path)
        raw = read_recording(source.path)
        known["hours"] = round(raw.n_times / raw.info["sfreq"] / 3600, 6)
        channels = resolve_channels(raw.ch_names, drop_unknown=True)
        known["channels_dropped"] = list(channels.dropped)
        checks.check_finite(raw, channels.kept)
        recording = preprocess(raw, notch=params.notch, l_freq=params.l_freq, h_freq=params.h_freq,
                               sfreq=params.sfreq, source=source.path)
        del raw  # the largest object of the job: the file's samples at their own rate, often float64
        recording, flat = checks.drop_flat(recording)
        known.update(channels_kept=list(recording.channels.names), channels_flat=list(flat))
        checks.check_amplitude(recording)
        window = params.window or default_window(len(recording.channels.names))
        stride = params.stride or window
        cut = windows(recording.signal, window, stride)
        if not len(cut):
            raise checks.Rejected(f"{recording.duration:.1f} s after preprocessing, shorter than one {window}-s "
                                  "window")
        checks.check_dtype_range(cut, params.dtype)
    except Exception as error:  # any failure of one file (including reader bugs) must not stop the job
        return Prepared(task, _entry(source, "rejected", _reason(error, source), **known),
                        seconds=time.perf_counter() - tic)
    prepared = Prepared(task, _entry(source, "written", windows=len(cut), window=window, **known),
                        windows=cut.astype(params.dtype, copy=False), channel_names=recording.channels.names,
                        channel_rows=recording.channels.rows, stride=stride)
    stats = DatasetStats()
    for record in prepared.records():
        stats.add(record)
    prepared.stats = stats
    prepared.seconds = time.perf_counter() - tic
    return prepared


def _follow(parent: int) -> None:
    """Worker initializer: leave SIGTERM and SIGINT to the job process, and exit when it is gone. A pool worker
    blocks on its task queue forever once its parent is killed (it holds both ends of the queue's pipe, so it
    never sees EOF), and through it keeps the fork server alive too."""
    ignore_in_worker()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent, 0)
            except (ProcessLookupError, PermissionError):  # gone, or its pid already reused by someone else
                os._exit(1)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()


def _pool(workers: int, context: Any) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_follow, initargs=(os.getpid(),))


def _result(future: Future, poll: Callable[[], None]) -> Any:
    """future.result(), calling poll() about four times a second while it waits."""
    while True:
        try:
            return future.result(timeout=0.25)
        except TimeoutError:
            poll()


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, on_crash: Callable[[T, str], R],
                preload: tuple[str, ...] = (), poll: Callable[[], None] = lambda: None) -> Iterator[R]:
    """fn over items in `workers` processes, yielded in input order, with at most 2 x workers items in flight.

    `poll` is called before each item is submitted and while a result is awaited, and may raise to abandon the
    work (a stop signal); the workers still finish the items they hold before they exit.

    A worker process that dies (a segfault in a file reader, the kernel's OOM killer) breaks the whole pool and
    every item in flight with it; the item at the head is then retried alone in a fresh process, which tells a
    culprit (it dies again: on_crash(item, reason) stands in for its result) from a bystander; the other items
    keep the results they had or run again in a new pool. Processes come from a fork server, which imports fn's module and
    `preload` once: forking this process directly would copy the shard writer's threads and JAX state, and
    spawning would import everything again in every worker.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([fn.__module__, *preload])
    items = iter(items)
    pending: collections.deque[tuple[T, Future]] = collections.deque()
    executor = _pool(workers, context)

    def submit(item: T) -> Future:
        try:
            return executor.submit(fn, item)
        except BrokenProcessPool as error:  # a worker died since the last result: handled when item is the head
            future: Future = Future()
            future.set_exception(error)
            return future

    try:
        while True:
            while len(pending) < 2 * workers and (item := next(items, _END)) is not _END:
                poll()
                pending.append((item, submit(item)))
            if not pending:
                return
            item, future = pending.popleft()
            try:
                result = _result(future, poll)
            except BrokenProcessPool:
                executor.shutdown(wait=True, cancel_futures=True)
                result = _alone(fn, item, context, on_crash)
                others = list(pending)
                pending.clear()
                executor = _pool(workers, context)
                # Results that were in before the pool broke stand; the rest run again.
                pending.extend((other, done if _succeeded(done) else submit(other)) for other, done in others)
            yield result
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _succeeded(future: Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _alone(fn: Callable[[T], R], item: T, context: Any, on_crash: Callable[[T, str], R]) -> R:
    with _pool(1, context) as single:
        try:
            return single.submit(fn, item).result()
        except BrokenProcessPool:
            return on_crash(item, "the preprocessing process died (a crash in the file reader, or killed for "
                                  "using too much memory)")


def _crashed(task: Task, reason: str) -> Prepared:
    return Prepared(task, _entry(task.source, "rejected", reason))


def read_labels(path: str | os.PathLike) -> dict[str, tuple[int | float | None, str]]:
    """{recording: (label, subject)} from a CSV with columns recording,label[,subject].

    A label is an int when it parses as one (a class index), else a float (a regression target); empty = None.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            if not {"recording", "label"} <= columns:
                raise PrepError(f"{path}: needs the columns recording,label[,subject]; has "
                                f"{','.join(reader.fieldnames or ()) or 'none'}")
            table = {}
            for line, row in enumerate(reader, start=2):
                text = (row["label"] or "").strip()
                try:
                    label = None if not text else int(text) if _is_int(text) else float(text)
                except ValueError:
                    raise PrepError(f"{path}:{line}: label {text!r} is not a number") from None
                table[row["recording"].strip()] = (label, (row.get("subject") or "").strip())
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise PrepError(f"{path}: cannot read the labels: {error}") from None
    return table


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def make_tasks(sources: list[Source], params: Params,
               labels: dict[str, tuple[int | float | None, str]] | None = None) -> list[Task]:
    """One task per source; a label row matches a recording by its id (relative path) first, then its stem."""
    tasks = []
    for source in sources:
        label, subject = (labels or {}).get(source.recording) or (labels or {}).get(source.stem) or (None, "")
        tasks.append(Task(source, params, label, subject))
    return tasks


def _fingerprint(tasks: list[Task]) -> str:
    """What the records depend on. Not the paths: indices of one job may run on machines that mount the corpus
    in different places, and a resumed job may be started from another folder."""
    rows = [[t.source.dataset, t.source.recording, t.source.skip, t.label, t.subject] for t in tasks]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _stats_to_json(stats: DatasetStats) -> dict[str, Any]:
    return {"recordings": sorted(stats.recordings), "windows": stats.windows, "seconds": stats.seconds,
            "channel_sets": dict(stats.channel_sets), "labels": dict(stats.labels),
            "subjects": sorted(stats.subjects), "total": stats.total, "total_sq": stats.total_sq,
            "samples": stats.samples}


def _stats_from_json(data: dict[str, Any]) -> DatasetStats:
    return DatasetStats(recordings=set(data["recordings"]), windows=data["windows"], seconds=data["seconds"],
                        channel_sets=collections.Counter(data["channel_sets"]),
                        labels=collections.Counter(data["labels"]), subjects=set(data["subjects"]),
                        total=data["total"], total_sq=data["total_sq"], samples=data["samples"])


def _shard_stem(prefix: str, shard_index: int, num_shards: int) -> str:
    return prefix if num_shards == 1 else f"{prefix}-{shard_index:05d}-of-{num_shards:05d}"


def shard_name(prefix: str, number: int, shard_index: int = 0, num_shards: int = 1) -> str:
    return f"{_shard_stem(prefix, shard_index, num_shards)}-{number:05d}{SHARD_SUFFIX}"


def journal_name(shard_index: int, num_shards: int) -> str:
    return f".progress-{shard_index:05d}-of-{num_shards:05d}.jsonl"


def _read_journal(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], int] | None:
    """(header, batches, bytes of complete lines), or None before the header is complete (a job that is just
    starting, or was killed right then); a line cut short by a crash is not counted."""
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    lines = complete.decode().splitlines()
    if not lines:
        return None
    header = json.loads(lines[0])
    if header.get("format") != JOURNAL_FORMAT:
        raise PrepError(f"{path}: not a labram prep journal")
    return header, [json.loads(line) for line in lines[1:]], len(complete)


class Journal:
    """This index's journal, held under an exclusive lock for the whole run."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.file = path.open("ab")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise PrepError(f"{path}: another labram prep is writing this shard index") from None
        journal = _read_journal(path)
        if journal is None:
            self.file.truncate(0)
            self._write(header)
            self.header, self.batches = header, []
            return
        self.header, self.batches, size = journal
        self.file.truncate(size)
        differs = [key for key in ("params", "corpus", "shard_index", "recordings")
                   if self.header.get(key) != header[key]]
        if differs:
            self.close()
            raise PrepError(f"{path.parent} holds the output of another job ({', '.join(differs)} differ); use "
                            "another --out, or empty it to start again")

    def _write(self, line: dict[str, Any]) -> None:
        self.file.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def append(self, shard: str | None, entries: list[dict[str, Any]], stats: dict[str, DatasetStats]) -> None:
        batch = {"shard": shard, "entries": entries,
                 "stats": {name: _stats_to_json(s) for name, s in sorted(stats.items())}}
        self._write(batch)
        self.batches.append(batch)

    def close(self) -> None:
        self.file.close()


class Progress:
    """Recordings done, hours of EEG written and throughput on one updating stderr line (plain lines if not a
    terminal, every 30 s)."""

    def __init__(self, stream: TextIO | None, total: int, done: int) -> None:
        self.stream, self.total, self.done = stream, total, done
        self.tty = bool(stream) and hasattr(stream, "isatty") and stream.isatty()
        self.hours = 0.0
        self.rejected = 0
        self.drawn = False
        self.start = self.last = time.monotonic()

    def line(self) -> str:
        minutes = (time.monotonic() - self.start) / 60
        rate = self.hours / minutes if minutes > 0 else 0.0
        return (f"prep {self.done}/{self.total} recordings | {self.hours:.2f} h of EEG written | "
                f"{rate:.2f} h/min | {self.rejected} rejected")

    def update(self, prepared: Prepared) -> None:
        self.done += 1
        self.hours += prepared.entry["hours"] if prepared.entry["status"] == "written" else 0.0
        if prepared.entry["status"] == "rejected":
            self.rejected += 1
            self.note(f"rejected {prepared.entry['path']}: {prepared.entry['reason']}")
        now = time.monotonic()
        if self.stream and self.tty and (now - self.last > 0.1 or self.done == self.total):
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
            self.last, self.drawn = now, True
        elif self.stream and not self.tty and now - self.last > _PLAIN_PROGRESS_EVERY_S:
            print(self.line(), file=self.stream, flush=True)
            self.last = now

    def note(self, text: str) -> None:
        if self.stream:
            print(("\r\033[K" if self.tty else "") + text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.stream and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


class _Batch:
    """The recordings since the last closed shard."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.stats: dict[str, DatasetStats] = {}
        self.windows = 0
        self.head: Prepared | None = None  # the first written recording, until the shard writer takes it

    def add(self, prepared: Prepared) -> None:
        self.entries.append(prepared.entry)
        if prepared.stats is not None:
            self.stats.setdefault(prepared.task.source.dataset, DatasetStats()).merge(prepared.stats)
            self.windows += prepared.entry["windows"]


def _next_written(results: Iterator[Prepared], batch: _Batch, seen: Callable[[Prepared], None]) -> Prepared | None:
    for prepared in results:
        seen(prepared)
        batch.add(prepared)
        if prepared.windows is not None:
            return prepared
    return None


def _shard_records(batch: _Batch, results: Iterator[Prepared], shard_windows: int,
                   seen: Callable[[Prepared], None]) -> Iterator[Window]:
    """Windows of the batch's head and the recordings after it, up to the first recording boundary at which the
    shard holds >= shard_windows; only the recording being written is held in memory."""
    prepared, batch.head = batch.head, None
    while prepared is not None:
        yield from prepared.records()
        if batch.windows >= shard_windows:
            return
        prepared = _next_written(results, batch, seen)


def _write_shards(out: Path, results: Iterator[Prepared], journal: Journal, name: Callable[[int], str],
                  shard_windows: int, seen: Callable[[Prepared], None]) -> list[str]:
    written = []
    number = sum(1 for b in journal.batches if b["shard"])
    while True:
        batch = _Batch()
        batch.head = _next_written(results, batch, seen)
        if batch.head is None:
            if batch.entries:  # trailing recordings without windows still belong in the journal
                journal.append(None, batch.entries, batch.stats)
            return written
        shard = name(number)
        write_shard(out / shard, _shard_records(batch, results, shard_windows, seen))
        journal.append(shard, batch.entries, batch.stats)
        written.append(shard)
        number += 1


@contextlib.contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """Serialises the manifest and report rebuild between shard indices finishing at the same time."""
    with (out / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _journals(out: Path, num_shards: int) -> list[Path]:
    return sorted(out.glob(f".progress-*-of-{num_shards:05d}.jsonl"))


def rebuild(out: str | os.PathLike, num_shards: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write manifest.json and report.json from every journal of a `num_shards` job in `out`."""
    out = Path(out)
    stats: dict[str, DatasetStats] = {}
    entries: list[dict[str, Any]] = []
    commands, complete_indices, first = [], [], None
    for journal in filter(None, map(_read_journal, _journals(out, num_shards))):
        header, batches, _ = journal
        first = first or header
        commands.append(header["command"])
        count = 0
        for batch in batches:
            entries += batch["entries"]
            count += len(batch["entries"])
            for name, data in batch["stats"].items():
                stats.setdefault(name, DatasetStats()).merge(_stats_from_json(data))
        if count == header["recordings"]:
            complete_indices.append(header["shard_index"])
    if first is None:
        raise PrepError(f"{out}: no labram prep journal")
    entries.sort(key=lambda e: (e["dataset"], e["recording"], e["path"]))
    statuses = collections.Counter(e["status"] for e in entries)
    complete = len(complete_indices) == num_shards
    totals = {"inputs": len(entries), "written": statuses["written"], "rejected": statuses["rejected"],
              "skipped": statuses["skipped"], "windows": sum(e["windows"] for e in entries),
              "hours_written": round(sum(e["hours"] for e in entries if e["status"] == "written"), 6),
              "hours_rejected": round(sum(e["hours"] for e in entries if e["status"] == "rejected"), 6)}
    report = {"complete": complete, "num_shards": num_shards, "shard_indices_complete": complete_indices,
              "totals": totals, "recordings": entries}
    write_json(out / REPORT, report, ensure_ascii=False)
    job = first["params"]
    params = {**job["preprocessing"], "shard_windows": job["shard_windows"], "prefix": job["prefix"],
              "labels": first["labels"], "commands": commands}
    manifest = write_manifest(out, stats, params, num_shards=num_shards, shard_indices_complete=complete_indices,
                              complete=complete, rejected=statuses["rejected"], skipped=statuses["skipped"],
                              report=REPORT, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return manifest, report


def _check_folder(out: Path, num_shards: int, header: dict[str, Any]) -> None:
    journals = sorted(out.glob(".progress-*-of-*.jsonl"))
    other = [p.name for p in journals if not p.name.endswith(f"-of-{num_shards:05d}.jsonl")]
    if other:
        raise PrepError(f"{out} holds a job split another way ({other[0]}); use the same --num-shards, or another "
                        "--out")
    if not journals and any(out.glob(f"*{SHARD_SUFFIX}")):
        raise PrepError(f"{out} holds shards that labram prep did not write (no journal); use an empty --out")
    for theirs, _, _ in filter(None, map(_read_journal, journals)):
        if theirs["shard_index"] != header["shard_index"] and (theirs["params"], theirs["corpus"]) != (
                header["params"], header["corpus"]):
            raise PrepError(f"{out}: shard index {theirs['shard_index']} was written with other parameters or "
                            "recordings; every index of a job needs the same inputs and flags")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise PrepError(f"{name} must be at least 1, got {value}")


def run(inputs: list[str], out: str | os.PathLike, *, params: Params = Params(), dataset: str | None = None,
        labels: str | os.PathLike | None = None, workers: int | None = None,
        shard_windows: int = DEFAULT_SHARD_WINDOWS, num_shards: int = 1, shard_index: int = 0,
        prefix: str = "windows", command: str = "", progress: TextIO | None = None) -> dict[str, Any]:
    """Preprocess `inputs` into shards in `out`, resuming what a previous run of the same job left there.

    Progress and rejections go to `progress` (the CLI passes stderr). Returns a summary of this run (recordings,
    windows and hours written now, worker seconds per recording) with the rebuilt manifest and report. Raises
    PrepError (or discover.DiscoveryError) for usage errors only; a recording that fails is rejected in the report.
    """
    workers = workers or len(os.sched_getaffinity(0))
    for name, value in (("--workers", workers), ("--shard-windows", shard_windows), ("--num-shards", num_shards)):
        _positive(name, value)
    if not 0 <= shard_index < num_shards:
        raise PrepError(f"--shard-index must be 0..{num_shards - 1}, got {shard_index}")
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise PrepError(f"--prefix must be a plain file name start, got {prefix!r}")
    tasks = make_tasks(discover(inputs, dataset), params, read_labels(labels) if labels else None)
    mine = tasks[shard_index::num_shards]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = {"format": JOURNAL_FORMAT, "version": 1,
              "params": {"preprocessing": params.to_json(), "shard_windows": shard_windows, "prefix": prefix,
                         "num_shards": num_shards},
              "corpus": _fingerprint(tasks), "shard_index": shard_index, "recordings": len(mine),
              "labels": os.fspath(labels) if labels else None, "command": command}
    _check_folder(out, num_shards, header)
    journal = Journal(out / journal_name(shard_index, num_shards), header)
    tic = time.perf_counter()
    this_run: list[Prepared] = []
    with StopSignals("labram prep") as signals, contextlib.closing(journal):
        missing = [b["shard"] for b in journal.batches if b["shard"] and not (out / b["shard"]).is_file()]
        if missing:
            raise PrepError(f"{out}: {missing[0]} is in the journal but not on disk; empty --out to start again")
        name = functools.partial(shard_name, prefix, shard_index=shard_index, num_shards=num_shards)
        # Only this index's: another index may be writing its own shard into the same folder right now.
        for partial in out.glob(f"{_shard_stem(prefix, shard_index, num_shards)}-*{SHARD_SUFFIX}.tmp"):
            partial.unlink()
        done = sum(len(b["entries"]) for b in journal.batches)
        todo = mine[done:]
        bar = Progress(progress, len(mine), done)

        def stop_here() -> None:
            if signals.requested:  # the recordings of the shard in writing are done again by the rerun
                bar.close()
                kept = sum(len(b["entries"]) for b in journal.batches)
                raise Preempted(f"stopped by {signals.received}: {kept} of {len(mine)} recordings are done and "
                                f"journaled in {out}; the same command resumes after them")

        def seen(prepared: Prepared) -> None:
            stop_here()
            bar.update(prepared)
            this_run.append(dataclasses.replace(prepared, windows=None, stats=None))

        shards = []
        if todo:
            with contextlib.closing(ordered_map(prepare, todo, min(workers, len(todo)), _crashed,
                                                _WORKER_PRELOAD, stop_here)) as results:
                shards = _write_shards(out, results, journal, name, shard_windows, seen)
        bar.close()
    with _folder_lock(out):
        manifest, report = rebuild(out, num_shards)
    statuses = collections.Counter(p.entry["status"] for p in this_run)
    return {"out": str(out), "inputs": len(mine), "already_done": done, "written": statuses["written"],
            "rejected": statuses["rejected"], "skipped": statuses["skipped"],
            "windows": sum(p.entry["windows"] for p in this_run),
            "hours": sum(p.entry["hours"] for p in this_run if p.entry["status"] == "written"),
            "shards": shards, "seconds": time.perf_counter() - tic,
            "prepare_seconds": [p.seconds for p in this_run], "manifest": manifest, "report": report}

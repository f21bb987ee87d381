"""The corpus engine: a plan's items -> checked windows -> ArrayRecord shards in one folder, journaled and resumable.

`prepare` turns one item into its report entry and windows (read, pick channels, check, preprocess, cut), in a
worker of data_prep.pool; `write_folder` writes the results of a folder's items as shards, in item order, and
journals each closed shard. Callers: data_prep.prep (`labram prep`: one folder, optionally one of K shard indices)
and data_prep.build (a dataset builder: one staged folder per split, swapped in when all are complete).

Layout of a folder:

- `<prefix>-NNNNN.array_record` (or `<prefix>-IIIII-of-KKKKK-NNNNN.array_record` for shard index I of K): windows
  (`labram_jax.data.records.Window`) of consecutive items. A shard is closed at the first recording boundary where
  it holds at least `shard_windows` windows, counting from the previous shard of the same index, so its contents
  depend only on the plan and the flags.
- `.progress-IIIII-of-KKKKK.jsonl`: the journal of shard index I. Its first line describes the job (the rule's
  parameters and a fingerprint of the items with their labels); after each shard is renamed into place one line
  gives the shard's name, the report entries of its items (rejected and skipped ones in between included) and
  its per-dataset statistics. Trailing items that produced no windows get a last line without a shard.

Report entries: `status` written / rejected (with a one-line `reason`) / skipped (with the reason it is not read),
`windows`, `hours` (the recording's length as read, also for rejected ones where it could be read),
`channels_kept` (vocabulary names), `channels_dropped` (file names not kept), `channels_flat` (dropped by
data_prep.checks), when written `window` (seconds), and for builds `split` and `notes` (events left out).

Resume: a rerun deletes its index's `*.tmp` shards, replays the journal and continues with the first item the
journal does not list; the batch rule above then recreates the same shards under the same names, so the output of
an interrupted and resumed job is identical, byte for byte, to that of an uninterrupted one. A rerun with another
rule or other items is refused rather than mixed in.

Memory: workers read and preprocess one recording each, at most 2 x workers recordings are in flight, and the
writer streams each recording's windows into the open shard, so the job holds a few recordings, never a shard.
"""
from __future__ import annotations

import collections
import dataclasses
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import mne
import numpy as np

from data_prep import checks
from data_prep.plan import Item, PrepError, Rule, default_window
from data_prep.pool import ordered_map
from data_prep.preprocess import preprocess, windows
from data_prep.progress import Progress
from labram_jax.channels import resolve_channels
from labram_jax.data.records import Window
from labram_jax.data.shards import SHARD_SUFFIX, DatasetStats, write_shard
from labram_jax.files import append_no_follow, read_regular

# A LaBraM window of up to 256 tokens is <= 205 KB in float32, so 2000 windows make shards of at most ~400 MB
# (~200 MB in float16): large enough that a 25,000-hour corpus fits in a few thousand files (one open handle
# each in the loader), small enough that a crash loses at most a few minutes of work and that cloud storage
# copies them in one piece.
DEFAULT_SHARD_WINDOWS = 2000
JOURNAL_FORMAT = "labram-jax/prep-journal"
# MNE imports its readers and filters on first use, ~0.5 s that every worker would otherwise pay again.
_WORKER_PRELOAD = ("scipy.signal", "mne.filter", "mne.io")

Job = tuple[Item, Rule]


@dataclasses.dataclass
class Prepared:
    """A worker's result for one item: its report entry and, when written, its windows."""

    item: Item
    entry: dict[str, Any]
    windows: np.ndarray | None = None  # [W, N, A, 200] in the output dtype
    starts: tuple[float, ...] = ()
    labels: tuple[int | float | None, ...] | None = None  # per window (events), else the item's label
    channel_names: tuple[str, ...] = ()
    channel_rows: tuple[int, ...] = ()
    sfreq: float = 200.0
    stats: DatasetStats | None = None
    seconds: float = 0.0  # worker time; benchmarks only, never journaled since it differs between runs

    def records(self) -> Iterator[Window]:
        item, rows = self.item, np.asarray(self.channel_rows, np.int16)
        for i, signal in enumerate(self.windows if self.windows is not None else ()):
            yield Window(signal=signal, channel_rows=rows, channel_names=self.channel_names,
                         recording=item.recording, start=self.starts[i], dataset=item.dataset,
                         subject=item.subject, label=item.label if self.labels is None else self.labels[i],
                         sfreq=self.sfreq, session=item.session, task=item.task, run=item.run)


def entry(item: Item, status: str, reason: str = "", **fields: Any) -> dict[str, Any]:
    """A report entry."""
    line = {"path": item.path, "dataset": item.dataset, "recording": item.recording, "status": status}
    if item.split:
        line["split"] = item.split
    if item.task:  # a BIDS recording (every BIDS EEG file names its task)
        line.update(subject=item.subject, session=item.session, task=item.task, run=item.run)
    if reason:
        # Readers quote garbage header bytes in their messages; the report is read by people and by json.
        line["reason"] = "".join(c if c.isprintable() else "?" for c in " ".join(reason.split()))
    line.update({"windows": 0, "hours": 0.0, "channels_kept": [], "channels_dropped": [], "channels_flat": []})
    line.update(fields)
    return line


def _reason(error: Exception, item: Item) -> str:
    text = " ".join(str(error).split())
    prefix = f"{item.path}: "
    # read_recording and preprocess name the file; the report entry already does.
    text = text[len(prefix):] if text.startswith(prefix) else text
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


def _pick(raw: mne.io.BaseRaw, wanted: tuple[str, ...]) -> tuple[mne.io.BaseRaw, list[str]]:
    """The raw with exactly the `wanted` vocabulary channels in that order, and the file names left out."""
    resolved = resolve_channels(raw.ch_names, drop_unknown=True)
    file_name = {name: raw.ch_names[i] for name, i in zip(resolved.names, resolved.kept)}
    missing = [name for name in wanted if name not in file_name]
    if missing:
        raise checks.Rejected(f"missing channels {', '.join(missing)}")
    picked = [file_name[name] for name in wanted]
    return raw.reorder_channels(picked), [name for name in raw.ch_names if name not in picked]


def prepare(job: Job) -> Prepared:
    """Read, pick channels, check, preprocess and cut one item; never raises, a failure is a rejected entry."""
    tic = time.perf_counter()
    item, rule = job
    params = rule.params
    if item.skip or item.reject:
        return Prepared(item, entry(item, "skipped" if item.skip else "rejected", item.skip or item.reject))
    known: dict[str, Any] = {}
    try:
        if item.path.lower().endswith((".edf", ".bdf")):
            checks.check_edf_complete(item.path)
        raw = rule.reader(item.path)
        known["hours"] = round(raw.n_times / raw.info["sfreq"] / 3600, 6)
        dropped: list[str] = []
        if rule.channels is not None:
            raw, dropped = _pick(raw, rule.channels)
        channels = resolve_channels(raw.ch_names, drop_unknown=True)
        known["channels_dropped"] = dropped + list(channels.dropped)
        checks.check_finite(raw, channels.kept)
        recording = preprocess(raw, notch=params.notch, l_freq=params.l_freq, h_freq=params.h_freq,
                               sfreq=params.sfreq, source=item.path)
        del raw  # the largest object of the job: the file's samples at their own rate, often float64
        recording, flat = checks.drop_flat(recording)
        known.update(channels_kept=list(recording.channels.names), channels_flat=list(flat))
        if flat and rule.channels is not None:
            raise checks.Rejected(f"flat channels {', '.join(flat)}: the windows need all of their "
                                  f"{len(rule.channels)} channels")
        checks.check_amplitude(recording)
        if rule.events is not None:
            events = rule.events(recording, item)
            cut, starts, labels, notes = events.windows, events.starts, events.labels, events.notes
            known.update({"notes": list(notes)} if notes else {})
            window = cut.shape[2] if len(cut) else 0
            if not len(cut):
                raise checks.Rejected(f"none of its events gives a window ({len(notes)} left out)")
        else:
            window = params.window or default_window(len(recording.channels.names))
            stride = params.stride or window
            cut, labels = windows(recording.signal, window, stride), None
            starts = tuple(float(i * stride) for i in range(len(cut)))
            if not len(cut):
                raise checks.Rejected(f"{recording.duration:.1f} s after preprocessing, shorter than one "
                                      f"{window}-s window")
        checks.check_dtype_range(cut, params.dtype)
    except Exception as error:  # any failure of one file (including reader bugs) must not stop the job
        return Prepared(item, entry(item, "rejected", _reason(error, item), **known),
                        seconds=time.perf_counter() - tic)
    prepared = Prepared(item, entry(item, "written", windows=len(cut), window=window, **known),
                        windows=np.asarray(cut).astype(params.dtype, copy=False), starts=tuple(starts),
                        labels=None if labels is None else tuple(labels), channel_names=recording.channels.names,
                        channel_rows=recording.channels.rows, sfreq=params.sfreq)
    stats = DatasetStats()
    for record in prepared.records():
        stats.add(record)
    prepared.stats = stats
    prepared.seconds = time.perf_counter() - tic
    return prepared


def crashed(job: Job, reason: str) -> Prepared:
    return Prepared(job[0], entry(job[0], "rejected", reason))


def prepared(jobs: list[Job], workers: int, poll: Callable[[], None] = lambda: None) -> Iterator[Prepared]:
    """`prepare` over jobs in `workers` processes, in job order, a dying worker rejecting only its own item."""
    return ordered_map(prepare, jobs, max(1, min(workers, len(jobs))), crashed, _WORKER_PRELOAD, poll)


def fingerprint(items: list[Item]) -> str:
    """What the records depend on. Not the paths: indices of one job may run on machines that mount the corpus
    in different places, and a resumed job may be started from another folder."""
    rows = [[i.dataset, i.recording, i.skip, i.reject, i.label, i.subject, i.split] for i in items]
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


def shard_stem(prefix: str, shard_index: int, num_shards: int) -> str:
    return prefix if num_shards == 1 else f"{prefix}-{shard_index:05d}-of-{num_shards:05d}"


def shard_name(prefix: str, number: int, shard_index: int = 0, num_shards: int = 1) -> str:
    return f"{shard_stem(prefix, shard_index, num_shards)}-{number:05d}{SHARD_SUFFIX}"


def journal_name(shard_index: int, num_shards: int) -> str:
    return f".progress-{shard_index:05d}-of-{num_shards:05d}.jsonl"


def journals(out: Path, num_shards: int | None = None) -> list[Path]:
    return sorted(out.glob(f".progress-*-of-{'*' if num_shards is None else f'{num_shards:05d}'}.jsonl"))


def read_journal(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], int] | None:
    """(header, batches, bytes of complete lines), or None before the header is complete (a job that is just
    starting, or was killed right then); a line cut short by a crash is not counted."""
    data = read_regular(path, follow=False)
    complete = data[:data.rfind(b"\n") + 1]
    lines = complete.decode().splitlines()
    if not lines:
        return None
    header = json.loads(lines[0])
    if header.get("format") != JOURNAL_FORMAT:
        raise PrepError(f"{path}: not a labram prep journal")
    return header, [json.loads(line) for line in lines[1:]], len(complete)


class Journal:
    """One shard index's journal, held under an exclusive lock for the whole run."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.file = append_no_follow(path)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise PrepError(f"{path}: another job is writing this shard index") from None
        journal = read_journal(path)
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

    @property
    def done(self) -> int:
        return sum(len(b["entries"]) for b in self.batches)

    def close(self) -> None:
        self.file.close()


class _Batch:
    """The items since the last closed shard."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.stats: dict[str, DatasetStats] = {}
        self.windows = 0
        self.head: Prepared | None = None  # the first written recording, until the shard writer takes it

    def add(self, result: Prepared) -> None:
        self.entries.append(result.entry)
        if result.stats is not None:
            self.stats.setdefault(result.item.dataset, DatasetStats()).merge(result.stats)
            self.windows += result.entry["windows"]


def _next_written(results: Iterator[Prepared], batch: _Batch, seen: Callable[[Prepared], None]) -> Prepared | None:
    for result in results:
        seen(result)
        batch.add(result)
        if result.windows is not None:
            return result
    return None


def _shard_records(batch: _Batch, results: Iterator[Prepared], shard_windows: int,
                   seen: Callable[[Prepared], None]) -> Iterator[Window]:
    """Windows of the batch's head and the recordings after it, up to the first recording boundary at which the
    shard holds >= shard_windows; only the recording being written is held in memory."""
    result, batch.head = batch.head, None
    while result is not None:
        yield from result.records()
        if batch.windows >= shard_windows:
            return
        result = _next_written(results, batch, seen)


def _write_shards(out: Path, results: Iterator[Prepared], journal: Journal, name: Callable[[int], str],
                  shard_windows: int, seen: Callable[[Prepared], None]) -> list[str]:
    written = []
    number = sum(1 for b in journal.batches if b["shard"])
    while True:
        batch = _Batch()
        batch.head = _next_written(results, batch, seen)
        if batch.head is None:
            if batch.entries:  # trailing items without windows still belong in the journal
                journal.append(None, batch.entries, batch.stats)
            return written
        shard = name(number)
        write_shard(out / shard, _shard_records(batch, results, shard_windows, seen))
        journal.append(shard, batch.entries, batch.stats)
        written.append(shard)
        number += 1


@dataclasses.dataclass
class Written:
    """What one write_folder call did."""

    already_done: int
    shards: list[str]
    results: list[Prepared]  # this run's, without their windows


def write_folder(out: Path, jobs: list[Job], header: dict[str, Any], *, workers: int, shard_windows: int,
                 prefix: str, shard_index: int = 0, num_shards: int = 1, bar: Progress | None = None,
                 stop: Callable[[int], None] = lambda done: None) -> Written:
    """Write `jobs` (this shard index's items, in order) into `out`, resuming after what its journal lists.

    `stop(done)` is called at every recording boundary and while a result is awaited, with the items journaled
    in `out` so far, and may raise (a stop signal): the shard in writing is abandoned, and its `.tmp` goes at the
    rerun.
    """
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / journal_name(shard_index, num_shards), header)
    this_run: list[Prepared] = []
    shards: list[str] = []
    try:
        missing = [b["shard"] for b in journal.batches if b["shard"] and not (out / b["shard"]).is_file()]
        if missing:
            raise PrepError(f"{out}: {missing[0]} is in the journal but not on disk; empty it to start again")
        stem = shard_stem(prefix, shard_index, num_shards)
        # Only this index's: another index may be writing its own shard into the same folder right now.
        for partial in out.glob(f"{stem}-*{SHARD_SUFFIX}.tmp"):
            partial.unlink()
        done = journal.done
        todo = jobs[done:]
        if bar is not None:
            bar.resumed(done)

        def poll() -> None:
            stop(journal.done)

        def seen(result: Prepared) -> None:
            poll()
            if bar is not None:
                bar.update(result.entry)
            this_run.append(dataclasses.replace(result, windows=None, stats=None))

        if todo:
            def name(number: int) -> str:
                return shard_name(prefix, number, shard_index, num_shards)

            results = prepared(todo, workers, poll)
            try:
                shards = _write_shards(out, results, journal, name, shard_windows, seen)
            finally:
                results.close()
    finally:
        journal.close()
    return Written(done, shards, this_run)


@dataclasses.dataclass
class Collected:
    """Everything the journals of a folder record."""

    headers: list[dict[str, Any]]
    entries: list[dict[str, Any]]  # sorted by (dataset, recording, path)
    stats: dict[str, DatasetStats]
    complete_indices: list[int]


def collect(out: Path, num_shards: int) -> Collected:
    """Merge every journal of a `num_shards` job in `out`."""
    stats: dict[str, DatasetStats] = {}
    entries: list[dict[str, Any]] = []
    headers, complete = [], []
    for header, batches, _ in filter(None, map(read_journal, journals(out, num_shards))):
        headers.append(header)
        count = 0
        for batch in batches:
            entries += batch["entries"]
            count += len(batch["entries"])
            for name, data in batch["stats"].items():
                stats.setdefault(name, DatasetStats()).merge(_stats_from_json(data))
        if count == header["recordings"]:
            complete.append(header["shard_index"])
    if not headers:
        raise PrepError(f"{out}: no labram prep journal")
    entries.sort(key=lambda e: (e["dataset"], e["recording"], e["path"]))
    return Collected(headers, entries, stats, complete)


def totals(entries: list[dict[str, Any]]) -> dict[str, Any]:
    statuses = collections.Counter(e["status"] for e in entries)
    return {"inputs": len(entries), "written": statuses["written"], "rejected": statuses["rejected"],
            "skipped": statuses["skipped"], "windows": sum(e["windows"] for e in entries),
            "hours_written": round(sum(e["hours"] for e in entries if e["status"] == "written"), 6),
            "hours_rejected": round(sum(e["hours"] for e in entries if e["status"] == "rejected"), 6)}

"""What the corpus builders share: one job per recording file, a process pool that turns jobs into windows in job
order, and the writing of each split as ArrayRecord shards with a manifest, plus report.json of what was left out.

A builder is a plan (which file goes to which split, with which subject and label) and a per-file function that
returns the file's windows. The ArrayRecord builders (`write_splits`) and the TFDS builders (`iter_file_windows`)
run the same two, so both produce the same windows.

`workers` > 1 starts spawned processes, which import the calling script again: in a script, call the builders
under `if __name__ == "__main__":`.

On SIGTERM or SIGINT a build stops after the file in flight and raises labram_jax.preemption.Preempted. Builds do
not resume: the rerun clears the split folders and writes everything again, the same bytes as an uninterrupted
build. `report.json` is written last, so an interrupted build is one without it.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from labram_jax.data.records import Window
from labram_jax.data.shards import MANIFEST, SHARD_SUFFIX, DatasetStats, write_manifest, write_shard
from labram_jax.files import write_json
from labram_jax.preemption import Preempted, StopSignals, ignore_in_worker

SPLITS = ("train", "val", "test")
REPORT = "report.json"
DEFAULT_SHARD_SIZE = 2000  # 10-s 23-channel float32 windows: ~370 MB per shard
T = TypeVar("T")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@dataclasses.dataclass(frozen=True)
class Job:
    """One recording file and where its windows go."""

    path: str
    recording: str  # the file's id in the output: its path relative to the corpus root
    subject: str
    split: str
    label: int | None = None  # None when labels come per window (TUEV events)


@dataclasses.dataclass(frozen=True)
class FileWindows:
    """A file's windows, and one-line notes on parts of it that were left out (e.g. TUEV events)."""

    windows: list[Window]
    notes: tuple[str, ...] = ()


@dataclasses.dataclass
class Plan:
    dataset: str
    root: str
    jobs: list[Job]
    rejected: list[dict[str, str]]  # files left out before any preprocessing: {"recording", "reason"}
    split_rule: str
    params: dict[str, Any]

    def jobs_of(self, split: str) -> list[Job]:
        return [job for job in self.jobs if job.split == split]


WindowFn = Callable[[Job], FileWindows]


def make_windows(job: Job, signal: np.ndarray, channels: Any, starts: Iterable[float], *, dataset: str,
                 dtype: str, labels: Iterable[int | None] | None = None) -> list[Window]:
    """Window records for `signal` [W, N, A, 200] cut from the job's recording; channels: ResolvedChannels."""
    rows = np.asarray(channels.rows, np.int16)
    labels = itertools.repeat(job.label) if labels is None else labels
    return [Window(signal=np.ascontiguousarray(x, dtype=dtype), channel_rows=rows, channel_names=channels.names,
                   recording=job.recording, start=float(start), dataset=dataset, subject=job.subject,
                   label=None if label is None else int(label))
            for x, start, label in zip(signal, starts, labels)]


def check_dtype(dtype: str) -> str:
    if np.dtype(dtype) not in (np.float32, np.float16):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    return np.dtype(dtype).name


def _run_job(fn: WindowFn, job: Job) -> tuple[FileWindows | None, str | None]:
    try:
        return fn(job), None
    except Exception as error:  # a bad file is reported, never allowed to stop the build (MNE raises many types)
        return None, one_line(error)


def iter_file_windows(fn: WindowFn, jobs: list[Job], workers: int = 1
                      ) -> Iterator[tuple[Job, FileWindows | None, str | None]]:
    """(job, windows, None) or (job, None, reason) for each job, in job order, `workers` files at a time."""
    run = functools.partial(_run_job, fn)
    if workers <= 1 or len(jobs) <= 1:
        results = map(run, jobs)
        yield from ((job, *result) for job, result in zip(jobs, results))
        return
    # spawn, not fork: the parent has usually imported JAX, whose threads do not survive a fork. The workers
    # ignore SIGTERM and SIGINT (stopping is this process's decision), so a pool's terminate(), which sends them
    # SIGTERM, could not end them: an executor ends its workers by message, once the files in flight are done.
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=ignore_in_worker)
    try:
        yield from ((job, *result) for job, result in zip(jobs, pool.map(run, jobs)))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _until_stopped(results: Iterator[T], total: int, out: Path) -> Iterator[T]:
    """`results` until SIGTERM or SIGINT, then Preempted (the file in flight is left out with the rest)."""
    with StopSignals("labram build") as signals:
        for done, result in enumerate(results):
            if signals.requested:
                raise Preempted(f"stopped by {signals.received} after {done} of {total} files; {out} is "
                                "incomplete (no report.json), and the same command builds it again")
            yield result


def clear_split(directory: Path) -> None:
    """Remove what an earlier build wrote in a split folder (only our own files), so no stale shard survives."""
    if not directory.is_dir():
        return
    for path in [*directory.glob(f"*{SHARD_SUFFIX}"), *directory.glob(f"*{SHARD_SUFFIX}.tmp"),
                 directory / MANIFEST]:
        path.unlink(missing_ok=True)
    if not any(directory.iterdir()):
        directory.rmdir()


def _write_stream(directory: Path, prefix: str, windows: Iterable[Window], shard_size: int) -> int:
    windows = iter(windows)
    total = index = 0
    while (first := next(windows, None)) is not None:
        directory.mkdir(parents=True, exist_ok=True)
        shard = itertools.chain([first], itertools.islice(windows, shard_size - 1))
        total += write_shard(directory / f"{prefix}-{index:05d}{SHARD_SUFFIX}", shard)
        index += 1
    return total


def write_splits(plan: Plan, out: str | os.PathLike, fn: WindowFn, *, workers: int = 1,
                 shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """Write `out/<split>/` shards + manifest.json for every split that gets windows, and `out/report.json`.

    Windows keep job order (jobs sorted by split, then recording id), so the output is the same for any
    `workers`. A split without windows gets no folder. Returns the report.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).unlink(missing_ok=True)  # the mark of a finished build, until this one finishes
    for split in SPLITS:
        clear_split(out / split)
    jobs = sorted(plan.jobs, key=lambda job: (SPLITS.index(job.split), job.recording))
    rejected = list(plan.rejected)
    notes: list[dict[str, str]] = []
    splits: dict[str, dict[str, Any]] = {}
    results = _until_stopped(iter_file_windows(fn, jobs, workers), len(jobs), out)
    for split, group in itertools.groupby(results, key=lambda result: result[0].split):
        stats = DatasetStats()
        files = 0

        def stream() -> Iterator[Window]:
            nonlocal files
            for job, output, error in group:
                if error is not None:
                    rejected.append({"recording": job.recording, "reason": error})
                    continue
                files += 1
                notes.extend({"recording": job.recording, "note": note} for note in output.notes)
                for window in output.windows:
                    stats.add(window)
                    yield window

        count = _write_stream(out / split, f"{plan.dataset}-{split}", stream(), shard_size)
        splits[split] = {"files": files, "windows": count, "subjects": len(stats.subjects)}
        if count:
            write_manifest(out / split, {plan.dataset: stats}, plan.params, split=split,
                           split_rule=plan.split_rule, source=plan.root, subject_ids=sorted(stats.subjects))
    report = {"dataset": plan.dataset, "source": plan.root, "split_rule": plan.split_rule, "splits": splits,
              "rejected": rejected, "notes": notes}
    write_json(out / REPORT, report)
    return report

"""A dataset build: a builder's plan written by the corpus engine into OUT/{train,val,test}/, staged and swapped in.

Layout: OUT/<split>/ holds `<dataset>-<split>-NNNNN.array_record` shards and a manifest.json (the builder's
parameters, split, split rule, source and subject ids) for every split with items, and OUT/report.json lists
every item of the plan (written, rejected or skipped, with its split and reason) with per-split counts.

Atomicity: the build is written into OUT/.staging/ (one engine folder with its journal per split), and only a
complete build replaces the previous one: the previous split folders are moved to OUT/.previous/, the staged ones
moved into place, then report.json replaced and OUT/.previous/ deleted. A build killed before that point leaves
the previous build untouched and its rerun resumes the staged one (byte-identical to an uninterrupted build); a
build killed during those renames is completed by the rerun, which finds the staged report.json. Nothing else in
OUT is touched: a split folder holding a file that no build of this dataset writes is refused, not deleted, and a
staging folder of another plan is emptied of the files a build writes.

Stopping: on SIGTERM or SIGINT the build stops at the next recording boundary and raises
labram_jax.preemption.Preempted (`labram build` exits with 75); the rerun resumes.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any, TextIO

from data_prep.engine import (DEFAULT_SHARD_WINDOWS, JOURNAL_FORMAT, collect, fingerprint, prepare, totals,
                              write_folder)
from data_prep.plan import SPLITS, Plan, PrepError
from data_prep.progress import Progress
from labram_jax.data.shards import MANIFEST, write_manifest
from labram_jax.files import write_json
from labram_jax.preemption import Preempted, StopSignals

REPORT = "report.json"
STAGING = ".staging"
PREVIOUS = ".previous"
PLAN = "plan.json"  # in the staging folder: which plan it stages


def _ours(dataset: str, split: str) -> re.Pattern:
    """The names a build of `dataset` writes in a split folder."""
    shard = re.escape(f"{dataset}-{split}-") + r"\d{5}\.array_record(\.tmp)?"
    return re.compile(rf"^({shard}|{re.escape(MANIFEST)}|\.progress-\d{{5}}-of-\d{{5}}\.jsonl)$")


def _check_ours(folder: Path, dataset: str, split: str) -> None:
    pattern = _ours(dataset, split)
    foreign = sorted(p.name for p in folder.iterdir() if not pattern.match(p.name)) if folder.is_dir() else []
    if foreign:
        raise PrepError(f"{folder}: holds {foreign[0]}, which no {dataset} build writes; move it away or use "
                        "another OUT")


def _remove_ours(folder: Path, dataset: str, split: str) -> None:
    if folder.is_dir():
        _check_ours(folder, dataset, split)
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def _swap(out: Path, dataset: str) -> None:
    """Move the complete staged build into place. Every step can be redone after a crash in the middle: the
    staged report.json is moved last, and OUT/.previous/ exists until the end."""
    staging, previous = out / STAGING, out / PREVIOUS
    if (staging / REPORT).exists():
        previous.mkdir(exist_ok=True)
        for split in SPLITS:
            for journal in (staging / split).glob(".progress-*.jsonl"):
                journal.unlink()
            if (out / split).is_dir() and not (previous / split).exists():
                os.replace(out / split, previous / split)
            if (staging / split).is_dir() and not any((staging / split).iterdir()):
                (staging / split).rmdir()  # a split without windows gets no folder
            elif (staging / split).is_dir():
                os.replace(staging / split, out / split)
        os.replace(staging / REPORT, out / REPORT)
    for split in SPLITS:
        _remove_ours(previous / split, dataset, split)
    if previous.exists():
        previous.rmdir()
    (staging / PLAN).unlink(missing_ok=True)
    staging.rmdir()


def build(plan: Plan, out: str | os.PathLike, *, workers: int = 1, shard_windows: int = DEFAULT_SHARD_WINDOWS,
          progress: TextIO | None = None) -> dict[str, Any]:
    """Write `plan` to out/<split>/ and out/report.json, resuming a staged build of the same plan; returns the
    report. Progress and rejections go to `progress` (None: silent)."""
    if shard_windows < 1 or workers < 1:
        raise PrepError(f"shard_size and workers must be at least 1, got {shard_windows} and {workers}")
    out = Path(out)
    staging = out / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(staging, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepError(f"{out}: another build is writing into it") from None
        return _build_locked(plan, out, workers, shard_windows, progress)
    finally:
        os.close(descriptor)


def _build_locked(plan: Plan, out: Path, workers: int, shard_windows: int, progress: TextIO | None
                  ) -> dict[str, Any]:
    staging = out / STAGING
    if (out / PREVIOUS).exists():  # an earlier build was killed during its swap: finish that first
        _swap(out, plan.dataset)
        staging.mkdir()
    for split in SPLITS:
        _check_ours(out / split, plan.dataset, split)
    plan_json = {"dataset": plan.dataset, "rule": plan.rule.to_json(), "details": plan.details,
                 "items": fingerprint(list(plan.items)), "shard_windows": shard_windows}
    staged = json.loads((staging / PLAN).read_text()) if (staging / PLAN).exists() else None
    if staged != plan_json:  # another plan's partial build, or none: start this one afresh
        for split in SPLITS:
            _remove_ours(staging / split, plan.dataset, split)
        (staging / REPORT).unlink(missing_ok=True)
        write_json(staging / PLAN, plan_json, ensure_ascii=False)
    splits = [split for split in SPLITS if plan.of_split(split)]
    bar = Progress(progress, sum(len(plan.of_split(split)) for split in splits), 0, job="build")
    journaled = {split: 0 for split in splits}
    with StopSignals("labram build") as signals:
        for split in splits:
            items = plan.of_split(split)

            def stop(done: int, split: str = split) -> None:
                journaled[split] = done
                if signals.requested:
                    bar.close()
                    raise Preempted(f"stopped by {signals.received} after {sum(journaled.values())} of "
                                    f"{bar.total} files; the build in {staging} is incomplete and {out} "
                                    "still holds the previous build; the same command resumes it")

            header = {"format": JOURNAL_FORMAT, "version": 1,
                      "params": {"preprocessing": plan.rule.to_json(), "shard_windows": shard_windows,
                                 "prefix": f"{plan.dataset}-{split}", "num_shards": 1},
                      "corpus": fingerprint(items), "shard_index": 0, "recordings": len(items), "labels": None,
                      "command": f"build {plan.dataset}"}
            write_folder(staging / split, [(item, plan.rule) for item in items], header, workers=workers,
                         shard_windows=shard_windows, prefix=f"{plan.dataset}-{split}", bar=bar, stop=stop)
        bar.close()
    report = _finish(plan, staging, splits)
    _swap(out, plan.dataset)
    return report


def _finish(plan: Plan, staging: Path, splits: list[str]) -> dict[str, Any]:
    """Each split's manifest, then the report: the staged report marks a complete build."""
    # Files the plan refused before any reading (a name that is no recording of the set, a subject in no split).
    entries, counts = [prepare((item, plan.rule)).entry for item in plan.of_split("")], {}
    for split in splits:
        found = collect(staging / split, 1)
        entries += found.entries
        stats = found.stats.get(plan.dataset)
        written = [e for e in found.entries if e["status"] == "written"]
        counts[split] = {"files": len(written), "windows": sum(e["windows"] for e in written),
                         "subjects": len(stats.subjects) if stats else 0}
        if written:
            write_manifest(staging / split, found.stats, plan.details, split=split, split_rule=plan.split_rule,
                           source=plan.source, subject_ids=sorted(stats.subjects))
    report = {"dataset": plan.dataset, "source": plan.source, "split_rule": plan.split_rule, "complete": True,
              "splits": counts, "totals": totals(entries), "recordings": entries}
    if plan.details.get("label_from"):  # a BIDS build's: where its labels come from, and the classes' names
        report["labels"] = {"from": plan.details["label_from"], "classes": plan.details["labels"]}
    write_json(staging / REPORT, report, ensure_ascii=False, allow_nan=False)  # strict JSON: any reader parses it
    return report

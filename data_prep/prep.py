"""`labram prep`: EEG recordings -> ArrayRecord shards of LaBraM windows, with a manifest and a report.

The inputs (files, folders, glob patterns; data_prep.discover) and an optional labels CSV become a plan
(data_prep.plan) that the corpus engine (data_prep.engine) writes into the output folder DIR: shards, one journal
per shard index, and at the end of every run `manifest.json` and `report.json`, rebuilt from all journals in DIR,
so whichever index finishes last leaves a manifest and report that cover everything finished. The report lists
every input, recordings and every other file found in the input folders, as written, rejected (with a one-line
`reason`) or skipped (with why it is not read); the manifest's hours count windows.

Resume: a rerun of the same command resumes after what the journals list and ends with output identical, byte
for byte, to that of an uninterrupted job (data_prep.engine). A rerun with other parameters or other recordings is
refused rather than mixed in.

Stopping: on SIGTERM or SIGINT the job abandons the shard it is writing at the next recording boundary (its
`.tmp` file goes at the rerun), closes the journal and raises labram_jax.preemption.Preempted (`labram prep`
exits with status 75); the rerun resumes as after a crash, so at most one shard's recordings are done again.

Scale-out: with `--num-shards K --shard-index I` this index takes the recordings at positions p of the sorted list
with p % K == I (and likewise the skipped files, to list in its report). Positions, not hashes of names, give
every index the same number of recordings (to one), and any scheduler can run the K indices independently, one
after the other or all at once into one DIR.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import fcntl
import os
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from data_prep.bids import Selection, is_bids_root, plan_bids
from data_prep.build import build
from data_prep.discover import Source, discover
from data_prep.engine import (DEFAULT_SHARD_WINDOWS, JOURNAL_FORMAT, collect, fingerprint, journals, read_journal,
                              totals, write_folder)
from data_prep.plan import Item, Params, PrepError, Rule
from data_prep.progress import Progress
from labram_jax import host
from labram_jax.data.shards import SHARD_SUFFIX, write_manifest
from labram_jax.files import append_no_follow, write_json
from labram_jax.preemption import Preempted, StopSignals

REPORT = "report.json"


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


def make_items(sources: list[Source], labels: dict[str, tuple[int | float | None, str]] | None = None
               ) -> list[Item]:
    """One item per source; a label row matches a recording by its id (relative path) first, then its stem."""
    items = []
    for source in sources:
        label, subject = (labels or {}).get(source.recording) or (labels or {}).get(source.stem) or (None, "")
        items.append(Item(source.path, source.recording, source.dataset, label, subject, skip=source.skip))
    return items


@contextlib.contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """Serialises the manifest and report rebuild between shard indices finishing at the same time."""
    with append_no_follow(out / ".lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def rebuild(out: str | os.PathLike, num_shards: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write manifest.json and report.json from every journal of a `num_shards` job in `out`."""
    out = Path(out)
    found = collect(out, num_shards)
    complete = len(found.complete_indices) == num_shards
    counted = totals(found.entries)
    report = {"complete": complete, "num_shards": num_shards, "shard_indices_complete": found.complete_indices,
              "totals": counted, "recordings": found.entries}
    first = found.headers[0]
    if isinstance(first["labels"], dict):  # a BIDS dataset's: where they come from, and the classes' names
        report["labels"] = first["labels"]
    write_json(out / REPORT, report, ensure_ascii=False, allow_nan=False)  # strict JSON: any reader parses it
    job = first["params"]
    params = {**job["preprocessing"], "shard_windows": job["shard_windows"], "prefix": job["prefix"],
              "labels": first["labels"], "commands": [h["command"] for h in found.headers]}
    manifest = write_manifest(out, found.stats, params, num_shards=num_shards,
                              shard_indices_complete=found.complete_indices, complete=complete,
                              rejected=counted["rejected"], skipped=counted["skipped"], report=REPORT,
                              updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return manifest, report


def _check_folder(out: Path, num_shards: int, header: dict[str, Any]) -> None:
    found = journals(out)
    other = [p.name for p in found if not p.name.endswith(f"-of-{num_shards:05d}.jsonl")]
    if other:
        raise PrepError(f"{out} holds a job split another way ({other[0]}); use the same --num-shards, or another "
                        "--out")
    if not found and any(out.glob(f"*{SHARD_SUFFIX}")):
        raise PrepError(f"{out} holds shards that labram prep did not write (no journal); use an empty --out")
    for theirs, _, _ in filter(None, map(read_journal, found)):
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
        prefix: str = "windows", command: str = "", progress: TextIO | None = None,
        bids: Selection = Selection()) -> dict[str, Any]:
    """Preprocess `inputs` into shards in `out`, resuming what a previous run of the same job left there.

    A single input holding dataset_description.json is a BIDS dataset (data_prep.bids), read with the `bids`
    selection, labels and splits; with splits it is written as a build (out/{train,val,test}/, data_prep.build)
    and the summary holds only `out` and that build's `report`.

    Progress and rejections go to `progress` (the CLI passes stderr unless --quiet). Returns a summary of this run
    (recordings, windows and hours written now, worker seconds per recording) with the rebuilt manifest and
    report. Raises PrepError (or discover.DiscoveryError) for usage errors only; a recording that fails is
    rejected in the report.
    """
    workers = workers or host.cpu_count()  # the container's CPU quota, not the machine's cores
    for name, value in (("--workers", workers), ("--shard-windows", shard_windows), ("--num-shards", num_shards)):
        _positive(name, value)
    if not 0 <= shard_index < num_shards:
        raise PrepError(f"--shard-index must be 0..{num_shards - 1}, got {shard_index}")
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise PrepError(f"--prefix must be a plain file name start, got {prefix!r}")
    label_source: str | dict[str, Any] | None = os.fspath(labels) if labels else None
    if len(inputs) == 1 and is_bids_root(inputs[0]):
        if labels:
            raise PrepError(f"--labels: {inputs[0]} is a BIDS dataset; its labels come from --label-from")
        plan = plan_bids(inputs[0], params=params, dataset=dataset, selection=bids)
        if plan.split_rule:
            if num_shards != 1:
                raise PrepError("--split-subjects writes a build into one OUT; it does not take --num-shards")
            return {"out": str(out), "report": build(plan, out, workers=workers, shard_windows=shard_windows,
                                                     progress=progress)}
        items, rule = list(plan.items), plan.rule
        if bids.label_from:
            label_source = {"from": bids.label_from, "classes": plan.details["labels"]}
    elif bids.given():
        raise PrepError(f"--task, --subjects, --sessions, --label-from and --split-subjects need one BIDS "
                        f"dataset as INPUT (a folder with dataset_description.json); got {', '.join(inputs)}")
    else:
        items = make_items(discover(inputs, dataset), read_labels(labels) if labels else None)
        rule = Rule(params)
    # Recordings and skipped files are dealt out separately, so that every index reads as many recordings.
    read, skipped = [i for i in items if not i.skip], [i for i in items if i.skip]
    mine = sorted(read[shard_index::num_shards] + skipped[shard_index::num_shards],
                  key=lambda i: (i.dataset, i.recording, i.path))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = {"format": JOURNAL_FORMAT, "version": 1,
              "params": {"preprocessing": params.to_json(), "shard_windows": shard_windows, "prefix": prefix,
                         "num_shards": num_shards},
              "corpus": fingerprint(items), "shard_index": shard_index, "recordings": len(mine),
              "labels": label_source, "command": command}
    _check_folder(out, num_shards, header)
    tic = time.perf_counter()
    bar = Progress(progress, len(mine), 0)
    with StopSignals("labram prep") as signals:
        def stop(done: int) -> None:
            if signals.requested:  # the recordings of the shard in writing are done again by the rerun
                bar.close()
                raise Preempted(f"stopped by {signals.received}: {done} of {len(mine)} inputs are done and "
                                f"journaled in {out}; the same command resumes after them")

        written = write_folder(out, [(item, rule) for item in mine], header, workers=workers,
                               shard_windows=shard_windows, prefix=prefix, shard_index=shard_index,
                               num_shards=num_shards, bar=bar, stop=stop)
        bar.close()
    with _folder_lock(out):
        manifest, report = rebuild(out, num_shards)
    this_run = written.results
    statuses = collections.Counter(p.entry["status"] for p in this_run)
    return {"out": str(out), "inputs": len(mine), "already_done": written.already_done,
            "written": statuses["written"], "rejected": statuses["rejected"], "skipped": statuses["skipped"],
            "windows": sum(p.entry["windows"] for p in this_run),
            "hours": sum(p.entry["hours"] for p in this_run if p.entry["status"] == "written"),
            "shards": written.shards, "seconds": time.perf_counter() - tic,
            "prepare_seconds": [p.seconds for p in this_run], "manifest": manifest, "report": report}

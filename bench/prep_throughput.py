"""Throughput of `labram prep` on the bundled real recordings, one worker against N.

    python bench/prep_throughput.py [--workers N] [--copies K]
    python bench/prep_throughput.py --smoke    # seconds: one copy of two recordings, 1 worker against 2

Reads sample_data/eegmat (8 EDF, 500 Hz) and tests/fixtures/eeg (EEGLAB 128 Hz, BrainVision 200 Hz), each
copied K times under different folder names so the job lasts long enough to time, and prints hours of EEG per
minute and per core-minute, seconds per recording, and the N-worker run against the 1-worker run measured here,
in the same process on the same machine. `measure_prep` is importable so other benchmarks (loader, train step)
can put their rates next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.prep import run  # noqa: E402  (the repository is not necessarily installed)

CORPUS = (ROOT / "sample_data" / "eegmat", ROOT / "tests" / "fixtures" / "eeg")


def measure_prep(paths: list[str], workers: int) -> dict:
    """Run `labram prep` on `paths` into a scratch folder; wall time, hours of EEG written and rates."""
    with tempfile.TemporaryDirectory() as out:
        tic = time.perf_counter()
        summary = run(paths, out, workers=workers)
        wall = time.perf_counter() - tic
    recordings = summary["written"] + summary["rejected"] + summary["skipped"]
    minutes = wall / 60
    return {"workers": workers, "recordings": recordings, "written": summary["written"],
            "windows": summary["windows"], "hours": summary["hours"], "wall_s": wall,
            "hours_per_minute": summary["hours"] / minutes,
            "hours_per_core_minute": summary["hours"] / minutes / workers,
            "wall_s_per_recording": wall / recordings,
            "worker_s_per_recording": statistics.fmean(summary["prepare_seconds"])}


def copied_corpus(root: Path, copies: int, only: int | None = None) -> list[str]:
    """`copies` folders holding the corpus files (sidecars included); real copies, since the job reads a file
    reached through two links only once. `only`: the first that many EEGMAT files alone."""
    folders = []
    for copy in range(copies):
        for source in CORPUS[:1] if only else CORPUS:
            folder = root / f"{source.name}-{copy}"
            folder.mkdir()
            for file in sorted(source.iterdir())[:only]:
                shutil.copy(file, folder / file.name)
            folders.append(str(folder))
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="the N to compare with 1 (default: the CPUs this process may use)")
    parser.add_argument("--copies", type=int, default=4, help="times the corpus is repeated (default: 4)")
    parser.add_argument("--smoke", action="store_true", help="a check of the script in seconds: one copy of two "
                        "EEGMAT recordings, 1 worker against 2")
    args = parser.parse_args()
    if args.smoke:
        args.copies, args.workers = 1, 2
    with tempfile.TemporaryDirectory() as scratch:
        paths = copied_corpus(Path(scratch), args.copies, 2 if args.smoke else None)
        # Start the fork server and its imports once, so that neither measured run pays for them.
        measure_prep(paths[:1], 1)
        results = [measure_prep(paths, 1), measure_prep(paths, args.workers)]
    one, many = results
    corpus = "eegmat EDF 500 Hz x 2" if args.smoke else "eegmat EDF 500 Hz x 8, EEGLAB 128 Hz, BrainVision 200 Hz"
    print(f"labram prep on {one['recordings']} recordings ({args.copies} x {corpus}), {one['hours']:.2f} h of EEG, "
          f"{one['windows']} windows; {os.cpu_count()} CPUs")
    print(f"{'workers':>7} {'wall s':>7} {'h EEG/min':>10} {'h EEG/core-min':>15} {'wall s/rec':>11} "
          f"{'worker s/rec':>13}")
    for r in results:
        print(f"{r['workers']:>7} {r['wall_s']:>7.2f} {r['hours_per_minute']:>10.2f} "
              f"{r['hours_per_core_minute']:>15.2f} {r['wall_s_per_recording']:>11.3f} "
              f"{r['worker_s_per_recording']:>13.3f}")
    speedup = many["hours_per_minute"] / one["hours_per_minute"]
    print(f"workers {many['workers']} vs 1: {speedup:.2f}x the hours of EEG per minute, "
          f"{speedup / many['workers']:.2f} parallel efficiency (hours per core-minute ratio)")
    print(json.dumps({"prep": results}))


if __name__ == "__main__":
    main()

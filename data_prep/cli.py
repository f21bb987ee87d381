"""`labram prep`: the command line of the corpus job in data_prep.prep."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Callable

from data_prep.bids import Selection, parse_split_subjects
from data_prep.engine import DEFAULT_SHARD_WINDOWS
from data_prep.plan import Params
from data_prep.prep import run
from labram_jax.configs import MAX_WINDOW_S
from labram_jax.errors import UserError


class UsageError(UserError):
    """A bad combination of flags: printed as one line, exit code 2."""


def _prep_command(args: argparse.Namespace) -> str:
    """The flags that decide the output, in a fixed order: the same job gives the same manifest however its
    flags were ordered or how many workers ran it."""
    words = ["labram", "prep", *args.inputs, "--out", args.out, "--dtype", args.dtype,
             "--notch", f"{args.notch:g}", "--shard-windows", str(args.shard_windows), "--prefix", args.prefix]
    for flag, value in (("--window", args.window), ("--stride", args.stride), ("--dataset", args.dataset),
                        ("--labels", args.labels)):
        if value is not None:
            words += [flag, str(value)]
    if args.num_shards is not None:
        words += ["--num-shards", str(args.num_shards), "--shard-index", str(args.shard_index)]
    for flag, values in (("--task", args.task), ("--subjects", args.subjects), ("--sessions", args.sessions),
                         ("--split-subjects", args.split_subjects)):
        if values:
            words += [flag, *values]
    if args.label_from:
        words += ["--label-from", args.label_from]
    return shlex.join(words)


def prep(args: argparse.Namespace) -> int:
    if (args.num_shards is None) != (args.shard_index is None):
        raise UsageError("--num-shards and --shard-index go together")
    params = Params(window=args.window, stride=args.stride, dtype=args.dtype, notch=args.notch or None)
    bids = Selection(tasks=tuple(args.task or ()), subjects=tuple(args.subjects or ()),
                     sessions=tuple(args.sessions or ()), label_from=args.label_from,
                     split_subjects=parse_split_subjects(args.split_subjects or ()))
    summary = run(args.inputs, args.out, params=params, dataset=args.dataset, labels=args.labels,
                  workers=args.workers, shard_windows=args.shard_windows, num_shards=args.num_shards or 1,
                  shard_index=args.shard_index or 0, prefix=args.prefix, command=_prep_command(args),
                  progress=None if args.quiet else sys.stderr, bids=bids)
    if "splits" in summary["report"]:  # a BIDS dataset with --split-subjects, written as a build
        report = summary["report"]
        splits = ", ".join(f"{split}: {c['files']} recordings, {c['windows']} windows, {c['subjects']} subjects"
                           for split, c in report["splits"].items())
        print(f"{args.out}: {splits}; {report['totals']['rejected']} rejected, {report['totals']['skipped']} "
              f"skipped; see {Path(args.out) / 'report.json'}")
        return _status(report["totals"], args.out)
    totals = summary["report"]["totals"]
    minutes = summary["seconds"] / 60
    print(f"this run: {summary['written']} written, {summary['rejected']} rejected, {summary['skipped']} skipped "
          f"of {summary['inputs'] - summary['already_done']} recordings ({summary['already_done']} done before); "
          f"{summary['windows']} windows, {summary['hours']:.2f} h of EEG in {len(summary['shards'])} shards, "
          f"{summary['seconds']:.1f} s ({summary['hours'] / minutes if minutes else 0:.2f} h of EEG per minute)")
    state = "complete" if summary["report"]["complete"] else (
        f"{len(summary['report']['shard_indices_complete'])} of {summary['report']['num_shards']} shard indices "
        "complete")
    print(f"{args.out}: {totals['written']} recordings written ({totals['windows']} windows, "
          f"{totals['hours_written']:.2f} h), {totals['rejected']} rejected, {totals['skipped']} skipped; {state}; "
          f"see {Path(args.out) / 'report.json'}")
    return _status(totals, args.out)


NOTHING_WRITTEN = 3  # the exit status of a job that wrote no recording: a script must not take it for success


def _status(totals: dict, out: str) -> int:
    if totals["written"]:
        return 0
    print(f"labram prep: no recording written ({totals['rejected']} rejected, {totals['skipped']} skipped; the "
          f"reasons are in {Path(out) / 'report.json'})", file=sys.stderr)
    return NOTHING_WRITTEN


def _int_from(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high if high is not None else ''}")
        return value
    return parse


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "prep", help="EEG recordings -> ArrayRecord shards of LaBraM windows",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Preprocess EEG recordings as the original LaBraM did (the 10-20 channels its pos_embed\n"
                    "knows, 0.1-75 Hz band-pass, notch, 200 Hz, µV) and write windows of 1-s patches\n"
                    "[channels, seconds, 200] to ArrayRecord shards in DIR, with manifest.json and report.json\n"
                    "(every input: written, rejected with its reason, or skipped).",
        epilog="INPUT: files (any format MNE reads: .edf .bdf .gdf .vhdr .set .cnt .fif .mff .eeg ..., and .xdf),\n"
               "folders (searched recursively; every other file is listed in the report as skipped) or glob\n"
               "patterns. A recording that cannot be read, has no mappable channel, holds NaN/Inf, is flat, has\n"
               "an absurd amplitude or is shorter than a window is rejected and the job goes on; exit status 0\n"
               "once every input is accounted for and some recording was written, 3 when none was (every input\n"
               "rejected or skipped: report.json says why).\n"
               "Rerunning the same command resumes an interrupted job, with identical output.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="EEG files, folders or glob patterns")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--window", type=_int_from(1, MAX_WINDOW_S), metavar="SECONDS",
                   help=f"window length, 1..{MAX_WINDOW_S} s (default: per recording, the longest with channels x "
                        "seconds <= 256 within 16 s, as the original chose for pretraining; e.g. 12 s for 20 "
                        "channels). Past 16 s a model needs more time_embed rows than the original's 16: the "
                        "trainer extends them (train.extend_time)")
    p.add_argument("--stride", type=_int_from(1), metavar="SECONDS", help="window step (default: the window)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="sample type in the records (default: float32)")
    p.add_argument("--dataset", metavar="NAME",
                   help="dataset name in the records (default: the folder given as INPUT, or a file's folder)")
    p.add_argument("--labels", metavar="CSV",
                   help="CSV with columns recording,label[,subject]; recording = file stem or path relative to "
                        "its INPUT; label: int (class) or float (target)")
    p.add_argument("--notch", type=float, default=50.0, metavar="HZ",
                   help="mains notch (default: 50, as the original, even on 60 Hz TUH data; use 60 for "
                        "American recordings, 0 for none)")
    p.add_argument("--workers", type=_int_from(1), metavar="N",
                   help="preprocessing processes (default: the CPUs this process may use)")
    p.add_argument("--shard-windows", type=_int_from(1), default=DEFAULT_SHARD_WINDOWS, metavar="N",
                   help=f"close a shard at the first recording boundary with >= N windows (default: "
                        f"{DEFAULT_SHARD_WINDOWS}, <= ~400 MB)")
    p.add_argument("--num-shards", type=_int_from(1), metavar="K",
                   help="split the job K ways: this run takes the recordings at sorted positions p with "
                        "p %% K == --shard-index; runs may share --out")
    p.add_argument("--shard-index", type=_int_from(0), metavar="I", help="which of the K parts, 0..K-1")
    p.add_argument("--prefix", default="windows", help="shard file name prefix (default: windows)")
    bids = p.add_argument_group("BIDS", "when INPUT is one BIDS dataset (a folder with dataset_description.json), "
                                "read through mne-bids; every window records its subject, session, task and run")
    bids.add_argument("--task", nargs="+", metavar="TASK", help="read only these tasks (default: all)")
    bids.add_argument("--subjects", nargs="+", metavar="SUB", help="read only these subjects, e.g. sub-01 02 "
                      "(default: all)")
    bids.add_argument("--sessions", nargs="+", metavar="SES", help="read only these sessions (default: all)")
    bids.add_argument("--label-from", metavar="SOURCE:COLUMN",
                      help="participants:COLUMN labels every window of a subject with its participants.tsv value; "
                           "events:COLUMN cuts windows inside each events.tsv event (--window s every --stride s "
                           "from its onset, at least one) labelled with its value. Text values are classes "
                           "numbered in sorted order (the map is in manifest.json and report.json) "
                           "(default: no labels)")
    bids.add_argument("--split-subjects", nargs="+", metavar="SPLIT=SUB[,SUB]",
                      help="write OUT/{train,val,test}/ as labram build does: e.g. val=sub-03 test=sub-04; the "
                           "other subjects train (default: one folder, no splits)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress line and no line per rejected recording on stderr (report.json has them)")
    p.set_defaults(run=prep)



"""The `labram` command.

    labram demo                        the whole pipeline on the bundled real EEG sample (the README's main job)
    labram prep INPUT... --out DIR     EEG recordings -> ArrayRecord shards of windows
    labram build tuab|tuev|eegmat ROOT OUT   a labelled downstream set with the original's windows and splits
    labram embed CHECKPOINT RECORDING... --out FILE   embeddings per window (and per patch) of your recordings
    labram convert IN OUT              .pth / .safetensors / labram-jax export / braindecode directory

Exit status: 0 done, 2 a usage or input error, 75 stopped by SIGTERM or SIGINT (prep and build; rerun the same
command to resume).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from labram_jax.checkpoint import is_export, load_model, save_model
from labram_jax.checkpoint.export import META
from labram_jax.convert import from_pytorch, kind_of, state_dict, write_pth, write_safetensors
from labram_jax.convert.braindecode import CONFIG as BRAINDECODE_CONFIG
from labram_jax.convert.braindecode import (DEFAULT_N_TIMES, WEIGHTS, TimeEmbeddingWarning, from_braindecode,
                                           to_braindecode)
from labram_jax.convert.state_dict import Model
from labram_jax.errors import UserError, one_line
from labram_jax.preemption import EXIT_CODE, Preempted


class CommandError(UserError):
    """A user-facing failure: printed as one line, exit code 2."""


def _parameter_count(model: Model) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _read_model(source: Path, args: argparse.Namespace) -> Model:
    if source.is_dir():
        if args.num_classes is not None:
            raise CommandError("--num-classes applies only to a .pth or .safetensors input")
        if (source / META).exists():
            model = load_model(source)
        elif (source / BRAINDECODE_CONFIG).exists():
            model = from_braindecode(source)
        else:
            raise CommandError(f"{source}: neither a labram-jax export ({META}) nor a braindecode Labram directory "
                               f"({BRAINDECODE_CONFIG} + {WEIGHTS})")
        if args.kind is not None and args.kind != kind_of(model):
            raise CommandError(f"{source} holds a {kind_of(model)} model, not {args.kind}")
        return model
    if source.is_file():
        return from_pytorch(source, args.kind or "classify", num_classes=args.num_classes)
    raise CommandError(f"{source}: no such file or directory")


def convert(args: argparse.Namespace) -> int:
    source, out = Path(args.input), Path(args.output)
    # Without --to, OUT's suffix decides; an export directory goes back to a .pth, anything else to an export.
    to = args.to or ("safetensors" if out.suffix == ".safetensors" else
                     "pth" if out.suffix == ".pth" or is_export(source) else "export")
    if args.n_times is not None and to != "braindecode":
        raise CommandError("--n-times applies only to --to braindecode")
    n_times = DEFAULT_N_TIMES if args.n_times is None else args.n_times
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TimeEmbeddingWarning)
        model = _read_model(source, args)
        if to == "export":
            out = save_model(model, out)
        elif to == "braindecode":
            out = to_braindecode(model, out, n_times=n_times)
        elif to == "safetensors":
            write_safetensors(out, state_dict(model))
        else:
            write_pth(out, {"model": state_dict(model)})
    for warning in caught:
        if issubclass(warning.category, TimeEmbeddingWarning):
            print(f"labram convert: warning: {one_line(str(warning.message))}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    written = {"export": "a labram-jax export", "pth": "a .pth", "safetensors": "a .safetensors",
               "braindecode": f"braindecode's Labram (n_times={n_times})"}[to]
    print(f"wrote {kind_of(model)} model ({_parameter_count(model):,} parameters) as {written} to {out}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from labram_jax.demo import run

    summary = run(args.out, args.data, steps=args.steps)
    return 0 if summary else 1


def embed(args: argparse.Namespace) -> int:
    from labram_jax.embed import embed as embed_recordings

    result = embed_recordings(args.checkpoint, args.recordings, window=args.window, stride=args.stride,
                              patches=args.patches, notch=args.notch or None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **result)
    windows, dim = result["embeddings"].shape
    print(f"wrote {windows} window embeddings of size {dim} from {len(args.recordings)} recordings"
          + (" with per-patch embeddings" if args.patches else "") + f" to {out}")
    return 0


def build(args: argparse.Namespace) -> int:
    from data_prep import builders

    kwargs = {"workers": args.workers, "notch": args.notch or None}
    if args.seed is not None:
        if args.dataset == "eegmat":
            raise CommandError("eegmat's split is by subject number and takes no --seed")
        kwargs["seed"] = args.seed
    report = getattr(builders, f"build_{args.dataset}")(args.root, args.out, **kwargs)
    print(f"wrote {args.dataset} to {args.out}: {report.get('splits', report)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from data_prep.cli import add_parser as add_prep

    parser = argparse.ArgumentParser(prog="labram", description="LaBraM in JAX/Flax.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("convert", help="weights between .pth/.safetensors, labram-jax exports and braindecode",
                            description="IN is a .pth or .safetensors in the original LaBraM's layout, a "
                                        "labram-jax export directory, or a braindecode Labram directory "
                                        "(config.json + model.safetensors). OUT is written as --to says; "
                                        "without it, OUT ending in .safetensors or .pth gives that file, and "
                                        "otherwise an export directory (a .pth when IN is an export).")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--to", choices=("export", "pth", "safetensors", "braindecode"),
                   help="what to write: a labram-jax export directory, the original's .pth or the same state "
                        "dict as .safetensors, or a directory braindecode's Labram.from_pretrained loads")
    p.add_argument("--kind", choices=("classify", "pretrain", "tokenizer"),
                   help="the model kind in a .pth or .safetensors (default: classify; a pretraining checkpoint "
                        "read as classify keeps its student)")
    p.add_argument("--num-classes", type=int, help="head width when the .pth has another (or none)")
    p.add_argument("--n-times", type=int, metavar="SAMPLES",
                   help="with --to braindecode: the window braindecode's model takes, in samples at 200 Hz "
                        "(default 3000: keeps all 16 time_embed rows; a shorter window drops the rows past it)")
    p.set_defaults(run=convert)

    p = commands.add_parser("demo", help="the whole pipeline on the bundled real EEG sample",
                            description="prep -> tokenizer -> pretraining -> fine-tuning (rest vs mental "
                                        "arithmetic) -> evaluation on a held-out subject -> PyTorch .pth, on the "
                                        "bundled PhysioNet EEGMAT recordings; a few minutes on 2 CPU cores.")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "sample_data" / "eegmat"),
                   help="folder of SubjectNN_{1,2}.edf recordings (default: the bundled sample)")
    p.add_argument("--steps", type=int, default=150, help="training steps per stage (default: 150)")
    p.set_defaults(run=demo)

    add_prep(commands)

    p = commands.add_parser("build", help="TUAB, TUEV or EEGMAT as train/val/test shards",
                            description="Build a labelled set from a local copy of the corpus with the "
                                        "original's windows, channel order, labels and splits.")
    p.add_argument("dataset", choices=("tuab", "tuev", "eegmat"))
    p.add_argument("root", help="the corpus folder (TUAB/TUEV: the folder holding edf/)")
    p.add_argument("out")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--notch", type=float, default=50.0, help="mains notch in Hz (default 50, as the original)")
    p.add_argument("--seed", type=int, help="split seed (TUAB: 12345, TUEV: 4523 as the original)")
    p.set_defaults(run=build)

    p = commands.add_parser("embed", help="embeddings of your recordings from a LaBraM checkpoint",
                            description="Preprocess each recording as the original, cut windows and write "
                                        "fc_norm(mean of patch tokens) per window (and every patch's features "
                                        "with --patches) to an .npz.")
    p.add_argument("checkpoint", help="a .pth (fine-tuning or pretraining) or a labram-jax export")
    p.add_argument("recordings", nargs="+", metavar="RECORDING")
    p.add_argument("--out", required=True, metavar="FILE", help="the .npz to write")
    p.add_argument("--patches", action="store_true", help="also write per-patch embeddings")
    p.add_argument("--window", type=int, help="seconds per window (default: channels x seconds <= 256)")
    p.add_argument("--stride", type=int, help="seconds between windows (default: the window)")
    p.add_argument("--notch", type=float, default=50.0, help="mains notch in Hz (0: none)")
    p.set_defaults(run=embed)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as error:  # bad input; anything else is a bug, and keeps its traceback
        print(f"labram {args.command}: {one_line(error)}", file=sys.stderr)
        return 2
    except Preempted as stop:  # SIGTERM or SIGINT: the work so far is saved, and a rerun resumes
        print(f"labram {args.command}: {stop}", file=sys.stderr)
        return EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())

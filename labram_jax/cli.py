"""The `labram` command.

    labram demo                        the whole pipeline on the bundled real EEG sample (the README's main job)
    labram prep INPUT... --out DIR     EEG recordings -> ArrayRecord shards of windows
    labram build tuab|tuev|eegmat ROOT OUT   a labelled downstream set with the original's windows and splits
    labram train RECIPE --workdir DIR [--data DIR] [--set KEY=VALUE ...]   a recipe by name or file, as experiments/
    labram embed CHECKPOINT RECORDING... --out FILE   embeddings per window (and per patch) of your recordings
    labram convert IN OUT              .pth / .safetensors / labram-jax export / braindecode directory
    labram plot WORKDIR... --out DIR   PNGs of the runs' curves (and a fine-tuning run's ROC and confusion matrix)

Exit status: 0 done, 2 a usage or input error, 75 stopped by SIGTERM or SIGINT (prep, build and train; rerun the
same command to resume). `labram train` exits as experiments/*.py do (labram_jax/train/launch.py).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from labram_jax import __version__
from labram_jax.demo import SAMPLE
from labram_jax.errors import UserError, one_line
from labram_jax.preemption import EXIT_CODE, Preempted

if TYPE_CHECKING:
    from labram_jax.convert.state_dict import Model

# JAX, Flax and the converters are imported by the commands that use them: `labram train` and `labram demo` start
# again with huge pages (launch.rerun_with_huge_pages) before they import JAX, rather than importing it twice.

# One per subcommand, shown by `labram --help`.
EXAMPLES = {
    "convert": "labram convert labram-base.pth labram-base/   (or OUT.safetensors, or --to braindecode)",
    "demo": "labram demo --out demo_out",
    "prep": "labram prep /data/corpus/ --out shards/ --workers 16",
    "build": "labram build eegmat /data/eegmat/ eegmat/",
    "train": "labram train finetune_eegmat --workdir runs/eegmat --data eegmat/ --set init=labram-base.pth",
    "embed": "labram embed labram-base.pth recording.edf --out emb.npz --window 10",
    "plot": "labram plot runs/eegmat runs/eegmat_lora --out plots/",
}


class CommandError(UserError):
    """A user-facing failure: printed as one line, exit code 2."""


def _parameter_count(model: Model) -> int:
    import jax
    from flax import nnx

    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _read_model(source: Path, args: argparse.Namespace) -> Model:
    from labram_jax.checkpoint import load_model
    from labram_jax.checkpoint.export import META
    from labram_jax.convert import from_pytorch, kind_of
    from labram_jax.convert.braindecode import CONFIG as BRAINDECODE_CONFIG
    from labram_jax.convert.braindecode import WEIGHTS, from_braindecode

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
    from labram_jax.checkpoint import is_export, save_model
    from labram_jax.convert import kind_of, original_state_dict, write_pth, write_safetensors
    from labram_jax.convert.braindecode import TimeEmbeddingWarning, n_times_of, to_braindecode

    source, out = Path(args.input), Path(args.output)
    # Without --to, OUT's suffix decides; an export directory goes back to a .pth, anything else to an export.
    to = args.to or ("safetensors" if out.suffix == ".safetensors" else
                     "pth" if out.suffix == ".pth" or is_export(source) else "export")
    if args.n_times is not None and to != "braindecode":
        raise CommandError("--n-times applies only to --to braindecode")
    if args.truncate_time and to not in ("pth", "safetensors"):
        raise CommandError("--truncate-time applies only to a .pth or .safetensors output (the original's layout)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TimeEmbeddingWarning)
        model = _read_model(source, args)
        n_times = n_times_of(model) if args.n_times is None else args.n_times
        if to == "export":
            out = save_model(model, out)
        elif to == "braindecode":
            out = to_braindecode(model, out, n_times=n_times)
        elif to == "safetensors":
            write_safetensors(out, original_state_dict(model, truncate_time=args.truncate_time))
        else:
            write_pth(out, {"model": original_state_dict(model, truncate_time=args.truncate_time)})
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


def plot(args: argparse.Namespace) -> int:
    from labram_jax import plots

    written = plots.write([Path(w) for w in args.workdirs], Path(args.out))
    print(f"wrote {len(written)} plots to {args.out}: {', '.join(p.name for p in written)}")
    return 0


def embed(args: argparse.Namespace) -> int:
    import numpy as np

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


def train(args: argparse.Namespace) -> int:
    from labram_jax import recipes
    from labram_jax.train import launch

    return launch.run(recipes.load(args.recipe), args)


class _ListRecipes(argparse.Action):
    """--list prints the recipes and exits before the required arguments are checked, as --help does."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_) -> None:
        from labram_jax import recipes

        for name, summary in recipes.available().items():
            print(f"{name:<16} {summary}")
        parser.exit()


def build(args: argparse.Namespace) -> int:
    from data_prep import builders

    kwargs = {"workers": args.workers, "notch": args.notch or None, "progress": None if args.quiet else sys.stderr}
    if args.seed is not None:
        if args.dataset == "eegmat":
            raise CommandError("eegmat's split is by subject number and takes no --seed")
        kwargs["seed"] = args.seed
    report = getattr(builders, f"build_{args.dataset}")(args.root, args.out, **kwargs)
    print(f"wrote {args.dataset} to {args.out}: {report.get('splits', report)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from data_prep.cli import add_parser as add_prep
    from labram_jax.train import launch

    parser = argparse.ArgumentParser(prog="labram", description="LaBraM in JAX/Flax.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("convert", help="weights between .pth/.safetensors, labram-jax exports and braindecode",
                            description="IN is a .pth or .safetensors in the original LaBraM's layout, a "
                                        "labram-jax export directory, or a braindecode Labram directory "
                                        "(config.json + model.safetensors). OUT is written as --to says; "
                                        "without it, OUT ending in .safetensors or .pth gives that file, and "
                                        "otherwise an export directory (a .pth when IN is an export).")
    p.add_argument("input", metavar="IN", help="a .pth, .safetensors, labram-jax export or braindecode directory")
    p.add_argument("output", metavar="OUT", help="the file or directory to write")
    p.add_argument("--to", choices=("export", "pth", "safetensors", "braindecode"),
                   help="what to write: a labram-jax export directory, the original's .pth or the same state "
                        "dict as .safetensors, or a directory braindecode's Labram.from_pretrained loads "
                        "(default: from OUT's suffix)")
    p.add_argument("--kind", choices=("classify", "pretrain", "tokenizer"),
                   help="the model kind in a .pth or .safetensors (default: classify; a pretraining checkpoint "
                        "read as classify keeps its student)")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="head width when the .pth has another (or none) (default: the .pth's)")
    p.add_argument("--n-times", type=int, metavar="SAMPLES",
                   help="with --to braindecode: the window braindecode's model takes, in samples at 200 Hz "
                        "(default: all of the model's time_embed rows, 3000 for the original's 16; a shorter "
                        "window drops the rows past it)")
    p.add_argument("--truncate-time", action="store_true",
                   help="with a .pth or .safetensors output: a model with more than the original's 16 time_embed "
                        "rows (trained on windows past 16 s) keeps its first 16, so the original loads it "
                        "(default: such a model is refused)")
    p.set_defaults(run=convert)

    p = commands.add_parser("demo", help="the whole pipeline on the bundled real EEG sample",
                            description="prep -> tokenizer -> pretraining -> fine-tuning (rest vs mental "
                                        "arithmetic) -> evaluation on a held-out subject -> PyTorch .pth, on the "
                                        "bundled PhysioNet EEGMAT recordings; a few minutes on 2 CPU cores.")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output directory (default: demo_out)")
    p.add_argument("--data", default=str(SAMPLE), metavar="DIR",
                   help="folder of SubjectNN_{1,2}.edf recordings (default: the bundled sample)")
    p.add_argument("--steps", type=int, default=150, metavar="N",
                   help="pretraining steps; the tokenizer the same, fine-tuning 2/3 of them (default: 150)")
    p.set_defaults(run=demo)

    add_prep(commands)

    p = commands.add_parser("build", help="TUAB, TUEV or EEGMAT as train/val/test shards",
                            description="Build a labelled set from a local copy of the corpus with the "
                                        "original's windows, channel order, labels and splits.")
    p.add_argument("dataset", choices=("tuab", "tuev", "eegmat"), help="which corpus")
    p.add_argument("root", help="the corpus folder (TUAB/TUEV: the folder holding edf/)")
    p.add_argument("out", help="output folder: train/, val/, test/ shards and report.json")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="preprocessing processes (default: 1)")
    p.add_argument("--notch", type=float, default=50.0, metavar="HZ",
                   help="mains notch (default: 50, as the original; 0: none)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="split seed (default: TUAB 12345, TUEV 4523, as the original)")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.set_defaults(run=build)

    p = commands.add_parser("train", help="a recipe by name (labram train --list) or from a file",
                            description="Train with one of the paper's recipes, or a file of your own with a "
                                        "config() returning an Experiment; the same flags and behaviour as "
                                        "experiments/NAME.py.")
    p.add_argument("recipe", metavar="RECIPE", help="a recipe's name (see --list) or the path of a recipe file")
    p.add_argument("--list", action=_ListRecipes, help="print the recipes, one line each, and exit")
    launch.parser("", p)
    p.set_defaults(run=train)

    p = commands.add_parser("embed", help="embeddings of your recordings from a LaBraM checkpoint",
                            description="Preprocess each recording as the original, cut windows and write "
                                        "fc_norm(mean of patch tokens) per window (and every patch's features "
                                        "with --patches) to an .npz.")
    p.add_argument("checkpoint", help="a .pth (fine-tuning or pretraining) or a labram-jax export")
    p.add_argument("recordings", nargs="+", metavar="RECORDING", help="EEG files (any format MNE reads)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .npz to write")
    p.add_argument("--patches", action="store_true", help="also write per-patch embeddings")
    p.add_argument("--window", type=int, metavar="SECONDS",
                   help="window length (default: the longest with channels x seconds <= 256)")
    p.add_argument("--stride", type=int, metavar="SECONDS", help="step between windows (default: the window)")
    p.add_argument("--notch", type=float, default=50.0, metavar="HZ", help="mains notch (default: 50; 0: none)")
    p.set_defaults(run=embed)

    p = commands.add_parser("plot", help="PNGs of the curves of one or several training runs",
                            description="From each WORKDIR's metrics.jsonl: loss, lr, grad norm, codebook usage "
                                        "and perplexity, masked-token accuracy and the validation metrics against "
                                        "steps, one line per run; from a fine-tuning run's test outputs "
                                        "(outputs/test.npz, outputs/best_test.npz) the ROC curve and the "
                                        "confusion matrix. Only the plots some run has data for.")
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="the workdirs of one or more training runs")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs (created if missing)")
    p.set_defaults(run=plot)

    parser.epilog = "examples:\n" + "\n".join(f"  {EXAMPLES[name]}" for name in commands.choices
                                               if name in EXAMPLES)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if argv is None and args.command in ("train", "demo"):
        from labram_jax.train.launch import rerun_with_huge_pages

        rerun_with_huge_pages()
    if args.command in ("demo", "embed"):  # `train` turns it on in launch.run, after the device setup
        from labram_jax import compile_cache

        compile_cache.enable()
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

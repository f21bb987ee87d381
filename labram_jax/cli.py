"""The `labram` command: `labram convert` (PyTorch .pth <-> labram-jax export) and `labram demo`."""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from labram_jax import configs
from labram_jax.checkpoint import is_export, load_model, save_model
from labram_jax.convert import from_pytorch, task_of, to_pytorch
from labram_jax.convert.state_dict import Model
from labram_jax.models.labram import LaBraM
from labram_jax.models.vqnsp import VQNSP

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data" / "eegmat"
DEMO_SECONDS = 4
DEMO_BATCH = 32


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _parameter_count(model: Model) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def convert(args: argparse.Namespace) -> int:
    source, out = Path(args.input), Path(args.output)
    if source.is_dir():
        if args.num_classes is not None:
            raise CommandError("--num-classes applies only to a .pth input")
        model = load_model(source)
        if args.task is not None and args.task != task_of(model):
            raise CommandError(f"{source} holds a {task_of(model)} model, not {args.task}")
        to_pytorch(model, out)
    elif source.is_file():
        model = from_pytorch(source, args.task or "classify", num_classes=args.num_classes)
        out = save_model(model, out)
    else:
        raise CommandError(f"{source}: no such file or directory")
    print(f"wrote {task_of(model)} model ({_parameter_count(model):,} parameters) to {out}")
    return 0


def _recording_label(path: Path) -> tuple[int, int]:
    """(subject, label) from eegmat names `SubjectNN_1` (rest, 0) / `SubjectNN_2` (task, 1); (-1, -1) otherwise."""
    match = re.fullmatch(r"Subject(\d+)_([12])", path.stem)
    return (int(match[1]), int(match[2]) - 1) if match else (-1, -1)


def _load_windows(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Model inputs [W, N, 4, 200], labels, subjects, input_chans and channel names of every EDF under `data`."""
    from data_prep import preprocess, read_recording, to_model_input, windows  # MNE: slow import convert skips

    paths = sorted(data.glob("*.edf"))
    if not paths:
        raise CommandError(f"{data}: no .edf recordings")
    xs, labels, subjects, montage = [], [], [], None
    for path in paths:
        recording = preprocess(read_recording(path), source=str(path))
        if montage is None:
            montage = recording.channels
        elif recording.channels.rows != montage.rows:
            raise CommandError(f"{path}: channels {recording.channels.names} differ from {montage.names}; "
                               "the demo needs one montage")
        w = windows(recording.signal, DEMO_SECONDS)
        subject, label = _recording_label(path)
        print(f"  {path.name}: {len(recording.channels.names)} channels kept, dropped "
              f"{', '.join(recording.channels.dropped) or 'none'}; {recording.duration:.1f} s -> {len(w)} windows")
        xs.append(to_model_input(w))
        labels += [label] * len(w)
        subjects += [subject] * len(w)
    x = np.concatenate(xs)
    if not len(x):
        raise CommandError(f"{data}: no recording is {DEMO_SECONDS} s long")
    return x, np.asarray(labels, np.int32), np.asarray(subjects, np.int32), montage.input_chans, montage.names


def _batched(fn: Callable, state: nnx.State, x: np.ndarray, chans: np.ndarray) -> list[np.ndarray]:
    """fn(state, batch, chans) over x in fixed-size batches (the last one padded, so it compiles once)."""
    outs = []
    for start in range(0, len(x), DEMO_BATCH):
        batch = x[start:start + DEMO_BATCH]
        padded = np.concatenate([batch, np.zeros((DEMO_BATCH - len(batch),) + batch.shape[1:], batch.dtype)])
        result = fn(state, jnp.asarray(padded), chans)
        outs.append([np.asarray(r)[:len(batch)] for r in (result if isinstance(result, tuple) else (result,))])
    return [np.concatenate(parts) for parts in zip(*outs)]


def demo(args: argparse.Namespace) -> int:
    out, data = Path(args.out), Path(args.data)
    start = time.perf_counter()
    print(f"a. preprocessing {data} (0.1-75 Hz band-pass, 50 Hz notch, 200 Hz, µV)")
    x, labels, subjects, input_chans, names = _load_windows(data)
    n, a = x.shape[1], x.shape[2]
    print(f"b. {len(x)} windows of {n} channels x {a} s = {n * a} tokens ({', '.join(names)}); input = µV / 100")

    print("c. LaBraM-Base classifier (1 logit) and VQ-NSP base tokenizer: FRESHLY INITIALISED weights "
          "(no pretrained weights ship with labram-jax, and training lands later), so outputs show the "
          "pipeline, not EEG knowledge")
    model = LaBraM(configs.base(num_classes=1), rngs=nnx.Rngs(0))
    # kmeans_init=False: an un-initted codebook is all zeros until k-means runs on a training batch; a fresh
    # random unit codebook is what an untrained tokenizer can meaningfully tokenize with.
    tokenizer = VQNSP(configs.tokenizer_base(kmeans_init=False), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state: nnx.State, x: jax.Array, chans: jax.Array) -> tuple[jax.Array, jax.Array]:
        net = nnx.merge(graphdef, state)
        features = net.features(x, chans)
        return features, net.head(features)

    chans = jnp.asarray(input_chans)
    _batched(forward, state, x[:DEMO_BATCH], chans)  # compile outside the timed pass
    tic = time.perf_counter()
    features, logits = _batched(forward, state, x, chans)
    throughput = len(x) / (time.perf_counter() - tic)

    out.mkdir(parents=True, exist_ok=True)
    pth, export = out / "labram_base.pth", out / "labram_base_export"
    if is_export(export):  # the previous demo run's own output
        shutil.rmtree(export)
    to_pytorch(model, pth)
    from_pth = from_pytorch(pth, "classify")
    save_model(from_pth, export)
    reloaded = load_model(export)
    mismatched = [name for name, m in (("from .pth", from_pth), ("from export", reloaded))
                  if nnx.graphdef(m) != graphdef
                  or not np.array_equal(_batched(forward, nnx.state(m), x, chans)[1], logits)]
    print(f"d. round trip model -> {pth.name} -> model -> {export.name}/ -> model: logits on all windows "
          + (f"DIFFER ({', '.join(mismatched)})" if mismatched else "identical"))

    tgraph, tstate = nnx.split(tokenizer)
    tokenize = jax.jit(lambda state, x, chans: nnx.merge(tgraph, state).tokenize(x, chans))
    (tokens,) = _batched(tokenize, tstate, x, chans)
    np.savez(out / "embeddings.npz", features=features, logits=logits, tokens=tokens.astype(np.int32),
             labels=labels, subjects=subjects, input_chans=input_chans, channels=np.asarray(names))
    print(f"e. jitted forward on {len(x)} windows; tokenized with the {tokenizer.cfg.codebook_size}-code tokenizer")
    print(f"f. summary: {len(x)} windows ({int((labels == 0).sum())} rest, {int((labels == 1).sum())} task, "
          f"{len(set(subjects.tolist()))} subjects), {n * a} tokens per window, forward {throughput:.1f} windows/s "
          f"on {jax.devices()[0].platform}, {len(np.unique(tokens))} distinct token ids; "
          f"wrote {out / 'embeddings.npz'}, {pth}, {export}/ in {time.perf_counter() - start:.1f} s")
    return 1 if mismatched else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labram", description="LaBraM in JAX/Flax.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("convert", help="PyTorch .pth -> labram-jax export directory, or back",
                            description="IN is a .pth (written by the original LaBraM code) or a labram-jax "
                                        "export directory; the other kind is written to OUT.")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--task", choices=("classify", "pretrain", "tokenizer"),
                   help="model kind in a .pth (default: classify)")
    p.add_argument("--num-classes", type=int, help="head width when the .pth has another (or none)")
    p.set_defaults(run=convert)
    p = commands.add_parser("demo", help="run the pipeline on the bundled real EEG sample",
                            description="Preprocess the bundled PhysioNet EEG sample, round-trip LaBraM-Base "
                                        "weights through .pth and export, embed and tokenize every window.")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--data", default=str(SAMPLE_DATA), help="directory of .edf recordings (default: the bundled "
                                                             "sample_data/eegmat)")
    p.set_defaults(run=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (CommandError, ValueError, OSError) as error:
        print(f"labram {args.command}: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

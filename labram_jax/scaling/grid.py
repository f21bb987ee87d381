"""A scaling-law grid: model sizes x nested data subsets, each point one pretraining run on the one trainer.

Every point trains the masked-code objective against the same frozen tokenizer (trained once, or given), on a
subset of the training recordings, for a token budget of `epochs` passes over that subset, with the held-out loss
measured at the same token intervals on the same recordings with the same masks (the pretraining stage's fixed
evaluation mask) for every point. A point's workdir is an ordinary trainer workdir, so a rerun resumes it from
its checkpoints; a finished point leaves result.json and is skipped.

Layout of a grid's workdir:
  data/                 the bundled-sample route only: EEGMAT built into train/ and val/ shards
  subsets/, eval/       nested training subsets (increment folders) and the fixed evaluation recordings
  tokenizer/            the grid's one tokenizer, when the config trains it
  flops/SIZE.json       XLA's count of a compiled step, once per model size
  points/NNN-SIZE-Hh/   one trainer workdir per point, with scaling.jsonl, sessions.jsonl and result.json
  results.csv           one row per finished point (RESULT_COLUMNS)
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

from labram_jax.errors import UserError
from labram_jax.files import write_json
from labram_jax.scaling.subsets import Subset, nested_subsets
from labram_jax.train.config import Experiment

# Params of the embeddings and the output head, left out of the non-embedding count (as Kaplan et al. leave out
# token and position embeddings): the patch embedding, position and time tables, cls and mask tokens, lm_head.
EMBEDDING = ("patch_embed", "pos_embed", "time_embed", "cls_token", "mask_token", "lm_head")
# Parameters the masked-code loss never reads (kept for the original's checkpoint layout), left out of all counts.
UNUSED = (("student", "lm_head"), ("projection_head",))
RESULT_COLUMNS = ("point", "size", "params", "non_embedding_params", "hours", "tokens", "hours_seen", "examples",
                  "steps", "loss", "best_loss", "train_loss", "flops", "xla_flops", "flops_ratio", "wall_s",
                  "device_kind", "device_count", "device_hours", "seed", "workdir")


@dataclasses.dataclass(frozen=True)
class Rung:
    width: int  # embed_dim; a multiple of 100 (TemporalConv: 25 steps x out_chans, 4 GroupNorm groups)
    depth: int
    heads: int
    mlp_ratio: float = 4.0


# By nominal size (the paper's count: the Transformer without the pretraining head). The CSV has exact counts.
LADDER: dict[str, Rung] = {
    "0.1M": Rung(100, 1, 5, mlp_ratio=2.0), "0.25M": Rung(100, 2, 5), "0.5M": Rung(100, 4, 5),
    "1.5M": Rung(100, 12, 5), "5.8M": Rung(200, 12, 10), "20M": Rung(300, 18, 12), "46M": Rung(400, 24, 16),
    "120M": Rung(600, 28, 12), "369M": Rung(800, 48, 16),
}


@dataclasses.dataclass(frozen=True)
class GridConfig:
    pretrain: Experiment  # every point's recipe (optimiser, batch, window shape); model width/depth from LADDER
    tokenizer: Experiment  # trained once on all the training data, unless tokenizer_checkpoint is given
    sizes: tuple[str, ...] = ("0.5M", "1.5M", "5.8M", "20M", "46M")
    hours: tuple[float, ...] = (10.0, 100.0, 1000.0)  # nested training subsets, at least this much EEG each
    epochs: float = 1.0  # a point's token budget: this many passes over its subset
    warmup: float = 0.1  # share of a point's steps
    eval_tokens: int = 0  # held-out loss every this many (padded) tokens; 0: only at the end
    eval_hours: float = 0.0  # the evaluation recordings: 0 = all validation data, else a fixed subset
    tokenizer_checkpoint: str = ""  # a trained tokenizer (.pth or export); its config goes in pretrain.tokenizer
    # "shards": --data holds train/ and val/ shard folders; "eegmat": --data is a folder of EEGMAT EDFs, built as
    # the demo builds the bundled sample (5 s windows), the last subject held out for evaluation.
    source: Literal["shards", "eegmat"] = "shards"
    save_every: int = 500  # checkpoint interval of a point, in steps
    seed: int = 0

    def replace(self, **changes: Any) -> "GridConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Point:
    index: int
    size: str
    hours: float

    @property
    def name(self) -> str:
        return f"{self.index:03d}-{self.size}-{self.hours:g}h"


def points(grid: GridConfig) -> list[Point]:
    unknown = [s for s in grid.sizes if s not in LADDER]
    if unknown:
        raise UserError(f"unknown sizes {unknown}; the ladder has {', '.join(LADDER)}")
    return [Point(i * len(grid.hours) + j, size, hours)
            for i, size in enumerate(grid.sizes) for j, hours in enumerate(grid.hours)]


def model_config(grid: GridConfig, size: str):
    r = LADDER[size]
    vocab = grid.tokenizer.tokenizer.codebook_size if not grid.tokenizer_checkpoint else \
        grid.pretrain.tokenizer.codebook_size
    return grid.pretrain.model.replace(embed_dim=r.width, depth=r.depth, num_heads=r.heads, mlp_ratio=r.mlp_ratio,
                                       out_chans=r.width // 25, vocab_size=vocab)


def parameter_counts(model_cfg) -> tuple[int, int]:
    """(total, non-embedding) parameters the masked-code loss trains, from shapes only (nothing allocated)."""
    from flax import nnx

    from labram_jax.models.labram import LaBraMForMEM

    model = nnx.eval_shape(lambda: LaBraMForMEM(model_cfg, rngs=nnx.Rngs(0)))
    total = embedding = 0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if any(path[:len(u)] == u for u in UNUSED):
            continue
        size = math.prod(variable.get_value().shape)
        total += size
        embedding += size if any(p in EMBEDDING for p in path) else 0
    return total, total - embedding


# -- preparation ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Prepared:
    subsets: tuple[Subset, ...]  # one per grid.hours
    eval: tuple[str, ...]  # evaluation shard folders
    tokenizer: str  # the tokenizer every point predicts


def _eegmat_splits(folder: Path) -> dict[str, list[int]]:
    from data_prep.builders.eegmat import FILE_NAME

    subjects = sorted({int(m.group(1)) for p in folder.iterdir() if (m := FILE_NAME.match(p.name))})
    if len(subjects) < 2:
        raise UserError(f"{folder}: needs EEGMAT files of at least 2 subjects (SubjectNN_1.edf, ...), "
                        f"found {len(subjects)}")
    return {"train": subjects[:-1], "val": subjects[-1:]}


def _folders(grid: GridConfig, workdir: Path, data: list[str]) -> tuple[list[str], list[str]]:
    """The training and validation shard folders of --data (built first on the EEGMAT route)."""
    if grid.source == "eegmat":
        from data_prep.builders import build_eegmat
        from labram_jax.demo import SAMPLE, SECONDS

        raw = Path(data[0] if data else SAMPLE)
        built = workdir / "data"
        if not (built / "val" / "manifest.json").exists():
            build_eegmat(raw, built, seconds=SECONDS, splits=_eegmat_splits(raw))
        data = [str(built)]
    from labram_jax.train.launch import _split_folders

    if not data:
        raise UserError("the grid needs --data: a folder with train/ and val/ shard folders")
    split = _split_folders(data, grid.pretrain).data
    if not split.val:
        raise UserError(f"{', '.join(data)}: no val/ folder; the grid measures held-out loss on it")
    return list(split.train), list(split.val)


def prepare(grid: GridConfig, workdir: str | os.PathLike, data: list[str]) -> Prepared:
    """Data subsets, evaluation set and tokenizer, made once per grid (a rerun reuses them). Every process calls
    it: process 0 writes the data, and all of them train the tokenizer together."""
    import jax
    from jax.experimental import multihost_utils

    from labram_jax.train.launch import resolve_epochs
    from labram_jax.train.trainer import Trainer

    workdir = Path(workdir)
    if jax.process_index() == 0:
        train, val = _folders(grid, workdir, data)
        nested_subsets(train, grid.hours, workdir / "subsets", seed=grid.seed)
        if grid.eval_hours:
            nested_subsets(val, [grid.eval_hours], workdir / "eval", seed=grid.seed)
    multihost_utils.sync_global_devices("scaling grid data")
    train, val = _folders(grid, workdir, data)
    subsets = tuple(nested_subsets(train, grid.hours, workdir / "subsets", seed=grid.seed))
    held_out = nested_subsets(val, [grid.eval_hours], workdir / "eval", seed=grid.seed)[0].folders \
        if grid.eval_hours else tuple(val)
    tokenizer = grid.tokenizer_checkpoint
    if not tokenizer:
        tokenizer = str(workdir / "tokenizer" / "export")
        if not Path(tokenizer).exists():
            exp = grid.tokenizer.replace(data=dataclasses.replace(grid.tokenizer.data, train=tuple(train), val=(),
                                                                  test=()))
            Trainer(resolve_epochs(exp), workdir / "tokenizer").train()  # a recipe's epochs of all the data
    return Prepared(subsets=subsets, eval=tuple(held_out), tokenizer=tokenizer)


# -- one point --------------------------------------------------------------------------------------------------
def tokens_per_step(exp: Experiment) -> int:
    return exp.train.batch_size * exp.data.max_channels * exp.data.max_patches


def point_experiment(grid: GridConfig, point: Point, prepared: Prepared) -> Experiment:
    """The point's pretraining run: the recipe with the rung's model, its subset and its budget."""
    from labram_jax.train.launch import epoch_rows

    subset = prepared.subsets[grid.hours.index(point.hours)]
    base, t = grid.pretrain, grid.pretrain.train
    eval_every = max(1, round(grid.eval_tokens / tokens_per_step(base))) if grid.eval_tokens else 0
    tokenizer = grid.pretrain.tokenizer if grid.tokenizer_checkpoint else grid.tokenizer.tokenizer
    exp = base.replace(
        model=model_config(grid, point.size), tokenizer=tokenizer, tokenizer_checkpoint=prepared.tokenizer,
        data=dataclasses.replace(base.data, train=subset.folders, val=prepared.eval, test=(), weights=()),
        train=dataclasses.replace(t, seed=grid.seed))
    rows = epoch_rows(exp) if exp.data.pack_tokens else subset.windows  # packed: rows of several windows
    steps = max(1, math.ceil(grid.epochs * rows / t.batch_size))
    return exp.replace(train=dataclasses.replace(exp.train, steps=steps, warmup_steps=int(grid.warmup * steps),
                                                 epochs=0.0, warmup_epochs=0.0, eval_every=eval_every,
                                                 save_every=grid.save_every))


def _xla_step_flops(trainer, cache: Path) -> float | None:
    """XLA's FLOPs of one compiled step over all devices, compiled once per model size."""
    import jax

    if cache.exists():
        return json.loads(cache.read_text())["xla_step_flops"]
    per_device = trainer.step_flops()
    total = per_device * jax.device_count() if per_device else None
    if jax.process_index() == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, {"xla_step_flops": total}, indent=None)
    return total


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wall_seconds(sessions: list[dict], metrics: list[dict], end: float) -> float:
    """Seconds spent on the point over all its sessions; a killed session counts up to its last logged record."""
    starts = [s["start"] for s in sessions] + [end]
    total = 0.0
    for start, following in zip(starts, starts[1:]):
        last = max([r["time"] for r in metrics if start <= r["time"] < following], default=start)
        total += (following if following == end else last) - start
    return total


def run_point(grid: GridConfig, index: int, workdir: str | os.PathLike, data: list[str]) -> dict[str, Any]:
    """Train point `index` (resuming it if a checkpoint exists) and write its result; a finished point is read."""
    import jax

    from labram_jax.train.flops import step_flops
    from labram_jax.train.trainer import Trainer

    workdir = Path(workdir)
    grid_points = points(grid)
    if not 0 <= index < len(grid_points):
        raise UserError(f"point {index} is not in the grid (points 0-{len(grid_points) - 1})")
    point = grid_points[index]
    pdir = workdir / "points" / point.name
    if (pdir / "result.json").exists():
        return json.loads((pdir / "result.json").read_text())
    prepared = prepare(grid, workdir, data)
    exp = point_experiment(grid, point, prepared)
    pdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        with open(pdir / "sessions.jsonl", "a") as f:
            f.write(json.dumps({"start": time.time()}) + "\n")
    trainer = Trainer(exp, pdir)
    xla = _xla_step_flops(trainer, workdir / "flops" / f"{point.size}.json")
    summary = trainer.train()
    row = _result(grid, point, exp, prepared, pdir, xla, summary, step_flops(exp))
    if jax.process_index() == 0:
        write_json(pdir / "result.json", row)
    return row


def _result(grid: GridConfig, point: Point, exp: Experiment, prepared: Prepared, pdir: Path,
            xla_step: float | None, summary: dict, analytic_step: float) -> dict[str, Any]:
    import jax

    subset = prepared.subsets[grid.hours.index(point.hours)]
    metrics = _records(pdir / "metrics.jsonl")
    # by step (a resume logs some twice: the last wins), with the real windows and tokens seen by then
    held_out = {r["step"]: r for r in metrics if r.get("val/loss") is not None}
    steps = exp.train.steps
    seen = held_out[steps]
    params, non_embedding = parameter_counts(exp.model)
    wall = _wall_seconds(_records(pdir / "sessions.jsonl"), metrics, time.time())
    devices = jax.device_count()
    row = {"point": point.index, "size": point.size, "params": params, "non_embedding_params": non_embedding,
           "hours": subset.hours, "tokens": seen["tokens_seen"],
           "hours_seen": seen["windows_seen"] * subset.hours / subset.windows, "examples": seen["windows_seen"],
           "steps": steps, "loss": seen["val/loss"], "best_loss": min(r["val/loss"] for r in held_out.values()),
           "train_loss": summary.get("loss"),
           "flops": analytic_step * steps, "xla_flops": xla_step * steps if xla_step else None,
           "flops_ratio": analytic_step / xla_step if xla_step else None, "wall_s": wall,
           "device_kind": jax.devices()[0].device_kind, "device_count": devices,
           "device_hours": wall * devices / 3600, "seed": exp.train.seed, "workdir": str(pdir)}
    if jax.process_index() == 0:
        with open(pdir / "scaling.jsonl", "w") as f:
            for step, r in sorted(held_out.items()):
                f.write(json.dumps({"event": "eval", "step": step, "examples": r["windows_seen"],
                                    "tokens": r["tokens_seen"], "loss": r["val/loss"]}) + "\n")
            f.write(json.dumps({"event": "result", **row, "config": dataclasses.asdict(exp)}, default=str) + "\n")
    return row


# -- the whole grid ---------------------------------------------------------------------------------------------
def collect(grid: GridConfig, workdir: str | os.PathLike) -> Path:
    """results.csv from every finished point, in grid order."""
    workdir = Path(workdir)
    rows = [json.loads(p.read_text()) for point in points(grid)
            if (p := workdir / "points" / point.name / "result.json").exists()]
    path = workdir / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if row[k] is None else row[k]) for k in RESULT_COLUMNS} for row in rows)
    return path


def describe(grid: GridConfig) -> list[str]:
    """One line per point, for --list."""
    counts = {size: parameter_counts(model_config(grid, size)) for size in grid.sizes}
    lines = []
    for p in points(grid):
        (total, non_embedding), r = counts[p.size], LADDER[p.size]
        lines.append(f"{p.index}\t{p.name}\t{r.width}x{r.depth}\tparams {total:,} (non-embedding "
                     f"{non_embedding:,})\t>= {p.hours:g} h\t{grid.epochs:g} epochs")
    return lines


def run_grid(grid: GridConfig, workdir: str | os.PathLike, data: list[str], *, fit: bool = True) -> Path:
    """Every point not yet finished, in order (each resumes from its checkpoints), then results.csv and, with at
    least 6 finished points, the fit and its plots in workdir/fit."""
    import jax

    workdir = Path(workdir)
    prepare(grid, workdir, data)
    for point in points(grid):
        done = (workdir / "points" / point.name / "result.json").exists()
        print(f"point {point.index} {point.name}: {'finished, skipped' if done else 'running'}", flush=True)
        run_point(grid, point.index, workdir, data)
    if jax.process_index() != 0:
        return workdir / "results.csv"
    results = collect(grid, workdir)
    finished = len(results.read_text().splitlines()) - 1
    if fit and finished >= 6:
        from labram_jax.scaling.fit import fit_results, summary

        print(summary(fit_results(results, workdir / "fit"), workdir / "fit"))
    return results

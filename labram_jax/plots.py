"""PNG plots of training runs: `labram plot WORKDIR... --out DIR`.

From each workdir's metrics.jsonl, one figure per curve against steps, with one line per run that logged it: the
training loss, lr, grad norm, codebook usage and perplexity (tokenizer), masked-token accuracy (pretraining), then
every validation metric. From a fine-tuning run's evaluation outputs (labram_jax.train.outputs: the final test
evaluation, and that of the best checkpoint) the ROC curve (one-vs-rest per class for multi-class tasks) and the
confusion matrix. A figure is made only where some run has its data.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.special import softmax  # noqa: E402

from labram_jax.errors import UserError  # noqa: E402
from labram_jax.train import metrics as paper_metrics  # noqa: E402
from labram_jax.train import outputs  # noqa: E402

Series = tuple[np.ndarray, np.ndarray]  # steps, values
# The training curves in the order they are drawn, with their axis labels.
CURVES = {"loss": "training loss", "lr": "learning rate", "grad_norm": "gradient norm (before clipping)",
          "codebook_usage": "codebook usage (share of the codes, a pass of the training windows)",
          "codebook_perplexity": "codebook perplexity (a pass of the training windows)",
          "batch_codebook_usage": "codebook usage (share of the codes in a batch)",
          "batch_codebook_perplexity": "codebook perplexity (a batch)", "masked_accuracy": "masked-token accuracy"}
# The evaluations whose per-window outputs the trainer writes.
EVALUATIONS = {"test": "test split, final model", "best_test": "test split, best validation checkpoint"}


def read_metrics(workdir: Path) -> dict[str, Series]:
    """Every numeric key of a run's metrics.jsonl as (steps, values), by step; a step logged twice (a resumed
    run logs again the steps after its last checkpoint) keeps its last value. A null (a non-finite value) is nan."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{workdir}: no metrics.jsonl (not a training workdir)")
    text = path.read_text()
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        lines = lines[:-1]  # a run still writing: its last line is not complete yet
    by_key: dict[str, dict[int, float]] = {}
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise UserError(f"{path}:{number}: not a metrics record (a JSON object with a step)") from None
        for key, value in record.items():
            if key not in ("step", "time") and (value is None or isinstance(value, (int, float))):
                by_key.setdefault(key, {})[step] = np.nan if value is None else float(value)
    return {key: (np.array(sorted(values)), np.array([values[s] for s in sorted(values)]))
            for key, values in by_key.items()}


def run_labels(workdirs: Sequence[Path]) -> list[str]:
    """Each run's name in the legends: its path below the workdirs' common folder (one run: its folder's name)."""
    paths = [Path(w).resolve() for w in workdirs]
    if len(set(paths)) < len(paths):
        raise UserError(f"a workdir is given twice: {', '.join(map(str, workdirs))}")
    if len(paths) == 1:
        return [paths[0].name]
    root = Path(os.path.commonpath(paths))
    return [str(p.relative_to(root)) for p in paths]


def curve(key: str, runs: dict[str, dict[str, Series]]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for color, (label, series) in enumerate(runs.items()):
        if key in series:
            steps, values = series[key]
            # Evaluations are a few points: markers show where they were measured.
            ax.plot(steps, values, color=f"C{color % 10}", label=label, lw=1.2,
                    marker="o" if len(steps) <= 20 else None, ms=3)
    split, _, name = key.rpartition("/")
    ax.set(xlabel="step", ylabel=CURVES.get(key, name),
           title=f"{'validation ' if split == 'val' else ''}{CURVES.get(key, name)}")
    if key == "grad_norm":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def roc(split: str, evaluations: dict[str, dict]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1, label="_chance")
    for number, (label, out) in enumerate(evaluations.items()):
        if out["kind"] == "binary":
            fpr, tpr = paper_metrics.roc_curve(out["labels"], out["logits"])
            auc = paper_metrics.binary_metrics(out["labels"], out["logits"])["roc_auc"]
            ax.plot(fpr, tpr, color=f"C{number % 10}", lw=1.5, label=f"{label} (AUROC {auc:.3f})")
            continue
        prob = softmax(np.asarray(out["logits"], np.float64), axis=1)
        style = ("-", "--", ":", "-.")[number % 4]  # the colour is the class, the line style the run
        for k in range(prob.shape[1]):
            positive = (out["labels"] == k).astype(np.int64)
            fpr, tpr = paper_metrics.roc_curve(positive, prob[:, k], from_logits=False)
            auc = paper_metrics.binary_metrics(positive, prob[:, k], from_logits=False)["roc_auc"]
            ax.plot(fpr, tpr, color=f"C{k % 10}", ls=style, lw=1.2,
                    label=f"{label}: class {k} vs rest (AUROC {auc:.3f})")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=f"ROC, {EVALUATIONS[split]}", aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def confusion(split: str, evaluations: dict[str, dict]) -> plt.Figure:
    fig, axes = plt.subplots(1, len(evaluations), figsize=(4.8 * len(evaluations), 4.8), squeeze=False)
    for ax, (label, out) in zip(axes[0], evaluations.items()):
        counts = paper_metrics.confusion_matrix(out["kind"], out["labels"], out["logits"])
        accuracy = paper_metrics.task_metrics(out["kind"], out["labels"], out["logits"])["balanced_accuracy"]
        ax.imshow(counts, cmap="Blues", vmin=0)
        rows = np.maximum(counts.sum(axis=1, keepdims=True), 1)
        for (i, j), count in np.ndenumerate(counts):
            ax.text(j, i, f"{count}\n{count / rows[i, 0]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if count > counts.max() / 2 else "black")
        classes = range(len(counts))
        ax.set(xticks=classes, yticks=classes, xlabel="predicted class", ylabel="true class",
               title=f"{label}\nbalanced accuracy {accuracy:.3f}")
    fig.suptitle(f"confusion matrix, {EVALUATIONS[split]}\n(each cell: count and share of its true class)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def figures(workdirs: Sequence[Path]) -> Iterator[tuple[str, plt.Figure]]:
    """(file name, figure) of every plot the runs have data for, drawn one at a time. Every run is read here,
    before the first figure, so that a bad workdir fails before anything is written."""
    labels = run_labels(workdirs)
    runs = {label: read_metrics(Path(w)) for label, w in zip(labels, workdirs)}
    keys = [k for k in CURVES if any(k in s for s in runs.values())]
    keys += sorted({k for s in runs.values() for k in s if k.startswith("val/")})
    evaluations: dict[str, dict[str, dict]] = {split: {} for split in EVALUATIONS}
    for label, workdir in zip(labels, workdirs):
        for split in EVALUATIONS:
            path = Path(workdir) / "outputs" / f"{split}.npz"
            if path.is_file() and (out := outputs.load(path))["kind"] != "regression":
                evaluations[split][label] = out
    return _draw(keys, runs, evaluations)


def _draw(keys: list[str], runs: dict[str, dict[str, Series]],
          evaluations: dict[str, dict[str, dict]]) -> Iterator[tuple[str, plt.Figure]]:
    for key in keys:
        yield f"{key.replace('/', '_')}.png", curve(key, runs)
    for split, outs in evaluations.items():
        if outs:
            yield f"roc_{split}.png", roc(split, outs)
            yield f"confusion_{split}.png", confusion(split, outs)


def write(workdirs: Sequence[Path], out: Path) -> list[Path]:
    """Write the PNGs to `out`, one figure open at a time; returns their paths."""
    drawn = figures(workdirs)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in drawn:
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    if not written:
        raise UserError(f"nothing to plot in {', '.join(map(str, workdirs))}: their metrics.jsonl hold no curves")
    return written

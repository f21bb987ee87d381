"""The per-window outputs of a fine-tuning evaluation: what its metrics were computed from.

metrics.jsonl holds a split's summary numbers; a ROC curve or a confusion matrix (`labram plot`) needs the windows'
labels and logits. The trainer writes them for its final test evaluations, to WORKDIR/outputs/test.npz and, when a
best checkpoint was kept, outputs/best_test.npz:

* `kind`: the task kind (binary, multiclass or regression);
* `labels`: [W] class indices (regression: the targets);
* `logits`: the model's raw outputs, [W, 1] for binary and regression, [W, C] for multiclass.

Only real windows are kept (the rows padding the last batch are dropped), in the loader's evaluation order.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from labram_jax.convert.pth import replace_atomically
from labram_jax.errors import UserError

KEYS = ("kind", "labels", "logits")


def save(path: str | os.PathLike, kind: str, labels: np.ndarray, logits: np.ndarray) -> Path:
    """Write the outputs atomically (a run stopped mid-write leaves the previous file or none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda file: np.savez(file, kind=np.asarray(kind), labels=np.asarray(labels),
                                                   logits=np.asarray(logits)))
    return path


def load(path: str | os.PathLike) -> dict[str, np.ndarray | str]:
    with np.load(path) as npz:
        missing = [k for k in KEYS if k not in npz.files]
        if missing:
            raise UserError(f"{path}: no {', '.join(missing)} (an evaluation outputs file holds {', '.join(KEYS)})")
        out = {k: npz[k] for k in KEYS}
    if len(out["labels"]) != len(out["logits"]):
        raise UserError(f"{path}: {len(out['labels'])} labels but {len(out['logits'])} rows of logits")
    return out | {"kind": str(out["kind"])}

"""The three training stages on one trainer, and the project's vocabulary for them.

Two words name what the original's three scripts and three models are:
- the **stage** is what a run does: "tokenizer" (train the VQ-NSP tokenizer), "pretrain" (masked EEG modeling
  against its codes) or "finetune" (a downstream task). `Experiment.stage`, the recipes and a checkpoint's
  identity say it.
- the **model kind** is what a model is: "tokenizer" (VQNSP), "pretrain" (LaBraMForMEM, the student and its lm
  heads) or "classify" (LaBraM, the fine-tuning model, with or without a head). `kind_of(model)`,
  `from_pytorch(path, kind)`, `labram convert --kind` and an export's "kind" say it.
A stage trains one model kind and may start from others: fine-tuning trains a classify model, from a classify or a
pretrain checkpoint (whose student it keeps). `task_kind` (binary, multiclass, regression) is another idea: the
kind of downstream task a fine-tuning head predicts and is scored on.

A Stage owns everything that differs between the stages: its model and the kinds its `init` may hold, its loss
and evaluation outputs, the optimizer's parameter groups, which parameters train, and the metric that picks the
best export. Losses are pure functions of a merged NNX model and a batch (the dict the grain pipeline yields: x,
input_chans, mask, label, target, valid); they run inside the trainer's jitted step.
"""
from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from labram_jax.data.pipeline import window_source
from labram_jax.data.records import decode
from labram_jax.convert.state_dict import ModelKind
from labram_jax.data.shards import read_manifest
from labram_jax.errors import UserError
from labram_jax.models.labram import LaBraM, LaBraMForMEM, mem_loss
from labram_jax.models.packing import Packing
from labram_jax.models.vqnsp import VQNSP
from labram_jax.train.config import Experiment
from labram_jax.train.lora import LoRAParam
from labram_jax.train.optim import ParamGroups
from labram_jax.train.metrics import BINARY_KEYS, MULTICLASS_KEYS, REGRESSION_KEYS

Batch = dict[str, jax.Array]


def random_mask(rng: jax.Array, windows: jax.Array, ratio: float) -> jax.Array:
    """The original's random_masking per window, over its real patches: keep int(L * (1 - ratio)) of the L real
    patches with the smallest noise and mask the rest (so exactly L - int(L * (1 - ratio)) are masked).

    windows: bool [B, ...] (True = real patch; one window per row, as a grid batch) or the int segment ids of
    packed rows [B, T] (-1 = padding). Returns [B, L].
    """
    segments = windows.reshape(windows.shape[0], -1)
    if segments.dtype == jnp.bool_:
        segments = jnp.where(segments, 0, -1)
    real = segments >= 0
    window = jnp.where(real, segments, jnp.iinfo(jnp.int32).max)  # padding sorts last
    # Sorted by window, and within a window by noise: a patch's place in its window's run is its noise rank.
    by_noise = jnp.argsort(jax.random.uniform(rng, segments.shape), axis=1)
    order = jnp.take_along_axis(by_noise, jnp.argsort(jnp.take_along_axis(window, by_noise, 1), axis=1,
                                                      stable=True), 1)
    run = jnp.take_along_axis(window, order, 1)
    start = jax.vmap(lambda r: jnp.searchsorted(r, r, side="left"))(run)
    length = jax.vmap(lambda r: jnp.searchsorted(r, r, side="right"))(run) - start
    keep = jnp.floor(length * (1 - ratio)).astype(start.dtype)
    masked = jnp.arange(run.shape[1]) - start >= keep
    return real & jnp.take_along_axis(masked, jnp.argsort(order, axis=1), 1)


def window_weights(batch: Batch, class_weights: tuple[float, ...] = ()) -> jax.Array:
    """Each window's weight in a loss: 1 for a real window (0 for a row or slot that pads the batch), times its
    label's class weight where class_weights are given."""
    valid = batch["valid"].astype(jnp.float32)
    if class_weights:
        valid = valid * jnp.asarray(class_weights, jnp.float32)[batch["label"]]
    return valid


def loss_weight(batch: Batch, exp: Experiment) -> jax.Array:
    """What a batch's loss is a mean over: its windows (each stage's loss averages per-window terms; fine-tuning
    weighs them by class). Gradient accumulation weighs each micro-batch by it, so that k micro-batches make the
    loss and the gradient of the one batch they form, however many windows each holds (packing)."""
    return window_weights(batch, exp.train.class_weights if exp.stage == "finetune" else ()).sum()


def classification_loss(logits: jax.Array, batch: Batch, kind: str, smoothing: float,
                        class_weights: tuple[float, ...] = ()) -> jax.Array:
    """BCE on one logit (binary), label-smoothed CE (timm's LabelSmoothingCrossEntropy) or MSE (regression);
    averaged over the valid rows of the batch, weighted by their label's class weight where class_weights are
    given (a weighted mean, as torch's CrossEntropyLoss(weight=...))."""
    valid = window_weights(batch, class_weights)
    logits = logits.astype(jnp.float32)
    if kind == "binary":
        y = batch["label"].astype(jnp.float32)
        z = logits[:, 0]
        per = jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))
    elif kind == "multiclass":
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["label"][:, None], axis=1)[:, 0]
        per = (1 - smoothing) * nll + smoothing * -logp.mean(axis=-1)
    else:
        per = (logits[:, 0] - batch["target"]) ** 2
    return (per * valid).sum() / jnp.maximum(valid.sum(), 1)


# The metrics evaluate() reports per task kind; every one but the loss is better higher.
TASK_METRICS = {"binary": BINARY_KEYS, "multiclass": MULTICLASS_KEYS, "regression": REGRESSION_KEYS}


def _all_parameters(exp: Experiment) -> Any:
    return nnx.Param


def _loss_only(exp: Experiment) -> tuple[str, ...]:
    return ("loss",)


def _val_loss(exp: Experiment) -> str:
    return "val/loss"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    kind: ModelKind  # the model kind it trains
    init_kinds: tuple[ModelKind, ...]  # the model kinds its `init` checkpoint may hold
    build: Callable[[Experiment, nnx.Rngs], nnx.Module]
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]  # (model, batch, rng, exp, frozen) -> loss, metrics
    outputs: Callable[..., dict[str, jax.Array]]  # (model, batch, exp, frozen) -> arrays gathered for evaluation
    groups: ParamGroups  # the original's AdamW parameter groups for its model
    trainable: Callable[[Experiment], Any] = _all_parameters  # the NNX filter of the parameters that train
    metrics: Callable[[Experiment], tuple[str, ...]] = _loss_only  # what evaluate() reports, without "val/"
    default_metric: Callable[[Experiment], str] = _val_loss

    def best_metric(self, exp: Experiment) -> tuple[str, bool]:
        """The validation metric that picks the best export (train.best_metric, else the stage's default), and
        whether higher is better, which the metric decides: lower for the loss, higher for the paper's scores."""
        metric = exp.train.best_metric or self.default_metric(exp)
        choices = [f"val/{name}" for name in self.metrics(exp)]
        if metric not in choices:
            raise UserError(f"train.best_metric {metric!r} is not one of {', '.join(choices)} (stage {self.name}"
                            + (f", task_kind {exp.task_kind})" if self.name == "finetune" else ")"))
        return metric, metric != "val/loss"


def codebook_stats(tokens: jax.Array, padding: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
    """Share of the codebook the batch's real patches use, and the perplexity of their code distribution (a
    batch of P patches uses at most P codes: the trainer's pass over the training windows gives the real usage)."""
    counts = jnp.zeros((codebook_size,), jnp.float32).at[tokens.reshape(-1)].add(
        padding.reshape(-1).astype(jnp.float32))
    return {f"batch_{k}": v for k, v in usage_and_perplexity(counts).items()}


def usage_and_perplexity(counts: jax.Array) -> dict[str, jax.Array]:
    """From how many patches picked each code: the share of codes used, and exp of the codes' entropy."""
    p = counts / jnp.maximum(counts.sum(), 1)
    entropy = -(p * jnp.log(jnp.where(p > 0, p, 1.0))).sum()
    return {"codebook_usage": (counts > 0).mean(), "codebook_perplexity": jnp.exp(entropy)}


def _tokenizer_loss(model: VQNSP, batch: Batch, rng, exp: Experiment, frozen) -> tuple[jax.Array, dict]:
    packing = Packing.of(batch)
    if packing is None:
        out = model(batch["x"], batch["input_chans"], mask=batch["mask"], train=True, rng=rng)
    else:  # one loss per window, averaged over the batch's windows
        out = model(batch["x"], None, packing=packing, train=True, rng=rng)
        out |= {k: packing.average(out[k]) for k in ("loss", "emb_loss", "rec_loss", "rec_angle_loss")}
    stats = codebook_stats(out["tokens"], batch["mask"], exp.tokenizer.codebook_size)
    return out["loss"], {k: out[k] for k in ("emb_loss", "rec_loss", "rec_angle_loss")} | stats


def _tokenizer_outputs(model: VQNSP, batch: Batch, exp: Experiment, frozen) -> dict[str, jax.Array]:
    out = model(batch["x"], batch["input_chans"], mask=batch["mask"])
    return {k: out[k] for k in ("loss", "rec_loss", "rec_angle_loss")}


def _pretrain_targets(tokenizer: VQNSP, batch: Batch) -> jax.Array:
    packing = Packing.of(batch)
    if packing is not None:
        return jax.lax.stop_gradient(tokenizer.tokenize(batch["x"], None, packing=packing))
    return jax.lax.stop_gradient(tokenizer.tokenize(batch["x"], batch["input_chans"], mask=batch["mask"]))


def _pretrain_loss(model: LaBraMForMEM, batch: Batch, rng, exp: Experiment, tokenizer) -> tuple[jax.Array, dict]:
    masking_rng, drop_rng = jax.random.split(rng)
    packing = Packing.of(batch)
    tokens = _pretrain_targets(tokenizer, batch)
    if packing is None:
        # A batch may bring its mask (the original engine's bool_masked_pos, for step-by-step parity runs).
        masked = batch["bool_masked_pos"] if "bool_masked_pos" in batch else random_mask(
            masking_rng, batch["mask"], exp.train.mask_ratio)
        x_rec, x_rec_sym = model(batch["x"], batch["input_chans"], masked, mask=batch["mask"], rng=drop_rng)
        losses = mem_loss(x_rec, x_rec_sym, tokens, masked, batch["mask"])
    else:  # each window masked and scored as alone, the batch's loss the mean over its windows
        masked = random_mask(masking_rng, packing.segments, exp.train.mask_ratio)
        x_rec, x_rec_sym = model(batch["x"], None, masked, packing=packing, rng=drop_rng)
        losses = {k: packing.average(v) for k, v in mem_loss(x_rec, x_rec_sym, tokens, masked,
                                                             packing=packing).items()}
    scored = (masked & batch["mask"].reshape(masked.shape)).astype(jnp.float32)
    accuracy = ((x_rec.argmax(-1) == tokens) * scored).sum() / jnp.maximum(scored.sum(), 1)
    return losses["loss"], {"loss_rec": losses["loss_rec"], "loss_rec_sym": losses["loss_rec_sym"],
                            "masked_accuracy": accuracy}


def _pretrain_outputs(model: LaBraMForMEM, batch: Batch, exp: Experiment, tokenizer) -> dict[str, jax.Array]:
    # Evaluation uses a fixed masking so that validation losses are comparable across steps.
    masked = random_mask(jax.random.key(0), batch["mask"], exp.train.mask_ratio)
    tokens = _pretrain_targets(tokenizer, batch)
    x_rec, x_rec_sym = model(batch["x"], batch["input_chans"], masked, mask=batch["mask"])
    losses = mem_loss(x_rec, x_rec_sym, tokens, masked, batch["mask"])
    return {"loss": losses["loss"]}


def _finetune_loss(model: LaBraM, batch: Batch, rng, exp: Experiment, frozen) -> tuple[jax.Array, dict]:
    packing = Packing.of(batch)
    if packing is not None:  # one head output per window: the batch's windows as rows of labels
        logits = model(batch["x"], None, packing=packing, rng=rng)
        windows = {k: batch[k].reshape(-1) for k in ("label", "target", "valid")}
        return classification_loss(logits.reshape(-1, logits.shape[-1]), windows, exp.task_kind,
                                   exp.train.label_smoothing, exp.train.class_weights), {}
    logits = model(batch["x"], batch["input_chans"], mask=batch["mask"], rng=rng)
    return classification_loss(logits, batch, exp.task_kind, exp.train.label_smoothing,
                               exp.train.class_weights), {}


def _finetune_outputs(model: LaBraM, batch: Batch, exp: Experiment, frozen) -> dict[str, jax.Array]:
    logits = model(batch["x"], batch["input_chans"], mask=batch["mask"])
    return {"logits": logits, "loss": classification_loss(logits, batch, exp.task_kind, 0.0)}


def _finetune_trainable(exp: Experiment) -> Any:
    if exp.train.mode == "linear_probe":
        return nnx.All(nnx.Param, nnx.Any(nnx.PathContains("fc_norm"), nnx.PathContains("head")))
    if exp.train.mode == "lora":
        return nnx.Any(LoRAParam, nnx.All(nnx.Param, nnx.Any(nnx.PathContains("fc_norm"),
                                                              nnx.PathContains("head"))))
    return nnx.Param


# The optimizer's groups follow the models' no_weight_decay() sets (modeling_finetune.py, modeling_pretrain.py,
# modeling_vqnsp.py). Pretraining never calls the student's lm_head or projection_head, so torch leaves their grad
# None and AdamW skips them (weight decay included); our zero gradients would still decay them.
STAGES = {
    "tokenizer": Stage(
        "tokenizer", "tokenizer", ("tokenizer",), lambda exp, rngs: VQNSP(exp.tokenizer, rngs=rngs),
        _tokenizer_loss, _tokenizer_outputs,
        ParamGroups(frozenset({"quantize.embedding.weight", "decoder.cls_token", "decoder.pos_embed",
                               "decoder.time_embed", "encoder.cls_token", "encoder.pos_embed", "encoder.time_embed"}))),
    "pretrain": Stage(
        "pretrain", "pretrain", ("pretrain",), lambda exp, rngs: LaBraMForMEM(exp.model, rngs=rngs),
        _pretrain_loss, _pretrain_outputs,
        ParamGroups(frozenset({"student.cls_token", "student.pos_embed", "student.time_embed"}),
                    unused=("student.lm_head.", "projection_head."))),
    "finetune": Stage(
        "finetune", "classify", ("classify", "pretrain"), lambda exp, rngs: LaBraM(exp.model, rngs=rngs),
        _finetune_loss, _finetune_outputs,
        ParamGroups(frozenset({"pos_embed", "cls_token", "time_embed"}), layer_decay=True),
        trainable=_finetune_trainable, metrics=lambda exp: ("loss",) + TASK_METRICS[exp.task_kind],
        # run_class_finetuning.py keeps the best validation accuracy; a regression has none
        default_metric=lambda exp: "val/r2" if exp.task_kind == "regression" else "val/accuracy"),
}


def _label_counts(path: str) -> tuple[collections.Counter, int]:
    """Labels (as the manifest writes them: str of the value) and windows of a shard folder or file: from its
    manifest, or where there is none, from a pass over its records."""
    manifest = read_manifest(path) if Path(path).is_dir() else None
    if manifest is not None:
        labels = sum((collections.Counter(d["labels"]) for d in manifest["datasets"].values()), collections.Counter())
        return labels, manifest["windows"]
    source = window_source(path)
    records = [decode(source[i]) for i in range(len(source))]
    return collections.Counter(str(w.label) for w in records if w.label is not None), len(records)


def check_labels(exp: Experiment) -> None:
    """Fine-tuning data and head that fit the task, or one line naming what does not: task_kind against
    model.num_classes (binary: one logit; multiclass: at least 2; regression: one output), and every window of
    every split labelled, with labels the head can take (binary: 0 or 1; multiclass: integers below num_classes)."""
    kind, classes = exp.task_kind, exp.model.num_classes
    if kind in ("binary", "regression") and classes != 1:
        raise UserError(f"task_kind {kind} has {'one logit' if kind == 'binary' else 'one output'}: set "
                        f"model.num_classes=1 (it is {classes})")
    if kind == "multiclass" and classes < 2:
        raise UserError(f"task_kind multiclass needs model.num_classes >= 2 (it is {classes})")
    weights = exp.train.class_weights
    if weights:
        wanted = {"binary": 2, "multiclass": classes}.get(kind)
        if wanted is None:
            raise UserError("train.class_weights weighs classes; task_kind regression has none")
        if len(weights) != wanted or min(weights) <= 0:
            raise UserError(f"train.class_weights needs {wanted} positive weights, one per class (task_kind {kind}), "
                            f"got {','.join(map(str, weights))}")
    for split in ("train", "val", "test"):
        for path in getattr(exp.data, split):
            labels, windows = _label_counts(str(path))
            missing = windows - sum(labels.values())
            if missing:
                raise UserError(f"{split} split {path}: {missing} of {windows} windows have no label")
            allowed = {"binary": {"0", "1"}, "multiclass": {str(c) for c in range(classes)}}.get(kind)
            bad = sorted(set(labels) - allowed, key=float) if allowed is not None else []
            if bad:
                rule = ("are not 0 or 1 (task_kind binary)" if kind == "binary"
                        else f"are outside 0..{classes - 1} (model.num_classes={classes})")
                raise UserError(f"{split} split {path}: labels {', '.join(bad)} {rule}")

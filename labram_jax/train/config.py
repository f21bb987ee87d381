"""Typed experiment configs and their `--set a.b=value` overrides.

An experiment is a stage ("tokenizer", "pretrain" or "finetune"), a model, data, optimisation, mesh and
checkpointing. Recipes (labram_jax/recipes/) are small functions returning one of these, as big_vision's configs are.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

from labram_jax import configs
from labram_jax.errors import UserError

Stage = Literal["tokenizer", "pretrain", "finetune"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: tuple[str, ...] = ()  # shard folders or files
    val: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()  # mixture weight per train folder; empty = proportional to size
    max_channels: int = 64
    max_patches: int = 16
    # > 0: training batches pack windows into rows of this many patch tokens (batch_size counts rows), with up to
    # pack_windows windows per row, first-fit decreasing over pack_buffer windows; evaluation stays padded
    pack_tokens: int = 0
    pack_windows: int = 4
    pack_buffer: int = 256
    workers: int = 0  # grain worker processes; keep fixed across a resume
    eval_batch_size: int = 0  # 0 = 1.5 x the training batch, as the original


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: every device not used by the other axes
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    # The original's recipes count epochs; when epochs > 0 the launcher derives steps (and warmup steps) from the
    # training windows in the data manifests and the global batch.
    epochs: float = 0.0
    warmup_epochs: float = 0.0
    batch_size: int = 64  # global
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_grad: float | None = None
    grad_accum: int = 1  # micro-batches per step; the batch is split, gradients averaged
    layer_decay: float | None = None
    label_smoothing: float = 0.0
    # Fine-tuning (binary, multiclass): a loss weight per class, indexed by label, the loss then the weighted mean
    # over the batch's windows (torch's CrossEntropyLoss(weight=...)); empty = unweighted, as the original.
    # Against class imbalance: (1, 3) on EEGMAT's 3:1 rest to task puts the 0.5 threshold at balanced odds.
    class_weights: tuple[float, ...] = ()
    mask_ratio: float = 0.5  # pretraining
    mode: Literal["full", "linear_probe", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    skip_nonfinite: bool = False  # skip a step whose loss or gradient is NaN/Inf instead of stopping
    # Resume a checkpoint whose data position was saved under another data layout (process count, batch size,
    # packing): the weights go on, the data starts a fresh pass. Without it such a resume stops with exit 2.
    force_resume: bool = False
    # Windows longer than the model's time_embed rows (model.time_rows, the original's 16): "linear" or "hold" gives
    # the models as many rows as the data's longest window (data.max_patches) and extends a checkpoint's learned rows
    # that way (convert.state_dict.resize_time_embed); "off" stops with an error instead, as the original would.
    extend_time: Literal["linear", "hold", "off"] = "linear"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # steps between validations; 0 = only at the end
    eval_epochs: float = 0.0  # > 0: validate every this many epochs (the launcher derives eval_every, as steps)
    save_every: int = 500
    keep: int = 3
    # The validation metric that picks the `best` export, e.g. "val/accuracy" (higher is better) or "val/loss"
    # (lower); empty = the stage's default (Stage.best_metric).
    best_metric: str = ""


Attention = Literal["auto", "xla", "chunked", "cudnn"]


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How the models run, the model's and the tokenizer's alike; the one home of these settings. The model
    configs hold the architecture (what an export rebuilds); the trainer writes these into their runtime fields
    (configs.RUNTIME_FIELDS), and a run's saved config.json shows both as they ran."""

    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # compute dtype: auto is bf16 on GPU/TPU, f32 on CPU
    # The default precision of the models' matmuls: "auto" is "highest" for float32 compute (exact float32 on
    # GPUs too, where the default takes faster reduced-precision passes) and "default" for bf16 compute.
    matmul_precision: Literal["auto", "highest", "default"] = "auto"
    # Rematerialisation of each block in the backward pass: "none", "block" (recompute everything) or "dots"
    # (keep matmul outputs, recompute the rest); "auto": the first of none, block, dots whose compiled step fits the
    # host's (CPU) or the device's memory, said in one line when it is not none. A set value is kept, and a step
    # that does not fit it stops before the first step.
    remat: Literal["auto", "none", "block", "dots"] = "auto"
    scan_blocks: bool = False  # the blocks as one lax.scan: one block to compile (pods, AOT), slower on CPU
    # The attention kernel of the model and of the tokenizer (encoder and decoder): auto is "chunked" on a CPU
    # (cache-sized chunks of the batch) and "xla" elsewhere; "cudnn" is cuDNN's fused kernel on NVIDIA GPUs.
    attention: Attention = "auto"
    tokenizer_attention: Attention = "auto"


# Keys that held a runtime setting before the runtime block: `--set` of one names its home instead.
MOVED = {f"train.{name}": f"runtime.{name}" for name in ("precision", "matmul_precision", "remat", "scan_blocks")}


@dataclasses.dataclass(frozen=True)
class Experiment:
    stage: Stage
    model: configs.TransformerConfig = configs.base()
    tokenizer: configs.TokenizerConfig = configs.tokenizer_base()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    mesh: MeshConfig = MeshConfig()
    init: str = ""  # checkpoint to start from: a .pth or export (fine-tuning: a pretrained model)
    tokenizer_checkpoint: str = ""  # pretraining: the trained tokenizer (.pth or export)
    task_kind: Literal["binary", "multiclass", "regression"] = "binary"

    def replace(self, **changes: Any) -> "Experiment":
        return dataclasses.replace(self, **changes)


def _parse(value: str, annotation: Any) -> Any:
    """A command-line string as the field's type: ints, floats, bools, None, tuples of those, or strings."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple:
        item = args[0]
        return tuple(_parse(v, item) for v in value.split(",") if v != "")
    if origin in (typing.Union, type(int | None)):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        return _parse(value, next(a for a in args if a is not type(None)))
    if origin is Literal:
        if value not in args:
            raise UserError(f"{value!r} is not one of {', '.join(map(str, args))}")
        return value
    if annotation is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise UserError(f"{value!r} is not a boolean")
        return value.lower() in ("true", "1")
    if annotation in (int, float, str):
        return annotation(value)
    raise UserError(f"cannot set a field of type {annotation}")


def override(config: Any, *assignments: str) -> Any:
    """config with `a.b.c=value` assignments applied; unknown keys and bad values raise one line naming them.

    The assignments are applied together and each config is validated once, at the end: fields that must agree
    (model.embed_dim = 25 * model.out_chans) can then change in one command line.
    """
    changes: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise UserError(f"override {assignment!r} is not key=value")
        fields = key.split(".")
        node, target = config, changes
        experiment = 0  # how many fields lead to the innermost Experiment (a grid holds several)
        for depth, field in enumerate(fields, start=1):
            if isinstance(node, Experiment):
                experiment = depth - 1
            _check_moved(node, fields, depth, experiment)
            hints = typing.get_type_hints(type(node)) if dataclasses.is_dataclass(node) else {}
            if field not in hints:
                raise UserError(f"unknown config key {key!r} (fields of {type(node).__name__}: "
                                f"{', '.join(hints) or 'none'})")
            if depth < len(fields):
                node, target = getattr(node, field), target.setdefault(field, {})
                continue
            try:
                target[field] = _parse(value, hints[field])
            except ValueError as error:
                raise UserError(f"{key}: {error}") from None
    return _apply(config, changes)


def _check_moved(node: Any, fields: list[str], depth: int, experiment: int) -> None:
    """A runtime setting set where it no longer lives: one line naming its home, the runtime block."""
    key, field, prefix = ".".join(fields), fields[depth - 1], ".".join(fields[:experiment] + [""])
    home = MOVED.get(".".join(fields[experiment:]))
    if home is None and isinstance(node, configs.TransformerConfig) and field in configs.RUNTIME_FIELDS:
        tokenizer = "tokenizer" in fields[experiment:depth]
        home = {"dtype": "runtime.precision", "attention": "runtime.tokenizer_attention" if tokenizer
                else "runtime.attention"}.get(field, f"runtime.{field}")
    if home is not None:
        raise UserError(f"{key}: how the models run is set in the runtime block: use {prefix}{home}")


def _apply(config: Any, changes: dict[str, Any]) -> Any:
    return dataclasses.replace(config, **{name: _apply(getattr(config, name), value) if isinstance(value, dict)
                                          else value for name, value in changes.items()})


def to_json(config: Any) -> str:
    return json.dumps(dataclasses.asdict(config), indent=1, default=str)

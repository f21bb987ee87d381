"""Weights between our Flax models and the original's PyTorch state dicts, key for key.

Parameter paths already read like state-dict keys (`blocks.0.attn.qkv.kernel`), so the mapping is a handful of
rules: Flax names (`kernel`, `scale`) become torch names (`weight`), kernels are transposed, and the tokenizer's
nn.Sequential layers are renumbered. Keys come out in torch's order (a module's own tensors, then its children),
so a written file lists them as the original does.
"""
from __future__ import annotations

import collections
import re
from typing import Callable, Iterator, Literal

import numpy as np
from flax import nnx

from labram_jax import configs
from labram_jax.errors import UserError, key_mismatch, one_line
from labram_jax.models.labram import LaBraM, LaBraMForMEM
from labram_jax.models.vqnsp import VQNSP, CodeAge

# The model kinds (the vocabulary: labram_jax.train.stages): the original's three models.
ModelKind = Literal["classify", "pretrain", "tokenizer"]
Model = LaBraM | LaBraMForMEM | VQNSP

Renames = tuple[tuple[re.Pattern, str], ...]

# nn.Sequential(Linear, Tanh, Linear) and nn.Sequential(Linear, ReLU) number their layers 0 and 2 / 0.
_RENAMES: Renames = ((re.compile(r"(task_layer(?:_angle)?)\.fc1\."), r"\1.0."),
                     (re.compile(r"(task_layer(?:_angle)?)\.fc2\."), r"\1.2."))


def rename(key: str, rules: Renames) -> str:
    """`key` with every rule's pattern replaced in turn."""
    for pattern, repl in rules:
        key = pattern.sub(repl, key)
    return key


def _variables(node: nnx.Module, prefix: tuple = ()) -> Iterator[tuple[tuple, nnx.Variable]]:
    """(path, variable) in torch's state_dict order: a module's own tensors first, then its children.

    State the original has no key for (CodeAge) is left out: a .pth holds the original's keys only, and one
    loads into a model with that state, which keeps its fresh value."""
    children = []
    items = enumerate(node) if isinstance(node, nnx.List) else vars(node).items()
    for name, value in items:
        if isinstance(value, CodeAge):
            continue
        if isinstance(value, nnx.Variable):
            yield prefix + (name,), value
        elif isinstance(value, (nnx.Module, nnx.List)):
            children.append((name, value))
    for name, child in children:
        yield from _variables(child, prefix + (name,))


def torch_key(path: tuple) -> str:
    *parents, leaf = (str(p) for p in path)
    return rename(".".join(parents + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)]), _RENAMES)


def _to_torch(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":  # Flax [in, out] / [kh, kw, in, out] -> torch [out, in] / [out, in, kh, kw]
        value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
    return np.ascontiguousarray(value)


def _from_torch(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
    return np.ascontiguousarray(value)


def _same(key: str) -> str:
    return key


def state_dict(model: Model, *, layout: Callable[[str], str] = _same) -> "collections.OrderedDict[str, np.ndarray]":
    """The model's weights in the original's key layout (or `layout` of each of its keys), as numpy arrays."""
    return collections.OrderedDict((layout(torch_key(path)), _to_torch(path, np.asarray(var[...])))
                                   for path, var in _variables(model))


def load_state_dict(model: Model, weights: dict[str, np.ndarray], *, allow_missing: tuple[str, ...] = (),
                    source: str = "checkpoint", layout: Callable[[str], str] = _same) -> None:
    """Copy `weights` into `model`, strictly: one error names every missing, unexpected and mis-shaped key.

    Keys starting with a prefix in `allow_missing` may be absent and keep their fresh initialisation (the
    original's fine-tuning loader leaves fc_norm and head fresh when it starts from a pretraining checkpoint).
    `layout` maps the original's keys to those of `weights` (another library's module names), and the error
    names keys as `weights` spells them.
    """
    targets = {layout(torch_key(path)): (path, var) for path, var in _variables(model)}
    problems = key_mismatch({k: tuple(np.shape(v)) for k, v in weights.items()},
                            {k: _to_torch(p, np.asarray(v[...])).shape for k, (p, v) in targets.items()},
                            allow_missing=allow_missing)
    if problems:
        raise UserError(f"{source} does not match {type(model).__name__}: {problems}")
    for key, (path, var) in targets.items():
        if key in weights:
            var[...] = _from_torch(path, np.asarray(weights[key])).astype(np.asarray(var[...]).dtype)


def _require(weights: dict, keys: list[str], source: str, kind: str) -> None:
    absent = [k for k in keys if k not in weights]
    if absent:
        raise UserError(f"{source} is not a LaBraM {kind} checkpoint: no {', '.join(absent)} "
                        f"(found e.g. {', '.join(list(weights)[:5])})")


def infer_transformer(weights: dict[str, np.ndarray], prefix: str, source: str, kind: str,
                      head_dim: int | None = None) -> configs.TransformerConfig:
    """A TransformerConfig from the shapes of one Transformer's weights (keys under `prefix`)."""
    _require(weights, [prefix + "cls_token", prefix + "blocks.0.mlp.fc1.weight"], source, kind)
    shape = lambda key: tuple(np.shape(weights[key])) if key in weights else None  # noqa: E731
    cls = shape(prefix + "cls_token")
    if len(cls) != 3 or cls[:2] != (1, 1) or cls[2] < 1:
        raise UserError(f"{source}: {prefix}cls_token has shape {cls}, not (1, 1, embed_dim)")
    d = cls[2]
    numbers = [m.group(1) for k in weights if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))]
    if max(map(len, numbers)) > 6:
        raise UserError(f"{source}: a block number of {max(map(len, numbers))} digits under {prefix}blocks")
    depth = 1 + max(map(int, numbers))
    q_norm = shape(prefix + "blocks.0.attn.q_norm.weight")
    # Without q/k norm the head count is not in the weights; LaBraM's tokenizers all use head_dim 20.
    size = q_norm[0] if q_norm else head_dim or 20
    if not 1 <= size <= d or d % size:
        raise UserError(f"{source}: a head of {size} features does not divide embed_dim {d}")
    heads = d // size
    conv1 = weights.get(prefix + "patch_embed.conv1.weight")
    proj = weights.get(prefix + "patch_embed.proj.weight")
    head = weights.get(prefix + "head.weight")
    return configs.TransformerConfig(
        embed_dim=d, depth=depth, num_heads=heads,
        mlp_ratio=weights[prefix + "blocks.0.mlp.fc1.weight"].shape[0] / d,
        out_chans=conv1.shape[0] if conv1 is not None else d // 25,
        in_chans=proj.shape[1] if proj is not None else 0,
        qkv_bias=prefix + "blocks.0.attn.q_bias" in weights, qk_norm=q_norm is not None,
        init_values=0.1 if prefix + "blocks.0.gamma_1" in weights else 0.0,
        time_rows=np.shape(weights.get(prefix + "time_embed", np.zeros((1, configs.MAX_PATCHES))))[1],
        num_classes=head.shape[0] if head is not None else 0,
        vocab_size=weights[prefix + "lm_head.weight"].shape[0] if prefix + "lm_head.weight" in weights else 8192)


def infer_config(weights: dict[str, np.ndarray], kind: ModelKind, source: str = "checkpoint", *,
                 num_classes: int | None = None, head_dim: int | None = None
                 ) -> configs.TransformerConfig | configs.TokenizerConfig:
    """The architecture that `weights`' shapes describe, refused in one line where they describe none (shapes
    that do not relate as LaBraM's, or a model larger than configs.MAX_PARAMETERS). Nothing is built: the keys
    and shapes are checked against this config's model before it is (checked_build)."""
    try:
        cfg = _inferred(weights, kind, source, num_classes, head_dim)
    except (TypeError, ValueError, IndexError) as error:  # shapes no LaBraM has (UserError is a ValueError)
        raise UserError(error if isinstance(error, UserError) else f"{source}: {one_line(error)}") from None
    configs.check_size(cfg, source)
    return cfg


def _inferred(weights: dict[str, np.ndarray], kind: ModelKind, source: str, num_classes: int | None,
              head_dim: int | None) -> configs.TransformerConfig | configs.TokenizerConfig:
    if kind == "pretrain":
        return infer_transformer(weights, "student.", source, kind)
    if kind == "classify":
        cfg = infer_transformer(weights, "", source, kind)
        return cfg if num_classes is None else cfg.replace(num_classes=num_classes)
    if kind == "tokenizer":
        _require(weights, ["quantize.embedding.weight"], source, kind)
        codebook_size, code_dim = weights["quantize.embedding.weight"].shape
        initted = weights.get("quantize.embedding.initted")
        return configs.TokenizerConfig(encoder=infer_transformer(weights, "encoder.", source, kind, head_dim),
                                       decoder=infer_transformer(weights, "decoder.", source, kind, head_dim),
                                       codebook_size=codebook_size, code_dim=code_dim,
                                       kmeans_init=initted is not None and not np.asarray(initted).any())
    raise UserError(f"model kind must be 'classify', 'pretrain' or 'tokenizer', not {kind!r}")


def student_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original's fine-tuning loader on a pretraining checkpoint: keep `student.*`, strip the prefix, and drop
    what the fine-tuning model does not have (mask_token, the student's norm and lm_head)."""
    kept = {k[len("student."):]: v for k, v in weights.items() if k.startswith("student.")}
    return {k: v for k, v in kept.items() if not k.startswith(("mask_token", "norm.", "lm_head."))}


TimeExtension = Literal["linear", "hold"]


def resize_time_embed(table: np.ndarray, rows: int, method: TimeExtension | Literal["truncate"]) -> np.ndarray:
    """A time_embed [1, R, D] with `rows` rows. "linear": the R learned rows resampled at `rows` evenly spaced
    points from the first row to the last (as a ViT's position table is resized to a new grid), so the window's
    start and end keep their rows; "hold": the R rows kept and each new one a copy of the last, so a window of at
    most R seconds embeds exactly as before; "truncate", or fewer rows than R: the first `rows` rows."""
    table = np.asarray(table)
    have = table.shape[1]
    if method == "truncate" or rows <= have:
        return table[:, :rows]
    if method == "hold":
        return np.concatenate([table, np.repeat(table[:, -1:], rows - have, axis=1)], axis=1)
    points = np.linspace(0.0, have - 1, rows) if rows > 1 else np.zeros(1)
    low = np.minimum(np.floor(points).astype(int), have - 1)
    high = np.minimum(low + 1, have - 1)
    frac = (points - low).astype(np.float64)[None, :, None]
    return ((1 - frac) * table[:, low].astype(np.float64) + frac * table[:, high].astype(np.float64)
            ).astype(table.dtype)


def weights_time_rows(weights: dict[str, np.ndarray]) -> int:
    """The fewest time_embed rows among a state dict's Transformers (a tokenizer has two)."""
    return min(np.shape(v)[1] for k, v in weights.items() if k.split(".")[-1] == "time_embed")


def resize_time_rows(weights: dict[str, np.ndarray], rows: int, method: TimeExtension | Literal["truncate"]
                     ) -> dict[str, np.ndarray]:
    """`weights` with each time_embed of another row count resized to `rows` (resize_time_embed)."""
    return {k: resize_time_embed(v, rows, method) if k.split(".")[-1] == "time_embed" and np.shape(v)[1] != rows
            else v for k, v in weights.items()}


def build(cfg: configs.TransformerConfig | configs.TokenizerConfig, kind: ModelKind, seed: int = 0) -> Model:
    rngs = nnx.Rngs(seed)
    if kind == "tokenizer":
        return VQNSP(cfg, rngs=rngs)
    return LaBraMForMEM(cfg, rngs=rngs) if kind == "pretrain" else LaBraM(cfg, rngs=rngs)


def checked_build(cfg: configs.TransformerConfig | configs.TokenizerConfig, kind: ModelKind,
                  weights: dict[str, np.ndarray], *, allow_missing: tuple[str, ...] = (), source: str = "checkpoint",
                  layout: Callable[[str], str] = _same, seed: int = 0) -> Model:
    """The model of `cfg` holding `weights`, whose keys and shapes are checked against the model's as shapes
    before anything is allocated (load_state_dict's one-line error), so a file cannot make it build what it does
    not hold."""
    abstract = nnx.eval_shape(lambda: build(cfg, kind, seed))
    want = {layout(torch_key(path)): _torch_shape(path, var) for path, var in _variables(abstract)}
    problems = key_mismatch({k: tuple(np.shape(v)) for k, v in weights.items()}, want, allow_missing=allow_missing)
    if problems:
        raise UserError(f"{source} does not match {type(abstract).__name__}: {problems}")
    model = build(cfg, kind, seed)
    load_state_dict(model, weights, allow_missing=allow_missing, source=source, layout=layout)
    return model


def _torch_shape(path: tuple, var: nnx.Variable) -> tuple[int, ...]:
    shape = tuple(var.get_value().shape)
    if path[-1] == "kernel":
        return shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    return shape


def kind_of(model: Model) -> ModelKind:
    return {LaBraM: "classify", LaBraMForMEM: "pretrain", VQNSP: "tokenizer"}[type(model)]


def rebuilt(model: Model, cfg: configs.TransformerConfig | configs.TokenizerConfig) -> Model:
    """`model`'s variables in a model of its kind built from `cfg`: the same architecture under other runtime
    settings (configs.with_runtime), since the layers fix their compute dtype when they are built."""
    fresh = nnx.eval_shape(lambda: build(cfg, kind_of(model)))
    nnx.update(fresh, nnx.state(model))
    return fresh

"""AdamW as the original trains LaBraM: per-iteration cosine lr, layer-wise lr decay, selective weight decay.

Mirrors optim_factory.py (parameter groups), utils.cosine_scheduler, and the engines' per-iteration
`group["lr"] = lr_schedule[it] * group["lr_scale"]` (weight-decaying groups also get `wd_schedule[it]`).
Rules are written on the original's state-dict names (`blocks.3.attn.qkv.weight`) so they read as there.

Each group is optax.adamw's chain, `p - lr * (adam + wd * p)`; torch's AdamW first shrinks `p *= 1 - lr * wd`
and then subtracts `lr * adam`. Adam's step does not depend on p, so both give `p - lr * wd * p - lr * adam`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from labram_jax.convert.state_dict import torch_key
from labram_jax.errors import UserError



@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """How optim_factory.get_parameter_groups splits one model's parameters (each stage holds its model's)."""

    no_weight_decay: frozenset[str]  # the model's no_weight_decay() names
    unused: tuple[str, ...] = ()  # name prefixes the loss never reaches: torch's AdamW skips them (grad None)
    layer_decay: bool = False  # whether layer-wise lr decay is defined (the original's fine-tuning only)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    weight_decay: float = 0.05
    # Cosine from weight_decay to this; None: constant (the original's default; its tokenizer never schedules).
    weight_decay_end: float | None = None
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_grad: float | None = None
    layer_decay: float | None = None  # None or >= 1: every group has lr scale 1, as the original


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """utils.cosine_scheduler per iteration; steps past total_steps stay at `final`."""
    if not 0 <= warmup_steps <= total_steps:
        raise UserError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps})")
    decay_steps = total_steps - warmup_steps

    def schedule(step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        # np.linspace(0, base, w): base is the last warmup value (a single warmup step is 0).
        warmup = base * step / max(warmup_steps - 1, 1)
        # final + (base - final) (1 + cos(pi i / n)) / 2, as sin^2 of the remaining fraction: 1 + cos cancels in
        # float32 near the end of the run.
        remaining = (total_steps - step) / max(decay_steps, 1)
        cosine = final + (base - final) * jnp.sin(0.5 * jnp.pi * remaining) ** 2
        return jnp.where(step < warmup_steps, warmup, jnp.where(step < total_steps, cosine, final))

    return schedule


def _name(path: tuple) -> str:
    # A State of Variables adds the Variable's own `value` attribute after the parameter's keys.
    return torch_key(tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey)))


def param_names(params: nnx.State) -> Any:
    """The original's state-dict name of every parameter, in the structure of `params`."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _name(path), params)


def layer_id(name: str, depth: int) -> int:
    """optim_factory.get_num_layer_for_vit: embeddings 0, block i -> i + 1, everything else depth + 1.

    Names are matched without any `student.`/`encoder.` prefix, as there: only fine-tuning uses layer decay.
    """
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return depth + 1


def decays(name: str, ndim: int, no_weight_decay: frozenset[str]) -> bool:
    return not (ndim <= 1 or name.endswith(".bias") or name in no_weight_decay)


def lr_scale(name: str, depth: int, layer_decay: float | None) -> float:
    """A parameter's lr multiplier, its group's `lr_scale` in the original."""
    if layer_decay is None or layer_decay >= 1.0:
        return 1.0
    return layer_decay ** (depth + 1 - layer_id(name, depth))


def _scale_by_adam_like_torch(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """optax.scale_by_adam with torch's bias corrections.

    optax forms 1 - b ** t in float32, where b2 = 0.999 rounds so that 1 - b2 is 1.3e-5 off, relative, and so is
    the step size early on (torch uses float64); -expm1(t log b), with log b from float64, stays within 1e-7.
    """
    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update(grads, state, params=None):
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        correction1, correction2 = (-jnp.expm1(count * math.log(b)) for b in (b1, b2))
        updates = jax.tree.map(lambda m, v: m / correction1 / (jnp.sqrt(v / correction2) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def _clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    # torch.nn.utils.clip_grad_norm_ scales by max_norm / (norm + 1e-6), capped at 1; optax's has no 1e-6.
    def update(updates, state, params=None):
        factor = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * factor, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def skip_unless(finite: jax.Array, new: Any, old: Any) -> Any:
    """The optimizer state after a step that is skipped unless `finite`: Adam's moments and count stay as they
    were (torch's GradScaler skips optimizer.step()), while the lr and weight-decay schedules' counts move on, as
    the original sets each iteration's lr from the iteration (lr_schedule[it]) whether or not it stepped."""
    # A state holding nothing but a count is a schedule's: optax.scale_by_learning_rate's ScaleByScheduleState
    # and add_decayed_weights' WeightDecaySchedule (not exported by optax).
    def schedule(part: Any) -> bool:
        return getattr(part, "_fields", None) == ("count",)

    def pick(new_part: Any, old_part: Any) -> Any:
        if schedule(new_part):
            return new_part
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_part, old_part)

    return jax.tree.map(pick, new, old, is_leaf=schedule)


def make_optimizer(params: nnx.State, cfg: OptimConfig, rules: ParamGroups, depth: int
                   ) -> optax.GradientTransformation:
    """Clip all gradients together, then AdamW per parameter group as the original builds them for the model
    whose `rules` are given (its stage's `groups`).

    Works on `params` as given (Variables or plain arrays), so nnx.Optimizer(model, tx, wrt=...) can use it; only
    `params` train (the trainer passes its stage's trainable parameters).
    """
    layer_decay = cfg.layer_decay is not None and cfg.layer_decay < 1.0
    if layer_decay and not rules.layer_decay:
        raise UserError(f"train.layer_decay {cfg.layer_decay}: layer-wise lr decay is defined for fine-tuning "
                        "only (the original's tokenizer and pretraining use none)")
    lr = cosine_schedule(cfg.lr, cfg.min_lr, cfg.total_steps, cfg.warmup_steps)
    wd_end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
    wd = cosine_schedule(cfg.weight_decay, wd_end, cfg.total_steps, 0)

    # Group names follow optim_factory.get_parameter_groups, so they match the original's param_groups log.
    labels: dict[str, str] = {}
    groups: dict[str, optax.GradientTransformation] = {}
    for name, leaf in zip(jax.tree.leaves(param_names(params)), jax.tree.leaves(params)):
        if name.startswith(rules.unused):
            labels[name] = "frozen"
            groups["frozen"] = optax.set_to_zero()
            continue
        decayed = decays(name, leaf.ndim, rules.no_weight_decay)
        group = "decay" if decayed else "no_decay"
        if layer_decay:
            group = f"layer_{layer_id(name, depth)}_{group}"
        labels[name] = group
        if group not in groups:
            scale = lr_scale(name, depth, cfg.layer_decay)
            groups[group] = optax.chain(_scale_by_adam_like_torch(cfg.b1, cfg.b2, cfg.eps),
                                        optax.add_decayed_weights(wd if decayed else 0.0),
                                        optax.scale_by_learning_rate(lambda step, scale=scale: lr(step) * scale))

    # Labels by name, not a fixed tree: nnx.Optimizer initialises on Variables but updates on plain arrays.
    def label_tree(tree: Any) -> Any:
        return jax.tree.map(lambda name: labels[name], param_names(tree))

    chain = []
    if "frozen" in groups:  # torch has no grad for frozen weights, so they stay out of the clipping norm
        chain.append(optax.masked(optax.set_to_zero(),
                                  lambda tree: jax.tree.map(lambda label: label == "frozen", label_tree(tree))))
    if cfg.clip_grad is not None:
        chain.append(_clip_by_global_norm_like_torch(cfg.clip_grad))
    chain.append(optax.multi_transform(groups, label_tree))
    return optax.chain(*chain)

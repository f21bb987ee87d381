"""The optimizer against the original's recipe: schedule formula, parameter groups, and torch AdamW step for step."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from labram_jax import configs
from labram_jax.models.labram import LaBraM, LaBraMForMEM
from labram_jax.models.vqnsp import VQNSP
from labram_jax.train import optim
from labram_jax.train.config import Experiment, TrainConfig
from labram_jax.train.stages import STAGES


def _original_cosine(base, final, total, warmup):
    """utils.cosine_scheduler with warmup given in iterations."""
    warm = np.linspace(0, base, warmup) if warmup > 0 else np.array([])
    iters = np.arange(total - warmup)
    decay = np.array([final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / len(iters))) for i in iters])
    return np.concatenate((warm, decay))


@pytest.mark.parametrize("total,warmup", [(20, 5), (10, 0), (7, 1), (6, 6), (1000, 37)])
def test_schedule_matches_original_formula(total, warmup):
    schedule = optim.cosine_schedule(5e-4, 1e-6, total, warmup)
    got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total + 3)))
    np.testing.assert_allclose(got[:total], _original_cosine(5e-4, 1e-6, total, warmup), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(got[total:], 1e-6, rtol=1e-6)  # held at the final value past the run
    if warmup > 1:
        assert got[warmup - 1] == pytest.approx(5e-4)  # linspace includes base


_MODELS = {"finetune": lambda: LaBraM(configs.tiny(num_classes=3), rngs=nnx.Rngs(0)),
           "pretrain": lambda: LaBraMForMEM(configs.tiny(), rngs=nnx.Rngs(0)),
           "tokenizer": lambda: VQNSP(configs.tokenizer_tiny(), rngs=nnx.Rngs(0))}


def _model(stage):
    """A tiny model with random parameters, built abstractly: real initialisation is slow and beside the point."""
    model = nnx.eval_shape(_MODELS[stage])
    rng = np.random.default_rng(1)
    nnx.update(model, jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype),
                                   nnx.state(model)))
    return model


def _flat(tree):
    return dict(zip(jax.tree.leaves(optim.param_names(tree)), jax.tree.leaves(tree)))


# labram_base_patch200_200's state dict (223 keys), written out from the original's key list.
_BLOCK = ["gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_norm.weight",
          "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias", "attn.proj.weight", "attn.proj.bias",
          "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
_EMBED = ["cls_token", "pos_embed", "time_embed"] + [f"patch_embed.{m}{i}.{w}" for i in (1, 2, 3)
                                                     for m in ("conv", "norm") for w in ("weight", "bias")]
_TAIL = ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]


def test_base_groups_follow_the_original_rules():
    params = nnx.state(nnx.eval_shape(lambda: LaBraM(configs.base(num_classes=6), rngs=nnx.Rngs(0))), nnx.Param)
    flat = _flat(params)
    blocks = {f"blocks.{i}.{k}": i for i in range(12) for k in _BLOCK}
    assert sorted(flat) == sorted(_EMBED + list(blocks) + _TAIL)

    # The original's groups: layer 0 = cls/pos/patch_embed, 1 + i = block i, 13 = the rest (time_embed too).
    expected_layer = {**{k: 0 for k in _EMBED if k != "time_embed"}, **{k: i + 1 for k, i in blocks.items()},
                      **{k: 13 for k in _TAIL + ["time_embed"]}}
    expected_decay = ({f"patch_embed.conv{i}.weight" for i in (1, 2, 3)} | {"head.weight"}
                      | {f"blocks.{i}.{w}.weight" for i in range(12) for w in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                                  "mlp.fc2")})
    skip = STAGES["finetune"].groups.no_weight_decay
    assert {k: optim.layer_id(k, 12) for k in flat} == expected_layer
    assert {k for k, v in flat.items() if optim.decays(k, v.ndim, skip)} == expected_decay

    scales = {k: optim.lr_scale(k, 12, 0.65) for k in flat}
    assert len(set(scales.values())) == 14
    assert scales["cls_token"] == scales["patch_embed.conv1.weight"] == pytest.approx(0.65 ** 13)
    assert scales["blocks.0.attn.qkv.weight"] == pytest.approx(0.65 ** 12)
    assert scales["time_embed"] == scales["head.weight"] == scales["fc_norm.bias"] == 1.0
    assert {optim.lr_scale(k, 12, None) for k in flat} == {1.0}

    tx = optim.make_optimizer(params, optim.OptimConfig(5e-4, 1e-6, 5, 50, layer_decay=0.65),
                              STAGES["finetune"].groups, 12)
    groups = jax.eval_shape(tx.init, params)[-1].inner_states
    assert set(groups) == {f"layer_{i}_{d}" for i in range(14) for d in ("decay", "no_decay")}


def test_no_weight_decay_sets_carry_the_model_prefixes():
    assert optim.decays("student.mask_token", 3, STAGES["pretrain"].groups.no_weight_decay)
    assert optim.layer_id("student.blocks.0.mlp.fc1.weight", 12) == 13  # no prefix handling, as the original
    with pytest.raises(ValueError, match="^train.layer_decay 0.65: layer-wise lr decay is defined for fine-tuning"):
        optim.make_optimizer({}, optim.OptimConfig(1e-3, 0, 0, 1, layer_decay=0.65), STAGES["pretrain"].groups, 12)


def _torch_groups(names, params, cfg, stage, depth, frozen):
    """optim_factory.get_parameter_groups, transcribed on the torch side."""
    skip = {"finetune": {"pos_embed", "cls_token", "time_embed"},
            "pretrain": {"student.cls_token", "student.pos_embed", "student.time_embed"},
            "tokenizer": {f"{p}.{k}" for p in ("encoder", "decoder") for k in ("cls_token", "pos_embed", "time_embed")}
            }[stage]
    groups = {}
    for name in names:
        if name.startswith(frozen):
            continue  # requires_grad False
        p = params[name]
        decay = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        scale, key = 1.0, "decay" if decay else "no_decay"
        if cfg.layer_decay:
            if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
                layer = 0
            elif name.startswith("blocks"):
                layer = int(name.split(".")[1]) + 1
            else:
                layer = depth + 1
            scale, key = cfg.layer_decay ** (depth + 1 - layer), f"layer_{layer}_{key}"
        group = groups.setdefault(key, {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                                        "lr_scale": scale})
        group["params"].append(p)
    return list(groups.values())


# The MEM forward never calls student.lm_head or projection_head: their torch grad stays None.
_UNUSED = ("student.lm_head.", "projection_head.")


# The original's linear probe: requires_grad False for everything but fc_norm and head.
_LINEAR_PROBE_FROZEN = ("cls_token", "pos_embed", "time_embed", "patch_embed.", "blocks.")


@pytest.mark.parametrize("stage,mode,cfg", [
    ("finetune", "full", optim.OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=2, total_steps=5,
                                           weight_decay_end=0.01, b2=0.98, clip_grad=0.5, layer_decay=0.65)),
    ("finetune", "linear_probe", optim.OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=1, total_steps=5,
                                                   clip_grad=0.5)),
    ("pretrain", "full", optim.OptimConfig(lr=5e-4, min_lr=1e-5, warmup_steps=2, total_steps=5, b2=0.98,
                                           clip_grad=3.0)),
    ("tokenizer", "full", optim.OptimConfig(lr=4e-4, min_lr=1e-5, warmup_steps=2, total_steps=5,
                                            weight_decay=1e-4, b2=0.99)),
], ids=["finetune-layer-decay-wd-schedule", "linear-probe", "pretrain", "tokenizer"])
def test_matches_torch_adamw(stage, mode, cfg):
    """The optimizer over what the trainer gives it: the stage's trainable parameters and parameter groups."""
    model = _model(stage)
    depth = 2
    trainable = STAGES[stage].trainable(Experiment(stage, train=TrainConfig(mode=mode)))
    state = nnx.state(model, nnx.Param)
    start = {k: np.array(v) for k, v in _flat(state).items()}
    names = list(start)
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in start.items()}  # layout is irrelevant to AdamW
    frozen = _LINEAR_PROBE_FROZEN if mode == "linear_probe" else ()
    torch_opt = torch.optim.AdamW(_torch_groups(names, params, cfg, stage, depth, frozen), lr=cfg.lr,
                                  betas=(cfg.b1, cfg.b2), eps=cfg.eps, weight_decay=0.0)
    lr_values = _original_cosine(cfg.lr, cfg.min_lr, cfg.total_steps, cfg.warmup_steps)
    wd_end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
    wd_values = _original_cosine(cfg.weight_decay, wd_end, cfg.total_steps, 0)

    trained = nnx.state(model, trainable)
    opt = nnx.Optimizer(model, optim.make_optimizer(trained, cfg, STAGES[stage].groups, depth), wrt=trainable)
    update = nnx.jit(lambda model, opt, grads: opt.update(model, grads))
    rng = np.random.default_rng(0)
    for it in range(cfg.total_steps):
        # Alternate large and small gradients so clipping is both active and idle.
        grads = {k: (rng.standard_normal(v.shape) * (1.0 if it % 2 else 1e-4)).astype(np.float32)
                 for k, v in start.items()}
        for group in torch_opt.param_groups:  # engine_for_*.py, per iteration
            group["lr"] = lr_values[it] * group["lr_scale"]
            if group["weight_decay"] > 0:
                group["weight_decay"] = wd_values[it]
        for k, p in params.items():
            p.grad = None if k.startswith(frozen + (_UNUSED if stage == "pretrain" else ())) else torch.tensor(grads[k])
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(params.values(), cfg.clip_grad)
        torch_opt.step()
        update(model, opt, jax.tree.map(lambda name: jnp.asarray(grads[name]), optim.param_names(trained)))

    got = {k: np.asarray(v) for k, v in _flat(nnx.state(model, nnx.Param)).items()}
    moved = 0
    for k in names:
        want = params[k].detach().numpy()
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-8, err_msg=k)
        moved += not np.array_equal(want, start[k])
    assert moved > 0


def test_linear_probe_trains_only_fc_norm_and_head():
    model = _model("finetune")
    trainable = STAGES["finetune"].trainable(Experiment("finetune", train=TrainConfig(mode="linear_probe")))
    start = {k: np.array(v) for k, v in _flat(nnx.state(model, nnx.Param)).items()}
    cfg = optim.OptimConfig(1e-3, 1e-5, 0, 3, clip_grad=1.0)
    opt = nnx.Optimizer(model, optim.make_optimizer(nnx.state(model, trainable), cfg, STAGES["finetune"].groups, 2),
                        wrt=trainable)
    update = nnx.jit(lambda model, opt, grads: opt.update(model, grads))
    for _ in range(2):
        update(model, opt, jax.tree.map(jnp.ones_like, nnx.state(model, trainable)))
    changed = {k for k, v in _flat(nnx.state(model, nnx.Param)).items() if not np.array_equal(v, start[k])}
    assert changed == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}

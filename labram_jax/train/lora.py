"""LoRA for LaBraM's attention and MLP projections (the paper's outlook; none of the peers ships it).

`add_lora` wraps qkv, proj, fc1 and fc2 of every block so their output gains a low-rank update
`x @ A @ B * alpha / rank` with B = 0 at the start (the model is unchanged until it trains). Only the adapters
(`LoRAParam`) and the head train. `merge_lora` folds the adapters into the kernels and restores the plain
layers, so a LoRA-tuned model exports and converts to PyTorch like any other.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from labram_jax.models.labram import Transformer

TARGETS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix: the only backbone parameters that train in LoRA mode."""


class LoRALinear(nnx.Module):
    def __init__(self, base: nnx.Linear, rank: int, alpha: float, rngs: nnx.Rngs):
        d_in, d_out = base.kernel.shape
        names = base.kernel.get_metadata().get("out_sharding") or (None, None)
        self.base = base
        # A as Kaiming-uniform (the usual LoRA init), B zero: the wrapped layer starts equal to the base layer.
        bound = 1.0 / d_in ** 0.5
        self.lora_a = LoRAParam(jax.random.uniform(rngs.params(), (d_in, rank), minval=-bound, maxval=bound),
                                out_sharding=(names[0], None))
        self.lora_b = LoRAParam(jnp.zeros((rank, d_out)), out_sharding=(None, names[1]))
        self.scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        return self.base(x) + (x @ a) @ b * self.scale

    def merged(self) -> nnx.Linear:
        kernel = self.base.kernel.get_value()
        delta = self.lora_a.get_value() @ self.lora_b.get_value() * self.scale
        # A new value, not an in-place write: a host copy of the weights may be a read-only numpy array.
        self.base.kernel.set_value(kernel + delta.astype(kernel.dtype))
        return self.base


def _layers(model: Transformer):
    for block in model.blocks:
        for parent, name in TARGETS:
            yield getattr(block, parent), name


def add_lora(model: Transformer, rank: int, alpha: float, rngs: nnx.Rngs) -> Transformer:
    # As the models: adapters carry logical axis names only; labram_jax.sharding places them from its rule table.
    with nnx.use_eager_sharding(False):
        for module, name in _layers(model):
            setattr(module, name, LoRALinear(getattr(module, name), rank, alpha, rngs))
    return model


def merge_lora(model: Transformer) -> Transformer:
    for module, name in _layers(model):
        layer = getattr(module, name)
        if isinstance(layer, LoRALinear):
            setattr(module, name, layer.merged())
    return model

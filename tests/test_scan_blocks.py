"""The blocks as one lax.scan (runtime.scan_blocks, for pods and AOT checks) compute what the unrolled blocks do.

The parity tests run both forms against the original's gradients (tests/test_models_vs_reference.py, `scan`
cases, eval mode). Here: train mode, where each block has its own drop-path rate and rng, with rematerialisation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from labram_jax import configs
from labram_jax.models.labram import LaBraM, LaBraMForMEM
from labram_jax.models.vqnsp import VQNSP

CHANS = jnp.arange(6)
X = jax.random.normal(jax.random.key(1), (4, 5, 3, 200))
MASKED = jnp.tile(jnp.arange(15) % 2 == 0, (4, 1))


def small(**changes) -> configs.TransformerConfig:
    return configs.base(depth=3, drop_path_rate=0.2, drop_rate=0.1, attn_drop_rate=0.1, **changes)


def classify_loss(model, rng):
    return (model(X, CHANS, rng=rng) ** 2).sum()


def pretrain_loss(model, rng):
    x_rec, x_rec_sym = model(X, CHANS, MASKED, rng=rng)
    return (x_rec ** 2).mean() + (x_rec_sym ** 2).mean()


def tokenizer_loss(model, rng):
    return model(X, CHANS, mask=jnp.ones(X.shape[:3], bool), train=True, rng=rng)["loss"]


CASES = {
    "classify": (lambda cfg: LaBraM(cfg.replace(num_classes=3), rngs=nnx.Rngs(0)), classify_loss),
    "pretrain": (lambda cfg: LaBraMForMEM(cfg, rngs=nnx.Rngs(0)), pretrain_loss),
    "tokenizer": (lambda cfg: VQNSP(configs.TokenizerConfig(
        encoder=cfg.replace(qkv_bias=True, qk_norm=False, init_values=0.0),
        decoder=cfg.replace(depth=2, in_chans=64, qkv_bias=True, qk_norm=False, init_values=0.0),
        kmeans_init=False), rngs=nnx.Rngs(0)), tokenizer_loss),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_scanned_blocks_train_as_the_unrolled_ones(kind: str):
    """Loss and gradients of the scanned blocks, with and without rematerialisation, against the unrolled blocks
    without it (and, for the classifier, the unrolled blocks rematerialised)."""
    make, loss_fn = CASES[kind]

    def loss_and_grads(**changes):
        return jax.jit(nnx.value_and_grad(loss_fn))(make(small(**changes)), jax.random.key(7))

    loss, grads = loss_and_grads()
    flat = nnx.to_flat_state(grads)
    variants = [dict(scan_blocks=True), dict(scan_blocks=True, remat="block")]
    for changes in variants + ([dict(remat="block")] if kind == "classify" else []):
        other_loss, other_grads = loss_and_grads(**changes)
        assert loss == pytest.approx(float(other_loss), rel=1e-5), changes
        other = dict(nnx.to_flat_state(other_grads))
        assert len(flat) == len(other), changes
        for path, grad in flat:
            np.testing.assert_allclose(other[path][...], grad[...], rtol=1e-4, atol=1e-7, err_msg=f"{changes} {path}")


def test_drop_path_differs_per_block_under_the_scan():
    """The per-block rates travel through the scan: with the last block's rate at 1 - tiny, a scanned model
    drops its branch as the unrolled one does (a scan reusing block 1's rate 0 would keep it)."""
    outs = []
    for scan in (False, True):
        model = LaBraM(configs.base(depth=2, num_classes=2, drop_path_rate=0.999, scan_blocks=scan),
                       rngs=nnx.Rngs(0))
        outs.append(np.asarray(model(X, CHANS, rng=jax.random.key(3))))
    keep_all = np.asarray(LaBraM(configs.base(depth=2, num_classes=2, scan_blocks=True), rngs=nnx.Rngs(0))(
        X, CHANS, rng=jax.random.key(3)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-7)
    assert not np.allclose(outs[1], keep_all, rtol=1e-3)

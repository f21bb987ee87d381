"""The same modules on one device and on a mesh of 8 simulated CPU devices (conftest sets the device count)."""
from __future__ import annotations

import dataclasses

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from labram_jax import LaBraM, LaBraMForMEM, VQNSP, configs
from labram_jax.errors import UserError
from labram_jax.sharding import batch_sharding, logical_to_mesh, make_mesh, tree_shardings

FIXTURES = Path(__file__).parent / "fixtures" / "reference_tiny"


@pytest.fixture(scope="module")
def batch():
    data = np.load(FIXTURES / "inputs.npz")
    x = np.concatenate([data["x"]] * 4)  # 8 samples: one per data-parallel device
    mask = np.concatenate([data["mask"]] * 4)
    return jnp.asarray(x), jnp.asarray(data["input_chans"]), jnp.asarray(mask)


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8


def test_rule_table():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_mesh(("embed", "mlp"), (200, 800), mesh) == P("fsdp", "tensor")
    assert logical_to_mesh(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
    # 25 is not divisible by the fsdp axis: an error (tests/test_input_errors.py), never a silent replication.
    with pytest.raises(UserError, match="dimension 0 \\('embed', 25\\) does not divide over mesh axis 'fsdp'"):
        logical_to_mesh(("embed",), (25,), mesh)
    assert logical_to_mesh(("codebook", "code"), (8192, 64), mesh) == P(None, None)
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(data=2, fsdp=8)


@pytest.mark.parametrize("cfg", [configs.tiny(num_classes=6), configs.base(num_classes=6)], ids=["tiny", "base"])
def test_sharded_forward_equals_single_device(cfg, batch):
    x, chans, _ = batch
    graphdef, state = nnx.split(LaBraM(cfg, rngs=nnx.Rngs(0)))
    forward = jax.jit(lambda s, x, c: nnx.merge(graphdef, s)(x, c))
    single = np.asarray(forward(state, x, chans))

    mesh = make_mesh(data=2, fsdp=4)
    sharded_state = jax.device_put(state, tree_shardings(state, mesh))
    qkv = sharded_state["blocks"][0]["attn"]["qkv"]["kernel"]
    assert qkv[...].sharding.spec == P("fsdp", None)  # FSDP really splits the weights
    out = forward(sharded_state, jax.device_put(x, batch_sharding(mesh)), chans)
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), single, rtol=1e-5, atol=1e-6)


def test_sharded_pretraining_and_tokenizer(batch):
    x, chans, mask = batch
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    xs = jax.device_put(x, batch_sharding(mesh))
    for model, call in ((LaBraMForMEM(configs.tiny(vocab_size=64), rngs=nnx.Rngs(0)),
                         lambda m, x: m(x, chans, mask)),
                        (VQNSP(configs.tokenizer_tiny(kmeans_init=False), rngs=nnx.Rngs(0)),
                         lambda m, x: m(x, chans)["loss"])):
        graphdef, state = nnx.split(model)
        run = jax.jit(lambda s, x: call(nnx.merge(graphdef, s), x))
        single = run(state, x)
        sharded = run(jax.device_put(state, tree_shardings(state, mesh)), xs)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sharded, single)


def test_fsdp_pretraining_keeps_every_sharding(capfd):
    """No "involuntary full rematerialization" (a resharding XLA's partitioner can only do by replicating the
    tensor, every step) in an FSDP pretraining step. The per-window channel-embedding gather made four (its
    backward scatters batch-split updates into the embed-split table); it is a one-hot matmul now."""
    from labram_jax.recipes import pretrain_base
    from labram_jax.train import aot
    from labram_jax.train.config import MeshConfig

    exp = pretrain_base.config(configs.base(depth=1, embed_dim=100, num_heads=5, out_chans=4))
    exp = exp.replace(mesh=MeshConfig(data=-1, fsdp=4), train=dataclasses.replace(exp.train, batch_size=64))
    aot.report(exp)
    out, err = capfd.readouterr()
    assert "pretrain step compiled for 8 devices, mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in out
    assert "Involuntary full rematerialization" not in err

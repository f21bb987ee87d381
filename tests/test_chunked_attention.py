"""The chunked attention (CPU runs) computes what the explicit softmax attention computes, chunk by chunk, and
under a data-parallel mesh each device keeps to its own windows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from labram_jax import configs, sharding
from labram_jax.models.layers import chunked_attention, softmax_attention
from labram_jax.train.config import DataConfig, Experiment, RuntimeConfig
from labram_jax.train.trainer import resolve_runtime

B, L, H, HD = 8, 9, 2, 4


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal((B, L, H, HD)), jnp.float32) for _ in range(4))
    lengths = rng.integers(3, L + 1, B)
    key_mask = jnp.asarray(np.arange(L)[None, None, None, :] < lengths[:, None, None, None])
    segments = np.minimum(np.arange(L)[None, :] // rng.integers(2, L, (B, 1)), 2)  # packed windows in each row
    packed = jnp.asarray(segments[:, None, :, None] == segments[:, None, None, :])
    return q, k, v, d_out, {"none": None, "keys": key_mask, "packed": packed}


def values_and_gradients(attention, q, k, v, d_out, mask):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask), q, k, v)
    return out, vjp(d_out)


@pytest.mark.parametrize("mask", ["none", "keys", "packed"])
@pytest.mark.parametrize("windows", [1, 2, 8])
def test_chunked_attention_equals_softmax_attention(mask, windows):
    q, k, v, d_out, masks = inputs()
    scores = H * L * L * 4
    chunked = lambda *a: chunked_attention(*a, scores_bytes=windows * scores)
    want = values_and_gradients(softmax_attention, q, k, v, d_out, masks[mask])
    got = values_and_gradients(chunked, q, k, v, d_out, masks[mask])
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    if windows < B:  # the chunks really are a loop
        assert "while" in jax.jit(chunked).lower(q, k, v, masks[mask]).as_text()


def test_chunked_attention_keeps_each_device_to_its_windows():
    """On 4 devices over the batch (data 2 x fsdp 2), one window per device and chunk: 2 chunks, each taking one
    of every device's two windows; no collective moves windows between devices, and the result is the unsharded
    one."""
    q, k, v, d_out, masks = inputs(1)
    mesh = sharding.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])
    spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    def step(q, k, v, d_out, mask):
        return values_and_gradients(lambda *a: chunked_attention(*a, scores_bytes=H * L * L * 4), q, k, v, d_out,
                                    mask)
    args = [jax.device_put(x, spec) for x in (q, k, v, d_out, masks["keys"])]
    with jax.set_mesh(mesh):
        compiled = jax.jit(step).lower(*args).compile()
        got = compiled(*args)
    text = compiled.as_text()
    assert "while" in text
    for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
        assert collective not in text, collective
    want = values_and_gradients(softmax_attention, q, k, v, d_out, masks["keys"])
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_a_cpu_run_takes_the_chunked_attention_unless_told():
    exp = Experiment(stage="finetune", model=configs.tiny(num_classes=1), data=DataConfig(train=("x",)))
    assert jax.default_backend() == "cpu"
    resolved = resolve_runtime(exp)
    assert resolved.model.attention == "chunked" and resolved.tokenizer.encoder.attention == "chunked"
    assert resolve_runtime(exp, abstract=True).model.attention is None  # a pod plan is not for this CPU
    told = exp.replace(runtime=RuntimeConfig(attention="xla", tokenizer_attention="cudnn"))
    assert resolve_runtime(told).model.attention == "xla"
    assert {resolve_runtime(told).tokenizer.decoder.attention, resolve_runtime(told).tokenizer.encoder.attention} \
        == {"cudnn"}

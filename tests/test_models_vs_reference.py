"""Parity with the original PyTorch LaBraM: our models on its weights reproduce its outputs (float32, eval mode).

The vectors come from running the original code (see tests/fixtures/reference_tiny/README.md). The TINY set ships
with the tests; the base-size set is read from ../shared/reference/base when that folder is beside the checkout.
Tolerances are the reference's own (meta.json): rel = |port - ref| / |ref| over the whole array.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from labram_jax import LaBraM, from_pytorch, mem_loss
from labram_jax.configs import with_runtime
from labram_jax.convert.state_dict import rebuilt, state_dict, torch_key
from labram_jax.models.layers import attention_with_dropout, fused_attention, layer_norm, softmax_attention
from labram_jax.models.vqnsp import fourier_targets

FIXTURES = Path(__file__).parent / "fixtures" / "reference_tiny"
SHARED_BASE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "base"
SETS = [pytest.param(FIXTURES, id="tiny"),
        pytest.param(SHARED_BASE, id="base", marks=pytest.mark.skipif(
            not SHARED_BASE.is_dir(), reason="../shared/reference/base is not beside this checkout"))]


def rel(port, ref) -> float:
    port, ref = np.asarray(port, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(port - ref) / np.linalg.norm(ref))


def load(ref: Path, name: str) -> dict[str, np.ndarray]:
    return dict(np.load(ref / f"{name}.npz"))


def inputs(ref: Path) -> tuple[jax.Array, jax.Array, jax.Array]:
    data = load(ref, "inputs")
    return jnp.asarray(data["x"]), jnp.asarray(data["input_chans"]), jnp.asarray(data["mask"])


@pytest.mark.parametrize("ref", SETS)
def test_finetune_model(ref: Path):
    out = load(ref, "finetune_out")
    x, chans, _ = inputs(ref)
    model = from_pytorch(ref / "finetune.pth", kind="classify")
    assert rel(model(x, chans), out["logits"]) <= 1e-4
    assert rel(model.features(x, chans), out["pooled"]) <= 1e-4

    patches, _, _ = model.patch_tokens(x, chans, None)
    assert rel(patches, out["patch_embed"]) <= 1e-5
    h = model.embed(patches, chans, x.shape[2], chans[0])
    assert rel(h, out["embed_in"]) <= 1e-5
    for i, block in enumerate(model.blocks):
        h = block(h)
        assert rel(h, out[f"block{i}"]) <= 1e-4, f"block {i}"
    assert rel(model.fc_norm(h), out["all_tokens"]) <= 1e-4


@pytest.mark.parametrize("ref", SETS)
def test_tokenizer(ref: Path):
    out = load(ref, "tokenizer_out")
    x, chans, _ = inputs(ref)
    tokenizer = from_pytorch(ref / "tokenizer.pth", kind="tokenizer")

    np.testing.assert_array_equal(tokenizer.tokenize(x, chans), out["tokens"])
    enc = tokenizer.encode(x, chans)
    assert rel(tokenizer.encoder.patch_features(x, chans), out["encoder_feats"]) <= 1e-4
    assert rel(enc["to_quantizer"], out["to_quantizer"]) <= 1e-4
    assert rel(enc["quantize"], out["quantize"]) <= 1e-4

    amplitude, angle = fourier_targets(x)
    assert rel(amplitude, out["amp_target"]) <= 1e-5
    # The reference allows DC and Nyquist phases to differ (pi vs -pi); ours match the original on every bin.
    assert rel(angle, out["angle_target"]) <= 1e-5

    result = tokenizer(x, chans)
    assert rel(result["rec"], out["rec"]) <= 1e-4
    assert rel(result["rec_angle"], out["rec_angle"]) <= 1e-4
    for term in ("emb_loss", "rec_loss", "rec_angle_loss", "loss"):
        assert rel(result[term], out[term]) <= 1e-4, term


@pytest.mark.parametrize("ref", SETS)
def test_pretraining_model(ref: Path):
    out = load(ref, "pretrain_out")
    x, chans, mask = inputs(ref)
    model = from_pytorch(ref / "pretrain.pth", kind="pretrain")
    assert rel(model.student(x, chans, mask), out["student_tokens"]) <= 1e-4
    assert rel(model.student(x, chans, ~mask), out["student_tokens_sym"]) <= 1e-4

    x_rec, x_rec_sym = model(x, chans, mask)
    vocab = x_rec.shape[-1]
    assert rel(x_rec.reshape(-1, vocab), out["x_rec"]) <= 1e-4
    assert rel(x_rec_sym.reshape(-1, vocab), out["x_rec_sym"]) <= 1e-4

    losses = mem_loss(x_rec, x_rec_sym, jnp.asarray(load(ref, "tokenizer_out")["tokens"]), mask)
    for term in ("loss_rec", "loss_rec_sym", "loss"):
        assert rel(losses[term], out[term]) <= 1e-5, term


def test_pretraining_cls_uses_first_channel_row():
    """The original's quirk: the student's cls slot takes pos_embed[input_chans[1]], so row 0 has no effect."""
    x, chans, mask = inputs(FIXTURES)
    model = from_pytorch(FIXTURES / "pretrain.pth", kind="pretrain")
    before = np.asarray(model.student(x, chans, mask))
    model.student.pos_embed[...] = model.student.pos_embed[...].at[0, 0, :5].add(1.0)
    np.testing.assert_array_equal(model.student(x, chans, mask), before)

    classifier = from_pytorch(FIXTURES / "finetune.pth", kind="classify")
    before = np.asarray(classifier(x, chans))
    classifier.pos_embed[...] = classifier.pos_embed[...].at[0, 0, :5].add(1.0)
    assert not np.allclose(classifier(x, chans), before)


def loaded(path: Path, kind: str, scan_blocks: bool) -> nnx.Module:
    """The original's weights as `kind`, its blocks unrolled or (scan_blocks) run as one lax.scan."""
    model = from_pytorch(path, kind=kind)
    return rebuilt(model, with_runtime(model.cfg, scan_blocks=True)) if scan_blocks else model


SCAN = pytest.mark.parametrize("scan_blocks", [False, True], ids=["unrolled", "scan"])


def gradients(model: nnx.Module, loss_fn) -> tuple[jax.Array, dict, dict[str, np.ndarray], nnx.State]:
    """loss_fn(model) -> (loss, aux) differentiated with respect to the parameters: the loss, the aux, every
    parameter's gradient under the original's state-dict key, and the model's other state after the call."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def fn(p):
        module = nnx.merge(graphdef, p, rest, copy=True)
        loss, aux = loss_fn(module)
        return loss, (aux, nnx.state(module, nnx.Not(nnx.Param)))

    (loss, (aux, new_rest)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    grad_keys = {torch_key(path) for path, _ in nnx.to_flat_state(grads)}
    torch_grads = {k: v for k, v in state_dict(nnx.merge(graphdef, grads, rest)).items() if k in grad_keys}
    return loss, aux, torch_grads, new_rest


def assert_gradients_match(torch_grads: dict[str, np.ndarray], grads_ref: dict[str, np.ndarray],
                           scalars: set[str]) -> None:
    """Per tensor, rel <= 1e-3 (the reference's tolerance): float32 rounding through a few blocks, softmaxes and
    batch sums gives 1e-6 to 1e-5 here, while a wrong term, sign or transpose gives order 1."""
    unused = set(grads_ref.get("unused", np.array([], str)).tolist())
    assert set(torch_grads) == set(grads_ref) - scalars - {"unused"} | unused
    for key, grad in torch_grads.items():
        if key in unused:  # the original's loss never reaches it (torch's .grad is None)
            assert not np.any(grad), key
        elif np.linalg.norm(grads_ref[key]) < 1e-6:
            # Structurally zero gradients, where both frameworks return rounding noise: k_norm.bias (a bias shared
            # by every key shifts no softmax) and the conv biases (GroupNorm with one channel per group removes
            # them). Compare them as zero.
            assert np.linalg.norm(grad) < 1e-6, key
        else:
            assert rel(grad, grads_ref[key]) <= 1e-3, key


@SCAN
def test_finetune_gradients(scan_blocks: bool):
    grads_ref = load(FIXTURES, "finetune_grads")
    x, chans, _ = inputs(FIXTURES)
    labels = jnp.asarray(load(FIXTURES, "inputs")["labels"])
    model = loaded(FIXTURES / "finetune.pth", "classify", scan_blocks)

    def loss_fn(m):
        logits = m(x, chans)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).mean(), ()

    loss, _, torch_grads, _ = gradients(model, loss_fn)
    assert rel(loss, grads_ref["loss"]) <= 1e-5
    assert_gradients_match(torch_grads, grads_ref, {"loss", "labels"})


@SCAN
def test_tokenizer_gradients_and_codebook_update(scan_blocks: bool):
    """One train-mode step of the VQ-NSP loss (commitment + amplitude + phase) against the original's, called as
    the trainer calls it (stages._tokenizer_loss: a patch mask, train=True), and the EMA codebook it leaves."""
    grads_ref = load(FIXTURES, "tokenizer_grads")
    x, chans, _ = inputs(FIXTURES)
    tokenizer = loaded(FIXTURES / "tokenizer.pth", "tokenizer", scan_blocks)
    real = jnp.ones(x.shape[:3], bool)

    def loss_fn(m):
        out = m(x, chans, mask=real, train=True, rng=jax.random.key(0))
        return out["loss"], ()

    loss, _, torch_grads, rest = gradients(tokenizer, loss_fn)
    assert rel(loss, grads_ref["loss"]) <= 1e-5
    ema = {"ema." + k: v for k, v in state_dict(nnx.merge(nnx.graphdef(tokenizer), nnx.state(tokenizer, nnx.Param),
                                                           rest)).items()}
    for key in ("ema.quantize.embedding.weight", "ema.quantize.cluster_size"):
        assert rel(ema[key], grads_ref[key]) <= 1e-5, key
    assert_gradients_match(torch_grads, grads_ref,
                           {"loss", "ema.quantize.embedding.weight", "ema.quantize.cluster_size"})


@SCAN
def test_pretraining_gradients(scan_blocks: bool):
    """Both passes' cross-entropy with the fixed mask of inputs.npz and the original tokenizer's codes, through the
    trainer's path (stages._pretrain_loss: a patch mask, so logits for every patch) and the unpadded one."""
    grads_ref = load(FIXTURES, "pretrain_grads")
    x, chans, mask = inputs(FIXTURES)
    tokens = jnp.asarray(grads_ref["labels"])
    np.testing.assert_array_equal(tokens, load(FIXTURES, "tokenizer_out")["tokens"])
    model = loaded(FIXTURES / "pretrain.pth", "pretrain", scan_blocks)
    for padding in (jnp.ones(x.shape[:3], bool), None):
        def loss_fn(m):
            losses = mem_loss(*m(x, chans, mask, mask=padding), tokens, mask, padding)
            return losses["loss"], losses

        loss, losses, torch_grads, _ = gradients(model, loss_fn)
        for term in ("loss", "loss_rec", "loss_rec_sym"):
            assert rel(losses[term], grads_ref[term]) <= 1e-5, term
        assert_gradients_match(torch_grads, grads_ref, {"loss", "loss_rec", "loss_rec_sym", "labels"})


def test_reference_meta_matches_fixture_set():
    meta = json.loads((FIXTURES / "meta.json").read_text())
    model = from_pytorch(FIXTURES / "finetune.pth", kind="classify")
    assert (model.cfg.embed_dim, model.cfg.depth, model.cfg.num_heads) == (
        meta["config"]["dim"], meta["config"]["depth"], meta["config"]["heads"])


def test_fused_attention_paths_agree():
    """dot_product_attention (XLA) equals the explicit softmax path, and the cuDNN head-dim padding is exact."""
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 37, 5, 20))
    explicit = attention_with_dropout(q, k, v, rate=0.0, rng=jax.random.key(1))
    np.testing.assert_allclose(fused_attention(q, k, v, "xla"), explicit, rtol=1e-5, atol=1e-6)
    padded = fused_attention(q, k, v, "xla", head_multiple=8)  # 20 -> 24, as on the cuDNN path
    np.testing.assert_allclose(padded, explicit, rtol=1e-5, atol=1e-6)


def test_softmax_attention_values_and_gradients_equal_autodiff_of_the_explicit_path():
    """The hand-written backward pass equals autodiff of the plain softmax, with and without a key mask."""
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 37, 5, 20))
    keys = jnp.arange(37)[None, None, None, :] < jnp.array([37, 30])[:, None, None, None]  # [B, 1, 1, L]
    for mask in (None, keys):
        explicit = lambda q, k, v: attention_with_dropout(q, k, v, rate=0.0, rng=jax.random.key(1), mask=mask)
        ours = lambda q, k, v: softmax_attention(q, k, v, mask)
        np.testing.assert_allclose(ours(q, k, v), explicit(q, k, v), rtol=1e-5, atol=1e-6)
        weights = jax.random.normal(jax.random.key(2), q.shape)
        grads = [jax.grad(lambda *a: (f(*a) * weights).sum(), argnums=(0, 1, 2))(q, k, v) for f in (ours, explicit)]
        for got, want in zip(*grads):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused attention needs an NVIDIA GPU")
def test_cudnn_attention_matches_reference_on_gpu():
    x, chans, _ = inputs(FIXTURES)
    model = from_pytorch(FIXTURES / "finetune.pth", kind="classify")
    fused = LaBraM(model.cfg.replace(attention="cudnn", dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(fused, nnx.state(model))
    logits = jax.jit(lambda m: m(x, chans))(fused)
    assert rel(logits, load(FIXTURES, "finetune_out")["logits"]) <= 2e-2  # cuDNN attention runs in bf16


@pytest.mark.parametrize("dim", [20, 200])
def test_layer_norm_values_and_gradients_equal_autodiff_of_flax(dim: int):
    """The hand-written LayerNorm backward (layers.LayerNorm) equals autodiff of nnx.LayerNorm, at the widths
    LaBraM uses (head_dim for q_norm/k_norm, embed_dim), with a scale and bias away from (1, 0)."""
    x = jax.random.normal(jax.random.key(0), (4, 7, dim)) * 3 + 1
    d_y = jax.random.normal(jax.random.key(1), x.shape)
    with nnx.use_eager_sharding(False):  # as the models build their layers
        ours = layer_norm(dim, 1e-6, nnx.Rngs(0))
    theirs = nnx.LayerNorm(dim, epsilon=1e-6, use_fast_variance=False, rngs=nnx.Rngs(0))
    for norm in (ours, theirs):
        norm.scale[...] = jax.random.uniform(jax.random.key(2), (dim,), minval=0.5, maxval=1.5)
        norm.bias[...] = jax.random.normal(jax.random.key(3), (dim,))

    def vjp(norm):
        graphdef, params = nnx.split(norm)
        y, pullback = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
        d_params, d_x = pullback(d_y)
        return y, d_x, d_params

    (y, d_x, d_params), (y_ref, d_x_ref, d_params_ref) = vjp(ours), vjp(theirs)
    assert type(ours).__call__ is not nnx.LayerNorm.__call__
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d_x, d_x_ref, rtol=1e-5, atol=1e-5)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(d_params[name][...], d_params_ref[name][...], rtol=1e-5, atol=1e-5)

"""Padding masks: batches of mixed montages and lengths give real patches what they get without padding.

The original has no padding; without a mask every model computes exactly the original (the parity tests), and
these tests show that padding a window into a larger [N, A] grid with a mask leaves its results unchanged.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from labram_jax import LaBraMForMEM, VQNSP, configs, from_pytorch, mem_loss
from labram_jax.models.vqnsp import kmeans_cosine

FIXTURES = Path(__file__).parent / "fixtures" / "reference_tiny"
N_MAX, A_MAX = 25, 6


@pytest.fixture(scope="module")
def data():
    inputs = np.load(FIXTURES / "inputs.npz")
    return inputs["x"], inputs["input_chans"].astype(np.int32)


def pad(windows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Windows [N_i, A_i, 200] with their input_chans -> a padded batch, per-sample input_chans and the mask."""
    x = np.zeros((len(windows), N_MAX, A_MAX, 200), np.float32)
    chans = np.zeros((len(windows), N_MAX + 1), np.int32)
    mask = np.zeros((len(windows), N_MAX, A_MAX), bool)
    for i, (w, c) in enumerate(windows):
        n, a = w.shape[:2]
        x[i, :n, :a], chans[i, :n + 1], mask[i, :n, :a] = w, c, True
    return jnp.asarray(x), jnp.asarray(chans), jnp.asarray(mask)


def grid_tokens(values: jax.Array, n: int, a: int) -> np.ndarray:
    """The real tokens [n*a, ...] of one padded sample's [N_MAX*A_MAX, ...] token axis, channel-major."""
    values = np.asarray(values)
    return values.reshape((N_MAX, A_MAX) + values.shape[1:])[:n, :a].reshape((n * a,) + values.shape[1:])


def test_classifier_padded_equals_unpadded(data):
    x, chans = data
    model = from_pytorch(FIXTURES / "finetune.pth", kind="classify")
    # Two windows of different montages and lengths in one fixed-shape batch.
    windows = [(x[0], chans), (x[1, :10, :3], chans[:11])]
    xp, cp, mask = pad(windows)
    padded = model(xp, cp, mask=mask)
    for i, (w, c) in enumerate(windows):
        alone = model(jnp.asarray(w[None]), jnp.asarray(c))
        np.testing.assert_allclose(padded[i], alone[0], rtol=1e-5, atol=1e-6)
        tokens = model.patch_features(xp[i:i + 1], cp[i:i + 1], mask=mask[i:i + 1])[0]
        np.testing.assert_allclose(grid_tokens(tokens, *w.shape[:2]),
                                   model.patch_features(jnp.asarray(w[None]), jnp.asarray(c))[0],
                                   rtol=1e-4, atol=1e-5)


def test_all_true_mask_is_the_unmasked_computation(data):
    x, chans = data
    model = from_pytorch(FIXTURES / "finetune.pth", kind="classify")
    np.testing.assert_allclose(model(jnp.asarray(x), chans, mask=jnp.ones(x.shape[:3], bool)),
                               model(jnp.asarray(x), chans), rtol=1e-5, atol=1e-7)


def test_tokenizer_padded_equals_unpadded(data):
    x, chans = data
    tokenizer = from_pytorch(FIXTURES / "tokenizer.pth", kind="tokenizer")
    xp, cp, mask = pad([(x[0], chans), (x[1], chans)])
    padded = tokenizer(xp, cp, mask=mask)
    alone = tokenizer(jnp.asarray(x), chans)
    for i in range(2):
        np.testing.assert_array_equal(grid_tokens(padded["tokens"][i], 23, 4), alone["tokens"][i])
    for term in ("emb_loss", "rec_loss", "rec_angle_loss", "loss"):
        np.testing.assert_allclose(padded[term], alone[term], rtol=1e-4, err_msg=term)


def test_pretraining_loss_padded_equals_unpadded(data):
    x, chans = data
    model = from_pytorch(FIXTURES / "pretrain.pth", kind="pretrain")
    inputs = np.load(FIXTURES / "inputs.npz")
    tokens = jnp.asarray(np.load(FIXTURES / "tokenizer_out.npz")["tokens"])
    mask = jnp.asarray(inputs["mask"])
    expected = mem_loss(*model(jnp.asarray(x), chans, mask), tokens, mask)

    xp, cp, padding = pad([(x[0], chans), (x[1], chans)])

    def to_grid(values):  # [2, 23*4] -> [2, N_MAX*A_MAX], zeros where padded
        grid = np.zeros((2, N_MAX, A_MAX), np.asarray(values).dtype)
        grid[:, :23, :4] = np.asarray(values).reshape(2, 23, 4)
        return jnp.asarray(grid.reshape(2, -1))

    got = mem_loss(*model(xp, cp, to_grid(mask), mask=padding), to_grid(tokens), to_grid(mask), padding)
    for term in ("loss_rec", "loss_rec_sym", "loss"):
        np.testing.assert_allclose(got[term], expected[term], rtol=1e-5, err_msg=term)


def test_codebook_update_ignores_padding(data):
    x, chans = data
    cfg = configs.tokenizer_tiny(kmeans_init=False)
    xp, cp, mask = pad([(x[0], chans), (x[1], chans)])
    codebooks = []
    for inputs, kwargs in (((jnp.asarray(x), chans), {}), ((xp, cp), {"mask": mask})):
        tokenizer = VQNSP(cfg, rngs=nnx.Rngs(0))
        tokenizer(*inputs, train=True, **kwargs)
        codebooks.append(np.asarray(tokenizer.quantize.embedding.weight[...]))
    np.testing.assert_allclose(codebooks[1], codebooks[0], rtol=1e-5, atol=1e-6)


def lloyd_cosine(samples: np.ndarray, centres: np.ndarray, num_iters: int) -> tuple[np.ndarray, np.ndarray]:
    """The original's kmeans(use_cosine_sim=True) after its initial draw (norm_ema_quantizer.py), in float64:
    assign each sample to the most similar centre, move each centre to the l2-normalised mean of its samples,
    and leave a centre that got none where it was. Returns the centres and the last assignment's counts."""
    bins = np.zeros(len(centres), np.int64)
    for _ in range(num_iters):
        buckets = (samples @ centres.T).argmax(1)
        bins = np.bincount(buckets, minlength=len(centres))
        sums = np.zeros_like(centres)
        np.add.at(sums, buckets, samples)
        means = sums / np.maximum(bins, 1)[:, None]
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        centres = np.where((bins == 0)[:, None], centres, means)
    return centres, bins


@pytest.mark.parametrize("num_real", [pytest.param(40, id="more-samples-than-clusters"),
                                      pytest.param(4, id="fewer-samples-than-clusters")])
def test_kmeans_is_lloyd_from_distinct_real_samples(num_real: int):
    """k-means as the original's init_embed_: distinct random samples, then 10 cosine Lloyd steps, each step
    computed again here in numpy on the real samples alone, so padded samples are neither drawn nor counted.
    With fewer samples than clusters the draw repeats samples and the repeats stay empty, keeping their centre."""
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(64, 8)).astype(np.float32)
    samples /= np.linalg.norm(samples, axis=1, keepdims=True)
    clusters, iters = 6, configs.TokenizerConfig.kmeans_iters
    assert iters == 10  # init_embed_ calls kmeans(data, num_tokens, 10, use_cosine_sim=True)
    weights = jnp.asarray(np.arange(64) < num_real, jnp.float32)
    key = jax.random.key(1)

    # Zero iterations give the initial draw the same key makes: distinct real samples, as torch.randperm draws.
    start = np.asarray(kmeans_cosine(jnp.asarray(samples), clusters, 0, key, weights)[0])
    drawn = [np.flatnonzero((samples == centre).all(1)) for centre in start]
    assert all(len(i) == 1 and i[0] < num_real for i in drawn), f"initial centres are not real samples: {drawn}"
    assert len({int(i[0]) for i in drawn}) == min(num_real, clusters), f"initial centres repeat: {drawn}"

    for steps in range(1, iters + 1):
        means, bins = kmeans_cosine(jnp.asarray(samples), clusters, steps, key, weights)
        want_means, want_bins = lloyd_cosine(samples[:num_real].astype(np.float64), start.astype(np.float64), steps)
        np.testing.assert_array_equal(np.asarray(bins), want_bins, err_msg=f"{steps} steps")
        np.testing.assert_allclose(np.asarray(means), want_means, atol=1e-6, err_msg=f"{steps} steps")
    # Not a vacuous check: with enough samples the steps move the centres; with too few, clusters stay empty.
    assert np.abs(want_means - start).max() > 0.1 if num_real > clusters else (want_bins == 0).any()


def test_mask_shape_is_checked(data):
    x, chans = data
    model = from_pytorch(FIXTURES / "finetune.pth", kind="classify")
    with pytest.raises(ValueError, match=r"mask must be \[B, N, A\]"):
        model(jnp.asarray(x), chans, mask=jnp.ones((2, 23), bool))
    with pytest.raises(ValueError, match="input_chans must be"):
        model(jnp.asarray(x), chans[:5])

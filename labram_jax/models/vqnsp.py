"""VQ-NSP, LaBraM's neural tokenizer: it learns a codebook by predicting each patch's Fourier amplitude and phase.

encoder (a LaBraM Transformer) -> encode_task_layer -> l2-normalised code -> nearest of an l2-normalised codebook
(EMA-updated, k-means-initialised) -> decoder (a 3-block Transformer over the codes) -> amplitude and phase heads.
(modeling_vqnsp.py and norm_ema_quantizer.py of the original.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from labram_jax.configs import TokenizerConfig
from labram_jax.models.labram import LaBraM
from labram_jax.models.layers import FINETUNE_INIT, linear


class Codebook(nnx.Variable):
    """Quantizer state: updated by EMA and k-means, never by gradients."""


def l2norm(x: jax.Array) -> jax.Array:
    """torch's F.normalize: x / max(|x|, 1e-12)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class TaskLayer(nnx.Module):
    """Linear -> tanh -> Linear (the original's nn.Sequential; its keys are .0 and .2)."""

    def __init__(self, dim: int, out_dim: int, rngs: nnx.Rngs):
        self.fc1 = linear(dim, dim, ("embed", "mlp"), rngs, kernel_init=FINETUNE_INIT.weight)
        self.fc2 = linear(dim, out_dim, ("mlp", None), rngs, kernel_init=FINETUNE_INIT.weight)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jnp.tanh(self.fc1(x)))


class EmbeddingEMA(nnx.Module):
    def __init__(self, cfg: TokenizerConfig, rngs: nnx.Rngs):
        k, d = cfg.codebook_size, cfg.code_dim
        weight = jnp.zeros((k, d)) if cfg.kmeans_init else l2norm(jax.random.normal(rngs.params(), (k, d)))
        self.weight = Codebook(weight, out_sharding=("codebook", "code"))
        self.cluster_size = Codebook(jnp.zeros((k,)), out_sharding=("codebook",))
        # embed_avg is never read by the original's forward; it is state only so checkpoints round-trip.
        self.embed_avg = Codebook(weight, out_sharding=("codebook", "code"))
        self.initted = Codebook(jnp.array([0.0 if cfg.kmeans_init else 1.0]), out_sharding=(None,))


class NormEMAVectorQuantizer(nnx.Module):
    def __init__(self, cfg: TokenizerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.cluster_size = Codebook(jnp.zeros((cfg.codebook_size,)), out_sharding=("codebook",))
        self.embedding = EmbeddingEMA(cfg, rngs)

    def __call__(self, z: jax.Array, *, train: bool = False, rng: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """z [..., code_dim] -> (straight-through codes, commitment loss, token ids).

        In training the codebook moves by normalised EMA towards the mean of its assigned codes. The statistics are
        sums over the whole (global) batch: under jit on a mesh XLA all-reduces them, so every device holds the same
        codebook. Unlike the original, an eval call leaves all state untouched.
        """
        cfg = self.cfg
        z = l2norm(z.astype(jnp.float32))
        flat = z.reshape(-1, cfg.code_dim)
        if cfg.kmeans_init:
            self._kmeans_init(flat, jax.random.key(0) if rng is None else rng)
        codebook = self.embedding.weight[...]
        dist = ((flat ** 2).sum(1, keepdims=True) + (codebook ** 2).sum(1)
                - 2 * jnp.einsum("bd,nd->bn", flat, codebook, precision=jax.lax.Precision.HIGHEST))
        ids = jnp.argmin(dist, axis=1)
        z_q = codebook[ids].reshape(z.shape)
        if train:
            self._ema_update(flat, ids)
        loss = cfg.beta * jnp.mean((jax.lax.stop_gradient(z_q) - z) ** 2)
        z_q = z + jax.lax.stop_gradient(z_q - z)
        return z_q, loss, ids.reshape(z.shape[:-1])

    def _ema_update(self, flat: jax.Array, ids: jax.Array) -> None:
        cfg = self.cfg
        onehot = jax.nn.one_hot(ids, cfg.codebook_size, dtype=flat.dtype)
        bins = onehot.sum(0)
        self.cluster_size[...] = cfg.decay * self.cluster_size[...] + (1 - cfg.decay) * bins
        embed_sum = jnp.einsum("bd,bn->nd", flat, onehot, precision=jax.lax.Precision.HIGHEST)
        means = l2norm(embed_sum / jnp.maximum(bins, 1.0)[:, None])
        weight = self.embedding.weight[...]
        means = jnp.where((bins == 0)[:, None], weight, means)  # unused codes keep their vector
        self.embedding.weight[...] = l2norm(cfg.decay * weight + (1 - cfg.decay) * means)

    def _kmeans_init(self, flat: jax.Array, rng: jax.Array) -> None:
        """On the first batch (initted == 0): cosine k-means from random samples, as the original's init_embed_."""
        cfg, emb = self.cfg, self.embedding

        def kmeans(_):
            means, bins = kmeans_cosine(flat, cfg.codebook_size, cfg.kmeans_iters, rng)
            return means, bins.astype(jnp.float32), jnp.ones((1,))

        def keep(_):
            return emb.weight[...], emb.cluster_size[...], emb.initted[...]

        emb.weight[...], emb.cluster_size[...], emb.initted[...] = jax.lax.cond(
            emb.initted[0] > 0, keep, kmeans, None)


def kmeans_cosine(samples: jax.Array, num_clusters: int, num_iters: int, rng: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """k-means with cosine similarity on l2-normalised samples; empty clusters keep their previous centre."""
    n = samples.shape[0]
    if n >= num_clusters:
        means = samples[jax.random.permutation(rng, n)[:num_clusters]]
    else:
        means = samples[jax.random.randint(rng, (num_clusters,), 0, n)]
    bins = jnp.zeros((num_clusters,), jnp.int32)
    for _ in range(num_iters):
        buckets = jnp.argmax(samples @ means.T, axis=-1)
        bins = jnp.bincount(buckets, length=num_clusters)
        sums = jnp.zeros_like(means).at[buckets].add(samples)
        new_means = l2norm(sums / jnp.maximum(bins, 1)[:, None])
        means = jnp.where((bins == 0)[:, None], means, new_means)
    return means, bins


def std_norm(x: jax.Array) -> jax.Array:
    """One mean and one unbiased std per sample over all its channels, patches and bins (torch.std default)."""
    axes = tuple(range(1, x.ndim))
    return (x - x.mean(axes, keepdims=True)) / x.std(axes, ddof=1, keepdims=True)


def fourier_targets(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """std-normalised amplitude and phase of each patch's full 200-bin FFT, flattened to tokens [B, N*A, 200].

    The original's torch.fft.fft of a real signal is a real-to-complex transform mirrored by conjugate symmetry,
    so its DC and Nyquist bins have an imaginary part of exactly +0 and a phase of exactly 0 or pi. A complex FFT
    leaves a tiny residue there whose sign flips the phase to -pi, and since std_norm pools all bins of a sample
    that would shift every phase target; building the spectrum the same way reproduces the original.
    """
    b, n, a, t = x.shape
    half = jnp.fft.rfft(x.astype(jnp.float32), axis=-1)
    spectrum = jnp.concatenate([half, jnp.conj(half[..., 1:t - t // 2][..., ::-1])], axis=-1)
    return (std_norm(jnp.abs(spectrum)).reshape(b, n * a, t), std_norm(jnp.angle(spectrum)).reshape(b, n * a, t))


class VQNSP(nnx.Module):
    def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
        with nnx.use_eager_sharding(False):
            self.cfg = cfg
            self.encoder = LaBraM(cfg.encoder, rngs=rngs)
            self.decoder = LaBraM(cfg.decoder, rngs=rngs)
            self.quantize = NormEMAVectorQuantizer(cfg, rngs)
            self.encode_task_layer = TaskLayer(cfg.encoder.embed_dim, cfg.code_dim, rngs)
            self.decode_task_layer = TaskLayer(cfg.decoder.embed_dim, cfg.decoder_out_dim, rngs)
            self.decode_task_layer_angle = TaskLayer(cfg.decoder.embed_dim, cfg.decoder_out_dim, rngs)

    def encode(self, x: jax.Array, input_chans: jax.Array, *, train: bool = False, rng: jax.Array | None = None
               ) -> dict[str, jax.Array]:
        """Quantize each patch of x [B, N, A, 200]: token ids [B, N*A] and their codes [B, N*A, code_dim]."""
        to_quantizer = self.encode_task_layer(self.encoder.patch_features(x, input_chans))
        quantize, emb_loss, tokens = self.quantize(to_quantizer, train=train, rng=rng)
        return {"tokens": tokens, "quantize": quantize, "emb_loss": emb_loss, "to_quantizer": to_quantizer}

    def tokenize(self, x: jax.Array, input_chans: jax.Array) -> jax.Array:
        """Token ids [B, N*A] (channel-major), the pretraining targets."""
        return self.encode(x, input_chans)["tokens"]

    def decode(self, quantize: jax.Array, input_chans: jax.Array, num_patches: int) -> tuple[jax.Array, jax.Array]:
        b, length, d = quantize.shape
        codes = quantize.reshape(b, length // num_patches, num_patches, d)  # the decoder's [B, N, A, code_dim]
        feats = self.decoder.patch_features(codes, input_chans)
        return self.decode_task_layer(feats), self.decode_task_layer_angle(feats)

    def __call__(self, x: jax.Array, input_chans: jax.Array, *, train: bool = False,
                 rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """The tokenizer's loss and its terms: commitment + MSE on amplitude + MSE on phase."""
        amplitude, angle = fourier_targets(x)
        enc = self.encode(x, input_chans, train=train, rng=rng)
        rec, rec_angle = self.decode(enc["quantize"], input_chans, x.shape[2])
        rec_loss = jnp.mean((rec - amplitude) ** 2)
        rec_angle_loss = jnp.mean((rec_angle - angle) ** 2)
        return {"loss": enc["emb_loss"] + rec_loss + rec_angle_loss, "emb_loss": enc["emb_loss"],
                "rec_loss": rec_loss, "rec_angle_loss": rec_angle_loss, "tokens": enc["tokens"],
                "rec": rec, "rec_angle": rec_angle}

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
from labram_jax.models.packing import Packing


class Codebook(nnx.Variable):
    """Quantizer state: updated by EMA and k-means, never by gradients."""


class CodeAge(Codebook):
    """Quantizer state the original does not have (the dead-code restart's counter): training checkpoints and
    exports keep it; the original's state dict, and so a .pth, does not (labram_jax.convert.state_dict)."""


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
        self.embed_avg = Codebook(jnp.array(weight, copy=True), out_sharding=("codebook", "code"))  # own buffer
        self.initted = Codebook(jnp.array([0.0 if cfg.kmeans_init else 1.0]), out_sharding=(None,))


class NormEMAVectorQuantizer(nnx.Module):
    def __init__(self, cfg: TokenizerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.cluster_size = Codebook(jnp.zeros((cfg.codebook_size,)), out_sharding=("codebook",))
        self.embedding = EmbeddingEMA(cfg, rngs)
        if cfg.dead_code_restart:
            # Per code, the consecutive codebook updates in which no real patch picked it.
            self.unused_steps = CodeAge(jnp.zeros((cfg.codebook_size,), jnp.int32), out_sharding=("codebook",))

    def __call__(self, z: jax.Array, *, padding: jax.Array | None = None, train: bool = False,
                 rng: jax.Array | None = None, packing: Packing | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """z [..., code_dim] -> (straight-through codes, commitment loss, token ids).

        In training the codebook moves by normalised EMA towards the mean of its assigned codes. The statistics are
        sums over the whole (global) batch: under jit on a mesh XLA all-reduces them, so every device holds the same
        codebook. padding [...] (True = real patch) keeps padded patches out of k-means, the EMA and the loss.
        Unlike the original, an eval call changes no state (the original EMA-updates a usage statistic). With
        packing (z [B, T, code_dim]), the loss is one per window, [B, W].
        """
        cfg = self.cfg
        z = l2norm(z.astype(jnp.float32))
        flat = z.reshape(-1, cfg.code_dim)
        weights = None if padding is None else jnp.asarray(padding, jnp.float32).reshape(-1)
        codebook = self.embedding.weight[...]
        rng = jax.random.key(0) if rng is None else rng
        if cfg.kmeans_init:
            # The original k-means-initialises an empty codebook on its first forward in any mode; in eval we use
            # that codebook for this call without storing it, so eval stays free of side effects.
            if train:
                self._kmeans_init(flat, weights, rng)
                codebook = self.embedding.weight[...]
            else:
                codebook = jax.lax.cond(self.embedding.initted[0] > 0, lambda: codebook, lambda: kmeans_cosine(
                    flat, cfg.codebook_size, cfg.kmeans_iters, rng, weights)[0])
        # Code assignment stays at full float32 whatever the run's matmul precision: a token id is discrete.
        dist = ((flat ** 2).sum(1, keepdims=True) + (codebook ** 2).sum(1)
                - 2 * jnp.einsum("bd,nd->bn", flat, codebook, precision=jax.lax.Precision.HIGHEST))
        ids = jnp.argmin(dist, axis=1)
        assigned = codebook[ids]
        z_q = assigned.reshape(z.shape)
        if train:
            bins = self._ema_update(flat, ids, weights)
            if cfg.dead_code_restart:
                # Its own stream: the k-means init draws from `rng` itself.
                self._restart_dead_codes(flat, weights, bins, assigned, jax.random.fold_in(rng, 1))
        error = (jax.lax.stop_gradient(z_q) - z) ** 2
        loss = cfg.beta * (masked_mean(error, padding) if packing is None else packing.window_mean(error))
        z_q = z + jax.lax.stop_gradient(z_q - z)
        return z_q, loss, ids.reshape(z.shape[:-1])

    def _ema_update(self, flat: jax.Array, ids: jax.Array, weights: jax.Array | None) -> jax.Array:
        """One normalised-EMA step of the codebook; returns how many real patches picked each code."""
        cfg = self.cfg
        onehot = jax.nn.one_hot(ids, cfg.codebook_size, dtype=flat.dtype)
        if weights is not None:
            onehot = onehot * weights[:, None]
        bins = onehot.sum(0)
        self.cluster_size[...] = cfg.decay * self.cluster_size[...] + (1 - cfg.decay) * bins
        embed_sum = jnp.einsum("bd,bn->nd", flat, onehot, precision=jax.lax.Precision.HIGHEST)
        means = l2norm(embed_sum / jnp.maximum(bins, 1.0)[:, None])
        weight = self.embedding.weight[...]
        means = jnp.where((bins == 0)[:, None], weight, means)  # unused codes keep their vector
        self.embedding.weight[...] = l2norm(cfg.decay * weight + (1 - cfg.decay) * means)
        return bins

    def _restart_dead_codes(self, flat: jax.Array, weights: jax.Array | None, bins: jax.Array,
                            assigned: jax.Array, rng: jax.Array) -> None:
        """Re-seed every code unused for dead_code_restart updates with a real patch of this batch (l2-normalised,
        as the codebook), as SoundStream and vector-quantize-pytorch's threshold_ema_dead_code do.

        The r-th dead code takes the r-th candidate: a random order of the real patches ("random"), or the patches
        by decreasing distance to their code ("farthest"); with more dead codes than real patches the candidates
        repeat, and a batch without a real patch restarts nothing. The EMA reads only the weight, so the new vector
        holds; the statistics follow (cluster sizes of one patch, embed_avg the seed) so the state stays coherent.
        A restarted code's counter starts again, so it has dead_code_restart updates to win patches.
        """
        cfg, emb = self.cfg, self.embedding
        n = flat.shape[0]
        real = jnp.ones((n,), bool) if weights is None else weights > 0
        age = jnp.where(bins > 0, 0, self.unused_steps[...] + 1)
        if cfg.dead_code_seeds == "random":
            score = jax.random.uniform(rng, (n,))
        else:  # cosine distance to the code: flat and the codes are unit vectors
            score = 1.0 - (flat * assigned).sum(-1)
        candidates = jnp.argsort(jnp.where(real, -score, jnp.inf))  # real patches first, best candidates first
        dead = (age >= cfg.dead_code_restart) & real.any()
        rank = jnp.cumsum(dead) - 1
        seeds = flat[candidates[rank % jnp.maximum(real.sum(), 1)]]
        keep = ~dead[:, None]
        emb.weight[...] = jnp.where(keep, emb.weight[...], seeds)
        emb.embed_avg[...] = jnp.where(keep, emb.embed_avg[...], seeds)
        emb.cluster_size[...] = jnp.where(dead, 1.0, emb.cluster_size[...])
        self.cluster_size[...] = jnp.where(dead, 1.0, self.cluster_size[...])
        self.unused_steps[...] = jnp.where(dead, 0, age)

    def _kmeans_init(self, flat: jax.Array, weights: jax.Array | None, rng: jax.Array) -> None:
        """On the first batch (initted == 0): cosine k-means from random samples, as the original's init_embed_."""
        cfg, emb = self.cfg, self.embedding

        def kmeans(_):
            means, bins = kmeans_cosine(flat, cfg.codebook_size, cfg.kmeans_iters, rng, weights)
            return means, bins.astype(jnp.float32), jnp.ones((1,))

        def keep(_):
            return emb.weight[...], emb.cluster_size[...], emb.initted[...]

        emb.weight[...], emb.cluster_size[...], emb.initted[...] = jax.lax.cond(
            emb.initted[0] > 0, keep, kmeans, None)


def kmeans_cosine(samples: jax.Array, num_clusters: int, num_iters: int, rng: jax.Array,
                  weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """k-means with cosine similarity on l2-normalised samples; empty clusters keep their previous centre.

    Initial centres are distinct random samples (cycled when there are fewer samples than clusters, where the
    original draws with replacement); samples of weight 0 (padding) are never drawn and never counted.
    """
    n = samples.shape[0]
    valid = jnp.ones((n,), jnp.float32) if weights is None else weights
    order = jnp.argsort(jnp.where(valid > 0, jax.random.uniform(rng, (n,)), 2.0))  # real samples first, shuffled
    count = jnp.maximum(valid.sum().astype(jnp.int32), 1)
    means = samples[order[jnp.arange(num_clusters) % count]]
    bins = jnp.zeros((num_clusters,), jnp.float32)
    for _ in range(num_iters):
        buckets = jnp.argmax(samples @ means.T, axis=-1)
        bins = jnp.zeros((num_clusters,), jnp.float32).at[buckets].add(valid)
        sums = jnp.zeros_like(means).at[buckets].add(samples * valid[:, None])
        new_means = l2norm(sums / jnp.maximum(bins, 1)[:, None])
        means = jnp.where((bins == 0)[:, None], means, new_means)
    return means, bins


def masked_mean(x: jax.Array, padding: jax.Array | None) -> jax.Array:
    """Mean of x [B, L, ...]; with padding [B, L] (True = real), over the real entries only."""
    if padding is None:
        return jnp.mean(x)
    w = jnp.broadcast_to(jnp.asarray(padding, x.dtype).reshape(padding.shape + (1,) * (x.ndim - padding.ndim)),
                         x.shape)
    return (x * w).sum() / jnp.maximum(w.sum(), 1)


def std_norm(x: jax.Array, padding: jax.Array | None = None, packing: Packing | None = None) -> jax.Array:
    """One mean and one unbiased std per sample over all its channels, patches and bins (torch.std default);
    with padding [B, N, A] (True = real patch), over the real patches only; with packing (x [B, T, bins]), per
    window."""
    axes = tuple(range(1, x.ndim))
    if packing is not None:
        count = packing.sizes() * x.shape[-1]
        mean = packing.to_tokens(packing.window_sum(x).sum(-1) / jnp.maximum(count, 1))[..., None]
        var = packing.to_tokens(packing.window_sum((x - mean) ** 2).sum(-1) / jnp.maximum(count - 1, 1))
        return jnp.where(packing.real[..., None], (x - mean) / jnp.sqrt(var)[..., None], 0.0)
    if padding is None:
        return (x - x.mean(axes, keepdims=True)) / x.std(axes, ddof=1, keepdims=True)
    w = jnp.broadcast_to(jnp.asarray(padding, x.dtype)[..., None], x.shape)
    count = w.sum(axes, keepdims=True)
    mean = (x * w).sum(axes, keepdims=True) / count
    std = jnp.sqrt((w * (x - mean) ** 2).sum(axes, keepdims=True) / (count - 1))
    return jnp.where(w > 0, (x - mean) / std, 0.0)


def fourier_targets(x: jax.Array, padding: jax.Array | None = None, packing: Packing | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """std-normalised amplitude and phase of each patch's full 200-bin FFT, flattened to tokens [B, N*A, 200].

    The original's torch.fft.fft of a real signal is a real-to-complex transform mirrored by conjugate symmetry,
    so its DC and Nyquist bins have an imaginary part of exactly +0 and a phase of exactly 0 or pi. A complex FFT
    leaves a tiny residue there whose sign flips the phase to -pi, and since std_norm pools all bins of a sample
    that would shift every phase target; building the spectrum the same way reproduces the original.
    With packing, x is packed rows [B, T, 200] and each window is normalised on its own.
    """
    b, t = x.shape[0], x.shape[-1]
    half = jnp.fft.rfft(x.astype(jnp.float32), axis=-1)
    spectrum = jnp.concatenate([half, jnp.conj(half[..., 1:t - t // 2][..., ::-1])], axis=-1)
    return (std_norm(jnp.abs(spectrum), padding, packing).reshape(b, -1, t),
            std_norm(jnp.angle(spectrum), padding, packing).reshape(b, -1, t))


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

    def encode(self, x: jax.Array, input_chans: jax.Array | None, *, mask: jax.Array | None = None,
               train: bool = False, rng: jax.Array | None = None,
               packing: Packing | None = None) -> dict[str, jax.Array]:
        """Quantize each patch of x [B, N, A, 200]: token ids [B, N*A] and their codes [B, N*A, code_dim].

        mask [B, N, A] (True = real patch) marks padding, as for LaBraM; packed rows x [B, T, 200] give [B, T].
        """
        to_quantizer = self.encode_task_layer(self.encoder.patch_features(x, input_chans, mask=mask,
                                                                          packing=packing))
        if packing is not None:
            padding = packing.real
        else:
            padding = None if mask is None else jnp.asarray(mask, bool).reshape(to_quantizer.shape[:2])
        quantize, emb_loss, tokens = self.quantize(to_quantizer, padding=padding, train=train, rng=rng,
                                                   packing=packing)
        return {"tokens": tokens, "quantize": quantize, "emb_loss": emb_loss, "to_quantizer": to_quantizer}

    def tokenize(self, x: jax.Array, input_chans: jax.Array | None, *, mask: jax.Array | None = None,
                 packing: Packing | None = None) -> jax.Array:
        """Token ids [B, N*A] (channel-major), the pretraining targets; packed rows give [B, T]."""
        return self.encode(x, input_chans, mask=mask, packing=packing)["tokens"]

    def decode(self, quantize: jax.Array, input_chans: jax.Array | None, num_patches: int, *,
               mask: jax.Array | None = None, packing: Packing | None = None) -> tuple[jax.Array, jax.Array]:
        if packing is not None:  # the codes of a packed row are already the decoder's tokens [B, T, code_dim]
            feats = self.decoder.patch_features(quantize, None, packing=packing)
            return self.decode_task_layer(feats), self.decode_task_layer_angle(feats)
        b, length, d = quantize.shape
        codes = quantize.reshape(b, length // num_patches, num_patches, d)  # the decoder's [B, N, A, code_dim]
        feats = self.decoder.patch_features(codes, input_chans, mask=mask)
        return self.decode_task_layer(feats), self.decode_task_layer_angle(feats)

    def __call__(self, x: jax.Array, input_chans: jax.Array | None, *, mask: jax.Array | None = None,
                 train: bool = False, rng: jax.Array | None = None,
                 packing: Packing | None = None) -> dict[str, jax.Array]:
        """The tokenizer's loss and its terms: commitment + MSE on amplitude + MSE on phase. With packing (x packed
        rows [B, T, 200]) every term is one per window, [B, W], the window's alone; packing.average gives the
        batch's."""
        amplitude, angle = fourier_targets(x, mask, packing)
        enc = self.encode(x, input_chans, mask=mask, train=train, rng=rng, packing=packing)
        rec, rec_angle = self.decode(enc["quantize"], input_chans, x.shape[-2] if packing is None else 0,
                                     mask=mask, packing=packing)
        if packing is not None:
            rec_loss = packing.window_mean((rec - amplitude) ** 2)
            rec_angle_loss = packing.window_mean((rec_angle - angle) ** 2)
        else:
            padding = None if mask is None else jnp.asarray(mask, bool).reshape(rec.shape[:2])
            rec_loss = masked_mean((rec - amplitude) ** 2, padding)
            rec_angle_loss = masked_mean((rec_angle - angle) ** 2, padding)
        return {"loss": enc["emb_loss"] + rec_loss + rec_angle_loss, "emb_loss": enc["emb_loss"],
                "rec_loss": rec_loss, "rec_angle_loss": rec_angle_loss, "tokens": enc["tokens"],
                "rec": rec, "rec_angle": rec_angle}

"""Packing: several windows of different montages and lengths in one row of tokens.

A packed row holds the patch tokens of up to `num_windows` windows one after another (each channel-major, as
alone), padded to a fixed length T, and the models put one cls token per window slot in front of them. Every token
carries its window (segment id), its pos_embed row and its patch index. Attention is block-diagonal over windows,
and everything the original takes over a sample (GroupNorm statistics in the patch embedding, the tokenizer's
Fourier normalisation, pooling, the losses) is taken over a window, so each window comes out of a packed row as it
does alone.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

# Sums over a window stay exact float32 whatever the run's matmul precision: they are statistics, not features.
_EXACT = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Packing:
    segments: jax.Array  # int [B, T]: the window slot (0 .. num_windows-1) of each token, -1 for padding
    channels: jax.Array  # int [B, T]: the pos_embed row of each token
    times: jax.Array  # int [B, T]: the patch index of each token within its window (its time_embed row)
    num_windows: int  # window slots per row, each with its cls token

    @classmethod
    def of(cls, batch: Mapping[str, jax.Array]) -> Packing | None:
        """The packing of a loader batch (labram_jax.data.pipeline with pack_tokens), None for a grid batch."""
        if "segments" not in batch:
            return None
        return cls(batch["segments"], batch["token_channels"], batch["token_times"], batch["valid"].shape[1])

    @property
    def real(self) -> jax.Array:
        """[B, T] True for a real patch."""
        return self.segments >= 0

    def onehot(self) -> jax.Array:
        """[B, T, W] float32: token t belongs to window w (all zero for padding)."""
        return (self.segments[..., None] == jnp.arange(self.num_windows)).astype(jnp.float32)

    def window_sum(self, values: jax.Array) -> jax.Array:
        """Sum of values [B, T, ...] over each window's tokens: [B, W, ...], in float32."""
        return jnp.einsum("btw,bt...->bw...", self.onehot(), values.astype(jnp.float32), precision=_EXACT)

    def to_tokens(self, per_window: jax.Array) -> jax.Array:
        """Each token's value of its window, per_window [B, W, ...] -> [B, T, ...] (zero for padding)."""
        return jnp.einsum("btw,bw...->bt...", self.onehot(), per_window.astype(jnp.float32), precision=_EXACT)

    def sizes(self) -> jax.Array:
        """[B, W] the number of patch tokens of each window (0 for an empty slot)."""
        return self.onehot().sum(axis=1)

    def windows(self) -> jax.Array:
        """[B, W] True for a slot that holds a window."""
        return self.sizes() > 0

    def window_mean(self, values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
        """Mean of values [B, T, ...] over each window's (weighted) tokens and all trailing axes: [B, W]."""
        w = self.real.astype(jnp.float32) if weights is None else weights.astype(jnp.float32)
        w = w.reshape(w.shape + (1,) * (values.ndim - 2))
        b = values.shape[0]
        total = self.window_sum(values * w).reshape(b, self.num_windows, -1).sum(-1)
        count = self.window_sum(jnp.broadcast_to(w, values.shape)).reshape(b, self.num_windows, -1).sum(-1)
        return total / jnp.maximum(count, 1)

    def pool(self, tokens: jax.Array) -> jax.Array:
        """Mean of each window's patch tokens [B, T, D] -> [B, W, D]."""
        return (self.window_sum(tokens) / jnp.maximum(self.sizes(), 1)[..., None]).astype(tokens.dtype)

    def average(self, per_window: jax.Array) -> jax.Array:
        """The batch's value of a per-window quantity [B, W]: the mean over the slots that hold a window, as the
        original's mean over a batch of windows of one shape."""
        used = self.windows()
        return jnp.where(used, per_window, 0.0).sum() / jnp.maximum(used.sum(), 1)

    def first_channel(self) -> jax.Array:
        """[B, W] the pos_embed row of each window's first channel (its first token, channel-major)."""
        first = jnp.argmax(self.segments[:, None, :] == jnp.arange(self.num_windows)[:, None], axis=-1)
        return jnp.take_along_axis(self.channels, first, axis=1)

    def sequence(self) -> jax.Array:
        """[B, W+T] the window slot of each position of the blocks' input (cls slots first: slot w is window w's
        cls), -1 for padding."""
        b = self.segments.shape[0]
        slots = jnp.broadcast_to(jnp.arange(self.num_windows, dtype=self.segments.dtype), (b, self.num_windows))
        return jnp.concatenate([slots, self.segments], axis=1)

    def attention_mask(self) -> jax.Array:
        """[B, 1, W+T, W+T] True where a query may attend to a key: within its window. Padding attends only to
        padding, so it never reaches a real token."""
        sequence = self.sequence()
        return (sequence[:, :, None] == sequence[:, None, :])[:, None]


jax.tree_util.register_dataclass(Packing, data_fields=["segments", "channels", "times"], meta_fields=["num_windows"])

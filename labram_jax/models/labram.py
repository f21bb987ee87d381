"""LaBraM's neural Transformer: the fine-tuning model and the masked-EEG-modeling (pretraining) model.

Input convention, as the original: x is float32 [B, N, A, 200] (N channels, A one-second patches, the µV signal
divided by 100) and input_chans is an int array [N+1] of pos_embed rows with a leading 0 for the cls token.
Tokens are channel-major: token n*A + a is patch a of channel n.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from labram_jax.configs import NUM_CHANNEL_ROWS, TransformerConfig
from labram_jax.errors import UserError
from labram_jax.models.layers import (FINETUNE_INIT, PRETRAIN_INIT, Block, InitScheme, PatchEmbed, TemporalConv,
                                      dropout, layer_norm, linear, param, scaled, torch_default_uniform)
from labram_jax.models.packing import Packing
from labram_jax.sharding import constrain


def _block(cfg: TransformerConfig, layer: int, rngs: nnx.Rngs, init: InitScheme) -> Block:
    """Block `layer`; under nnx.eval_shape (shapes only: AOT checks, parameter counts) in a trace of its own.

    Each draw from an nnx.Rngs stream updates its counter, and Flax then asks the new tracer for its sharding; JAX
    answers with an error whose message walks every equation traced so far. Building a whole model in one trace is
    thus quadratic in its depth (24 of the 79 s of the huge recipe's AOT check); a trace per block walks one block.
    """
    if isinstance(rngs.params.key[...], jax.core.Tracer):
        return nnx.eval_shape(lambda r: Block(cfg, layer, r, init), rngs)
    return Block(cfg, layer, rngs, init)


class Transformer(nnx.Module):
    """Patch embedding, cls token, channel (pos) and time embeddings, and the blocks.

    A base class rather than a submodule, so parameter paths stay those of the original's state dict.
    """

    def _build(self, cfg: TransformerConfig, rngs: nnx.Rngs, init: InitScheme, mask_token: bool = False) -> None:
        d = cfg.embed_dim
        self.cfg = cfg
        self.patch_embed = TemporalConv(cfg, rngs, init) if cfg.in_chans == 0 else PatchEmbed(cfg, rngs)
        self.cls_token = param(rngs.params(), (1, 1, d), init.weight, (None, None, "embed"))
        if mask_token:  # defined here so state dicts list it where the original does, after cls_token
            self.mask_token = param(rngs.params(), (1, 1, d), init.weight, (None, None, "embed"))
        self.pos_embed = param(rngs.params(), (1, NUM_CHANNEL_ROWS + 1, d), init.weight, (None, None, "embed"))
        self.time_embed = param(rngs.params(), (1, cfg.time_rows, d), init.weight, (None, None, "embed"))
        self.blocks = nnx.List([_block(cfg, i + 1, rngs, init) for i in range(cfg.depth)])

    def embed(self, patches: jax.Array, input_chans: jax.Array, num_patches: int, cls_row: jax.Array) -> jax.Array:
        """cat(cls, patches) + channel embedding, then + time embedding on the patches (the original's order).

        input_chans is [N+1] (one montage for the batch) or [B, N+1]; cls_row, [] or [B], is the pos_embed row the
        cls token gets. A shared montage is gathered once and broadcast, which also keeps the batch sharding
        that GSPMD propagates from the patches.
        """
        b, _, d = patches.shape
        table = self.pos_embed[0]
        if input_chans.ndim == 1:
            pos, cls_pos = table[input_chans[None, 1:]], table[cls_row[None]]  # [1, N, D], [1, D]
        else:
            pos, cls_pos = rows(table, input_chans[:, 1:]), rows(table, cls_row)
        patch_pos = jnp.repeat(pos, num_patches, axis=1)  # channel-major
        time = jnp.tile(self.time_embed[0, :num_patches], (pos.shape[1], 1))
        cls = self.cls_token[...] + cls_pos[:, None]
        return jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), patches + patch_pos + time], axis=1)

    def embed_packed(self, patches: jax.Array, packing: Packing, cls_rows: jax.Array) -> jax.Array:
        """embed for a packed row: [B, W+T, D], window w's cls (pos_embed row cls_rows [B, W], no time embedding,
        as alone) in slot w, then the tokens with their own channel and time rows."""
        pos = self.pos_embed[0]
        cls = self.cls_token[...] + rows(pos, cls_rows)
        return jnp.concatenate([cls, patches + rows(pos, packing.channels) + rows(self.time_embed[0], packing.times)],
                               axis=1)

    def run_blocks(self, x: jax.Array, padding: jax.Array | None, rng: jax.Array | None,
                   packing: Packing | None = None) -> jax.Array:
        """The blocks over [B, 1+L, D]; padding [B, L] (True = real patch) hides padded tokens as keys. With
        packing, over [B, W+T, D] and each token attends only within its window."""
        windows = None if packing is None else packing.sequence()  # drop path draws per window
        if packing is not None:
            mask = packing.attention_mask()
        else:
            mask = None if padding is None else jnp.pad(padding, ((0, 0), (1, 0)), constant_values=True)[:, None, None]
        if rng is not None:
            drop_rng, rng = jax.random.split(rng)
            x = dropout(x, self.cfg.drop_rate, drop_rng)  # pos_drop
        x = residual_stream(x)
        if self.cfg.scan_blocks:
            return _scanned_blocks(self.blocks, x, mask, rng, self.cfg.remat, windows)
        for i, block in enumerate(self.blocks):
            x = residual_stream(_remat(block, self.cfg.remat)(x, mask, None if rng is None else
                                                              jax.random.fold_in(rng, i), windows=windows))
        return x

    def patch_tokens(self, x: jax.Array, input_chans: jax.Array, padding: jax.Array | None
                     ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Checked inputs -> (patch embeddings [B, N*A, D], input_chans, padding [B, N*A] or None)."""
        input_chans = jnp.asarray(input_chans)
        _check_input(x, input_chans, padding, self.cfg.time_rows)
        b, n, a = x.shape[:3]
        padding = None if padding is None else jnp.asarray(padding, bool).reshape(b, n * a)
        return self.patch_embed(x.astype(self.cfg.dtype), padding), input_chans, padding

    def packed_patches(self, x: jax.Array, packing: Packing) -> jax.Array:
        """Checked packed rows x [B, T, 200 or code_dim] -> patch embeddings [B, T, D]."""
        _check_packed(x, packing)
        return self.patch_embed(x.astype(self.cfg.dtype), packing=packing)


REMAT_POLICIES = {"block": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def residual_stream(x: jax.Array) -> jax.Array:
    """The blocks' input and output [B, L, D], split along the batch on a train step's mesh (sharding.constrain)."""
    return constrain(x, ("batch", None, None))


def rows(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[index] for a per-window index ([B, ...]), as a one-hot matmul. Under FSDP the table is split along
    embed and the index along the batch; a gather's backward, a scatter of batch-split updates into the
    embed-split table, is a resharding XLA's partitioner does only by replicating both ("involuntary full
    rematerialization" every step), while a matmul is FSDP's ordinary all-gather and reduce-scatter. Exact: each
    output is 1 x one row plus 0 x the others, at the highest precision."""
    onehot = jax.nn.one_hot(index, table.shape[0], dtype=table.dtype)
    return jnp.einsum("...r,rd->...d", onehot, table, precision=jax.lax.Precision.HIGHEST)


def _remat(block: Block, policy: str):
    """The block's call, rematerialised in the backward pass as the config asks (saves activation memory)."""
    if policy == "none":
        return block
    call = nnx.remat(Block.__call__, policy=REMAT_POLICIES[policy])
    return lambda x, mask, rng, windows=None: call(block, x, mask, rng, None, windows)


def _scanned_blocks(blocks: nnx.List, x: jax.Array, mask: jax.Array | None, rng: jax.Array | None,
                    policy: str, windows: jax.Array | None = None) -> jax.Array:
    """The blocks as one lax.scan over their parameters stacked at call time, so XLA compiles one block, not
    depth of them (minutes less for LaBraM-Huge's 48). The parameters stay one module per block (state-dict keys,
    layer decay and checkpoints are unchanged); each block's drop-path rate and index travel through the scan. The
    outputs are those of the unrolled loop: the same block, the same rng per block (fold_in(rng, i))."""
    graphdef = nnx.graphdef(blocks[0])
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(nnx.state(b) for b in blocks))
    rates = jnp.asarray([b.drop_path_rate for b in blocks], jnp.float32)

    def body(h, per_block):
        state, rate, i = per_block
        block_rng = None if rng is None else jax.random.fold_in(rng, i)
        return residual_stream(nnx.merge(graphdef, state, copy=True)(h, mask, block_rng, drop_path_rate=rate,
                                                                     windows=windows)), None

    if policy != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[policy])
    return jax.lax.scan(body, x, (stacked, rates, jnp.arange(len(blocks))))[0]


def _check_input(x: jax.Array, input_chans: jax.Array, padding: jax.Array | None, time_rows: int) -> None:
    if x.ndim != 4:
        raise UserError(f"x must be [B, N, A, 200] (batch, channels, patches, samples); got shape {x.shape}")
    if input_chans.shape not in ((x.shape[1] + 1,), (x.shape[0], x.shape[1] + 1)):
        raise UserError(f"input_chans must be [N+1] or [B, N+1] with N+1 = {x.shape[1] + 1} (a leading 0 for "
                        f"cls); got shape {input_chans.shape}")
    if x.shape[2] > time_rows:
        raise UserError(f"at most {time_rows} patches per channel (the model's time_embed rows, model.time_rows); "
                        f"got A = {x.shape[2]}")
    if padding is not None and tuple(padding.shape) != tuple(x.shape[:3]):
        raise UserError(f"mask must be [B, N, A] = {tuple(x.shape[:3])}; got shape {tuple(padding.shape)}")


def _check_packed(x: jax.Array, packing: Packing) -> None:
    if x.ndim != 3 or tuple(x.shape[:2]) != tuple(packing.segments.shape):
        raise ValueError(f"packed x must be [B, T, features] with [B, T] = the segments' shape "
                         f"{tuple(packing.segments.shape)}; got shape {x.shape}")
    if packing.channels.shape != packing.segments.shape or packing.times.shape != packing.segments.shape:
        raise ValueError(f"packing channels {packing.channels.shape} and times {packing.times.shape} must have the "
                         f"segments' shape {packing.segments.shape}")


def pool(tokens: jax.Array, padding: jax.Array | None) -> jax.Array:
    """Mean over patch tokens [B, L, D], over the real ones only when there is padding."""
    if padding is None:
        return tokens.mean(axis=1)
    weights = padding[..., None].astype(tokens.dtype)
    return (tokens * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)


class LaBraM(Transformer):
    """The fine-tuning model (the original's NeuralTransformer), also the tokenizer's encoder and decoder.

    Output: head(fc_norm(mean of patch tokens)); the cls token attends but is not pooled. num_classes 0 gives the
    pooled features, 1 a single binary logit.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        with nnx.use_eager_sharding(False):  # sharding is applied by labram_jax.sharding, from one rule table
            d = cfg.embed_dim
            self._build(cfg, rngs, FINETUNE_INIT)
            self.fc_norm = layer_norm(d, cfg.layer_norm_eps, rngs)
            if cfg.num_classes > 0:
                head_init = scaled(FINETUNE_INIT.weight, cfg.init_scale)
                self.head = linear(d, cfg.num_classes, ("embed", "classes"), rngs, kernel_init=head_init)
            else:
                self.head = None

    def tokens(self, x: jax.Array, input_chans: jax.Array | None, *, mask: jax.Array | None = None,
               rng: jax.Array | None = None, packing: Packing | None = None) -> jax.Array:
        """All tokens after the last block, before fc_norm: [B, 1 + N*A, D].

        mask [B, N, A] (True = real patch) marks padding in batches of mixed montages and lengths: padded patches
        take no part in GroupNorm statistics, attention or pooling, so real tokens come out as without padding.
        With packing, x is packed rows [B, T, 200] (input_chans unused: each token has its row) and the result is
        [B, W+T, D], the W cls tokens first; each window comes out as alone.
        """
        if packing is not None:
            cls_rows = jnp.zeros(packing.segments.shape[:1] + (packing.num_windows,), jnp.int32)  # input_chans[0]
            h = self.embed_packed(self.packed_patches(x, packing), packing, cls_rows)
            return self.run_blocks(h, None, rng, packing)
        patches, input_chans, padding = self.patch_tokens(x, input_chans, mask)
        h = self.embed(patches, input_chans, x.shape[2], input_chans[..., 0])
        return self.run_blocks(h, padding, rng)

    def features(self, x: jax.Array, input_chans: jax.Array | None, *, mask: jax.Array | None = None,
                 rng: jax.Array | None = None, packing: Packing | None = None) -> jax.Array:
        """fc_norm(mean over patch tokens): [B, D], the input of the head; with packing [B, W, D], per window."""
        if packing is not None:
            tokens = self.tokens(x, input_chans, rng=rng, packing=packing)[:, packing.num_windows:]
            return self.fc_norm(packing.pool(tokens))
        padding = None if mask is None else jnp.asarray(mask, bool).reshape(x.shape[0], -1)
        return self.fc_norm(pool(self.tokens(x, input_chans, mask=mask, rng=rng)[:, 1:], padding))

    def patch_features(self, x: jax.Array, input_chans: jax.Array | None, *, mask: jax.Array | None = None,
                       rng: jax.Array | None = None, packing: Packing | None = None) -> jax.Array:
        """fc_norm of every patch token: [B, N*A, D] (the original's return_patch_tokens); packed: [B, T, D]."""
        skip = 1 if packing is None else packing.num_windows
        return self.fc_norm(self.tokens(x, input_chans, mask=mask, rng=rng, packing=packing)[:, skip:])

    def __call__(self, x: jax.Array, input_chans: jax.Array | None, *, mask: jax.Array | None = None,
                 rng: jax.Array | None = None, packing: Packing | None = None) -> jax.Array:
        """Logits [B, num_classes] (features [B, D] when num_classes is 0). Pass rng to train with dropout.
        Packed rows give one row of logits per window slot: [B, W, num_classes]."""
        h = self.features(x, input_chans, mask=mask, rng=rng, packing=packing)
        return self.head(h) if self.head is not None else h


class MaskedEEGModel(Transformer):
    """The pretraining student (NeuralTransformerForMaskedEEGModeling): a mask token and a final norm."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        d = cfg.embed_dim
        self._build(cfg, rngs, PRETRAIN_INIT, mask_token=True)
        self.norm = layer_norm(d, cfg.layer_norm_eps, rngs)
        # Unused by masked EEG modeling (the wrapper owns the lm_head it trains); kept so checkpoints round-trip.
        self.lm_head = linear(d, cfg.vocab_size, ("embed", "vocab"), rngs, kernel_init=PRETRAIN_INIT.weight)

    def __call__(self, x: jax.Array, input_chans: jax.Array | None, masked: jax.Array, *,
                 mask: jax.Array | None = None, rng: jax.Array | None = None,
                 packing: Packing | None = None) -> jax.Array:
        """norm of all tokens [B, 1 + N*A, D]; masked [B, N*A] (the masked-modeling mask) is True
        where a patch is replaced by the mask token.

        mask [B, N, A] (True = real patch), as LaBraM's, hides padded patches. With packing, x is packed
        rows [B, T, 200], masked [B, T], and the result [B, W+T, D] (the W cls tokens first).
        """
        if packing is not None:
            patches = self.packed_patches(x, packing)
        else:
            patches, input_chans, mask = self.patch_tokens(x, input_chans, mask)
        w = masked[..., None].astype(patches.dtype)
        # The mask token replaces the patch before the embeddings are added: masked patches keep channel and time.
        patches = patches * (1 - w) + self.mask_token[...] * w
        # Quirk of the original: the cls slot gets the first channel's row, pos_embed[input_chans[1]], not row 0.
        if packing is not None:
            return self.norm(self.run_blocks(self.embed_packed(patches, packing, packing.first_channel()), None,
                                             rng, packing))
        h = self.embed(patches, input_chans, x.shape[2], input_chans[..., 1])
        return self.norm(self.run_blocks(h, mask, rng))


class LaBraMForMEM(nnx.Module):
    """Masked EEG modeling: predict the tokenizer's codes of masked patches, then the symmetric pass."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        with nnx.use_eager_sharding(False):
            d = cfg.embed_dim
            self.cfg = cfg
            self.student = MaskedEEGModel(cfg, rngs)
            # lm_head.bias and projection_head keep PyTorch's default init: only the student is re-initialised.
            self.lm_head = linear(d, cfg.vocab_size, ("embed", "vocab"), rngs, kernel_init=PRETRAIN_INIT.weight,
                                  bias_init=torch_default_uniform(d))
            # Unused by the original's forward; kept so checkpoints round-trip.
            self.projection_head = nnx.List([linear(d, d, ("embed", "embed"), rngs,
                                                    kernel_init=torch_default_uniform(d),
                                                    bias_init=torch_default_uniform(d))])

    def __call__(self, x: jax.Array, input_chans: jax.Array | None, masked: jax.Array, *,
                 mask: jax.Array | None = None, rng: jax.Array | None = None,
                 packing: Packing | None = None) -> tuple[jax.Array, jax.Array]:
        """Logits of the masked patches [B, M, V] and, from the second pass with ~masked, of the others [B, L-M, V].

        Every row of `masked` must hold the same number M of True entries, as the original's random_masking makes;
        row-major flattening of the outputs gives the original's boolean-index order. With `mask` [B, N, A]
        (True = real patch) rows may differ, so the logits come back for every patch, [B, L, V], and each patch's
        from the pass that hid it: the first pass's where masked is True, the symmetric pass's elsewhere. That one
        array is both elements of the pair, and mem_loss scores the masked real patches of the first and the
        unmasked real patches of the second; the lm head then runs once per patch, as in the original, rather
        than once per patch and pass. Packed rows (x [B, T, 200], masked [B, T]) give the same [B, T, V] form.
        """
        rngs = (None, None) if rng is None else jax.random.split(rng)
        skip = 1 if packing is None else packing.num_windows
        tokens = self.student(x, input_chans, masked, mask=mask, rng=rngs[0], packing=packing)[:, skip:]
        tokens_sym = self.student(x, input_chans, ~masked, mask=mask, rng=rngs[1], packing=packing)[:, skip:]
        if mask is not None or packing is not None:
            logits = self.lm_head(jnp.where(masked[..., None], tokens, tokens_sym))
            return logits, logits
        num_masked = masked_count(masked)
        x_rec = self.lm_head(select(tokens, masked, num_masked))
        x_rec_sym = self.lm_head(select(tokens_sym, ~masked, masked.shape[1] - num_masked))
        return x_rec, x_rec_sym


def masked_count(mask: jax.Array) -> int:
    """The static number of masked patches per row; the original masks exactly L - int(L * 0.5)."""
    length = mask.shape[1]
    return length - int(length * 0.5)


def select(values: jax.Array, mask: jax.Array, count: int) -> jax.Array:
    """values[mask] with a static shape [B, count, ...]: the True positions of each row, in order."""
    order = jnp.argsort(~mask, axis=1, stable=True)[:, :count]
    return jnp.take_along_axis(values, order.reshape(order.shape + (1,) * (values.ndim - 2)), axis=1)


def mem_loss(x_rec: jax.Array, x_rec_sym: jax.Array, tokens: jax.Array, masked: jax.Array,
             mask: jax.Array | None = None, packing: Packing | None = None) -> dict[str, jax.Array]:
    """Cross-entropy on both passes, summed (engine_for_pretraining.py); tokens [B, N*A] from the tokenizer.

    Each term is a mean over all its scored patches of the batch, as the original's boolean selection gives.
    With mask [B, N, A], x_rec/x_rec_sym are full [B, L, V] logits and padded patches are not scored. With
    packing (full [B, T, V] logits), every term is one loss per window, [B, W], the window's loss alone;
    packing.average gives the batch's.
    """
    def nll(logits, labels):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]

    def ce(logits, labels, weights=None):
        if weights is None:
            return nll(logits, labels).mean()
        return (nll(logits, labels) * weights).sum() / jnp.maximum(weights.sum(), 1)

    if packing is not None:
        real = packing.real
        loss_rec = packing.window_mean(nll(x_rec, tokens), masked & real)
        loss_rec_sym = packing.window_mean(nll(x_rec_sym, tokens), ~masked & real)
    elif mask is None:
        loss_rec = ce(x_rec, select(tokens, masked, x_rec.shape[1]))
        loss_rec_sym = ce(x_rec_sym, select(tokens, ~masked, x_rec_sym.shape[1]))
    else:
        real = jnp.asarray(mask, bool).reshape(masked.shape)
        loss_rec = ce(x_rec, tokens, (masked & real).astype(jnp.float32))
        loss_rec_sym = ce(x_rec_sym, tokens, (~masked & real).astype(jnp.float32))
    return {"loss": loss_rec + loss_rec_sym, "loss_rec": loss_rec, "loss_rec_sym": loss_rec_sym}

"""Analytic FLOPs of a training step, MaxText style: matmul FLOPs from the config, no compilation.

Each weight matmul costs 2 FLOPs per multiply-add in the forward pass and twice that in the backward pass (the
gradients of the input and of the weight), so 3x in training; attention adds QK^T and the weighted sum of values,
4 L D per token of a length-L sequence, also 3x. Elementwise work (norms, GELU, softmax) is left out, as MaxText
and PaLM's MFU leave it out, so XLA's own count of a compiled step is somewhat higher.

Per stage:
  pretrain   the student's two passes (masked, then the symmetric pass) and the lm_head once per patch (each
             patch's logits come from the pass that hid it), trained (3x), plus the frozen tokenizer's forward
             (encoder, task layer, codebook search) for targets;
  finetune   one pass and the head, trained;
  tokenizer  encoder, task layers, decoder and its two heads, trained; codebook search and EMA sums forward only.

Counts are for the shape the step computes: the loader's padded grid (data.max_channels x data.max_patches and
one cls token), or with packing a row of data.pack_tokens patch tokens and one cls token per window slot (attention
is computed over the whole row and masked to block-diagonal, so it costs the row's full length).
"""
from __future__ import annotations

from labram_jax.configs import PATCH_SIZE, TokenizerConfig, TransformerConfig
from labram_jax.train.config import Experiment

TRAIN = 3  # forward + backward (input and weight gradients)


def patch_embed_flops(cfg: TransformerConfig) -> float:
    """Per patch: TemporalConv's three convolutions over 25 time steps, or the decoder's 1x1 projection."""
    if cfg.in_chans:
        return 2.0 * cfg.in_chans * cfg.embed_dim
    c, steps = cfg.out_chans, PATCH_SIZE // 8  # conv1 has stride 8: 200 samples -> 25 steps
    return 2.0 * steps * (15 * c + 2 * 3 * c * c)


def transformer_flops(cfg: TransformerConfig, tokens: int, cls: int = 1) -> float:
    """Forward FLOPs of one row of `tokens` patches and `cls` cls tokens through the patch embedding and every
    block."""
    length = tokens + cls
    d = cfg.embed_dim
    weights = 2.0 * (3 * d * d + d * d + 2 * d * cfg.mlp_dim)  # qkv, proj, fc1, fc2 per token
    attention = 4.0 * length * d  # q.k over the sequence and the weighted sum of values, per token
    return tokens * patch_embed_flops(cfg) + cfg.depth * length * (weights + attention)


def _task_layer(dim: int, out: int) -> float:
    return 2.0 * (dim * dim + dim * out)  # Linear -> tanh -> Linear, per token


def tokenizer_flops(cfg: TokenizerConfig, tokens: int, cls: int = 1, *, decode: bool) -> float:
    """Forward FLOPs of one row through the tokenizer: encoder, task layer and codebook search; with decode, the
    decoder and its amplitude and phase heads too."""
    flops = transformer_flops(cfg.encoder, tokens, cls) + tokens * (
        _task_layer(cfg.encoder.embed_dim, cfg.code_dim) + 2.0 * cfg.code_dim * cfg.codebook_size)
    if decode:
        flops += transformer_flops(cfg.decoder, tokens, cls) + tokens * 2 * _task_layer(
            cfg.decoder.embed_dim, cfg.decoder_out_dim)
    return flops


def row_tokens(exp: Experiment) -> tuple[int, int]:
    """(patch tokens, cls tokens) of one batch row: a padded grid window, or a packed row."""
    d = exp.data
    return (d.pack_tokens, d.pack_windows) if d.pack_tokens else (d.max_channels * d.max_patches, 1)


def step_flops(exp: Experiment) -> float:
    """Analytic FLOPs of one training step over the global batch."""
    tokens, cls = row_tokens(exp)
    if exp.stage == "pretrain":
        lm_head = tokens * 2.0 * exp.model.embed_dim * exp.model.vocab_size  # once per patch, for both passes
        per_row = (TRAIN * (2 * transformer_flops(exp.model, tokens, cls) + lm_head)
                   + tokenizer_flops(exp.tokenizer, tokens, cls, decode=False))
    elif exp.stage == "finetune":
        head = 2.0 * exp.model.embed_dim * max(exp.model.num_classes, 0) * cls  # a head per window
        per_row = TRAIN * (transformer_flops(exp.model, tokens, cls) + head)
    else:
        t = exp.tokenizer
        search = tokens * 2.0 * t.code_dim * t.codebook_size  # not differentiated: the codes pass straight through
        trained = tokenizer_flops(t, tokens, cls, decode=True) - search
        per_row = TRAIN * trained + 2 * search  # distances, then the EMA's per-code sums
    return exp.train.batch_size * per_row

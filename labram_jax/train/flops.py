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

Counts are for the loader's padded shape (data.max_channels x data.max_patches): that is what the step computes.
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


def transformer_flops(cfg: TransformerConfig, channels: int, patches: int) -> float:
    """Forward FLOPs of one window [channels, patches] through the patch embedding and every block."""
    tokens = channels * patches
    length = tokens + 1  # the cls token
    d = cfg.embed_dim
    weights = 2.0 * (3 * d * d + d * d + 2 * d * cfg.mlp_dim)  # qkv, proj, fc1, fc2 per token
    attention = 4.0 * length * d  # q.k over the sequence and the weighted sum of values, per token
    return tokens * patch_embed_flops(cfg) + cfg.depth * length * (weights + attention)


def _task_layer(dim: int, out: int) -> float:
    return 2.0 * (dim * dim + dim * out)  # Linear -> tanh -> Linear, per token


def tokenizer_flops(cfg: TokenizerConfig, channels: int, patches: int, *, decode: bool) -> float:
    """Forward FLOPs of one window through the tokenizer: encoder, task layer and codebook search; with decode,
    the decoder and its amplitude and phase heads too."""
    tokens = channels * patches
    flops = transformer_flops(cfg.encoder, channels, patches) + tokens * (
        _task_layer(cfg.encoder.embed_dim, cfg.code_dim) + 2.0 * cfg.code_dim * cfg.codebook_size)
    if decode:
        flops += transformer_flops(cfg.decoder, channels, patches) + tokens * 2 * _task_layer(
            cfg.decoder.embed_dim, cfg.decoder_out_dim)
    return flops


def step_flops(exp: Experiment) -> float:
    """Analytic FLOPs of one training step over the global batch."""
    n, a = exp.data.max_channels, exp.data.max_patches
    tokens = n * a
    if exp.stage == "pretrain":
        lm_head = tokens * 2.0 * exp.model.embed_dim * exp.model.vocab_size  # once per patch, for both passes
        per_window = (TRAIN * (2 * transformer_flops(exp.model, n, a) + lm_head)
                      + tokenizer_flops(exp.tokenizer, n, a, decode=False))
    elif exp.stage == "finetune":
        head = 2.0 * exp.model.embed_dim * max(exp.model.num_classes, 0)
        per_window = TRAIN * (transformer_flops(exp.model, n, a) + head)
    else:
        t = exp.tokenizer
        search = tokens * 2.0 * t.code_dim * t.codebook_size  # not differentiated: the codes pass straight through
        trained = tokenizer_flops(t, n, a, decode=True) - search
        per_window = TRAIN * trained + 2 * search  # distances, then the EMA's per-code sums
    return exp.train.batch_size * per_window

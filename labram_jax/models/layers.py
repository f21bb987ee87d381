"""The building blocks LaBraM shares with its tokenizer: patch embeddings, attention, MLP, Transformer block.

Attribute names follow the original PyTorch modules (github 935963004/LaBraM, modeling_finetune.py) so that a
parameter's path reads like its state-dict key. Every parameter carries logical axis names; `sharding.py` maps
them onto a device mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from labram_jax import sharding
from labram_jax.configs import TransformerConfig
from labram_jax.models.packing import Packing

Initializer = Callable[..., jax.Array]


def trunc_normal(std: float = 0.02, bound: float = 2.0) -> Initializer:
    """timm's trunc_normal_(std, a=-bound, b=bound) with *absolute* bounds.

    The fine-tuning model and the tokenizer use timm's default bound of 2.0 (i.e. 100 sigma: untruncated); the
    pretraining model truncates at one sigma (bound = std).
    """
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -bound / std, bound / std, shape, dtype)
    return init


def torch_default_uniform(fan_in: int) -> Initializer:
    """PyTorch's default Linear/Conv init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def scaled(init: Initializer, factor: float) -> Initializer:
    return lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) * factor


def sharded(init: Initializer, *names: str | None) -> Initializer:
    return nnx.with_partitioning(init, names)


def linear(in_dim: int, out_dim: int, names: tuple[str | None, str | None], rngs: nnx.Rngs, *,
           kernel_init: Initializer, bias_init: Initializer = nnx.initializers.zeros_init(), use_bias: bool = True,
           dtype: str = "float32") -> nnx.Linear:
    return nnx.Linear(in_dim, out_dim, use_bias=use_bias, dtype=dtype, rngs=rngs,
                      kernel_init=sharded(kernel_init, *names), bias_init=sharded(bias_init, names[1]))


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs, names: tuple[str | None] = ("norm",)) -> nnx.LayerNorm:
    return LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs,
                     scale_init=sharded(nnx.initializers.ones_init(), *names),
                     bias_init=sharded(nnx.initializers.zeros_init(), *names))


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm over the last axis (two-pass variance, float32 statistics, the same output dtype) with a
    hand-written VJP: autodiff of nnx's normalisation left XLA's CPU backend a broadcast of the statistics and
    several passes per norm, 4 norms a LaBraM block (q_norm and k_norm over head_dim 20)."""

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        if mask is not None:
            return super().__call__(x, mask=mask)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        return _layer_norm(x, scale, bias, self.epsilon).astype(x.dtype)


def _ln_stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    x = x.astype(jnp.promote_types(jnp.float32, x.dtype))
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    return centred, mean, jax.lax.rsqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    centred, _, rstd = _ln_stats(x, eps)
    return centred * (rstd * scale) + bias


def _layer_norm_fwd(x, scale, bias, eps):
    centred, mean, rstd = _ln_stats(x, eps)
    return centred * (rstd * scale) + bias, (x, mean, rstd, scale)


def _layer_norm_bwd(eps, residuals, d_y):
    x, mean, rstd, scale = residuals
    x_hat = (x.astype(mean.dtype) - mean) * rstd
    batch_axes = tuple(range(x.ndim - 1))
    d_scale = (d_y * x_hat).sum(axis=batch_axes).astype(scale.dtype)
    d_bias = d_y.sum(axis=batch_axes).astype(scale.dtype)
    g = d_y * scale
    d_x = rstd * (g - g.mean(axis=-1, keepdims=True) - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
    return d_x.astype(x.dtype), d_scale, d_bias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def param(key: jax.Array, shape: tuple[int, ...], init: Initializer, names: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(init(key, shape), out_sharding=names)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def drop_path(x: jax.Array, rate: float | jax.Array, rng: jax.Array | None,
              windows: jax.Array | None = None) -> jax.Array:
    """Stochastic depth as timm's drop_path: drop the whole residual branch per sample, rescale the rest. A traced
    rate (blocks under a scan) of 0 keeps every sample and divides by 1, as the static rate 0 skips.

    windows [B, L] (packed rows: each token's window slot, -1 for padding): the sample is a window, not a row,
    so each window of a row is dropped or kept on its own draw, as it would be alone in an unpacked batch."""
    if (isinstance(rate, float) and rate == 0.0) or rng is None:
        return x
    if windows is None:
        keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    else:  # one draw per slot (slots < L); padding takes slot 0's, and no real token attends to it
        draws = jax.random.bernoulli(rng, 1.0 - rate, windows.shape)
        keep = jnp.take_along_axis(draws, jnp.maximum(windows, 0), axis=1)[..., None]
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """torch's nn.GELU, the exact erf form, written as torch computes it: x/2 (1 + erf(x/sqrt 2)). (jax.nn.gelu's
    erfc form lowers to a slower kernel on CPU: 1.3 s of a LaBraM-Base pretraining step.)"""
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476).astype(x.dtype))


@dataclasses.dataclass(frozen=True)
class InitScheme:
    """How the original initialises a model; the fine-tuning and pretraining scripts differ."""

    trunc_bound: float  # timm's absolute bound: 2.0 (fine-tune, tokenizer) or 0.02 = one sigma (pretraining)
    torch_default_convs: bool  # fine-tune/tokenizer leave Conv2d at PyTorch's default; pretraining re-inits it

    @property
    def weight(self) -> Initializer:
        return trunc_normal(0.02, self.trunc_bound)


FINETUNE_INIT = InitScheme(trunc_bound=2.0, torch_default_convs=True)
PRETRAIN_INIT = InitScheme(trunc_bound=0.02, torch_default_convs=False)


class TemporalConv(nnx.Module):
    """Patch embedding of raw EEG: three conv -> GroupNorm -> GELU stages along time.

    The original runs Conv2d over a [B, 1, N*A, 200] image, so GroupNorm statistics span every token of a sample;
    and it flattens the output time-major, feature = t * out_chans + c. Both are reproduced here.
    """

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, init: InitScheme):
        c = cfg.out_chans

        def conv(cin: int, width: int, stride: int) -> nnx.Conv:
            if init.torch_default_convs:
                kernel_init = bias_init = torch_default_uniform(cin * width)
            else:
                kernel_init, bias_init = init.weight, nnx.initializers.zeros_init()
            return nnx.Conv(cin, c, kernel_size=(1, width), strides=(1, stride), padding=((0, 0), (width // 2,) * 2),
                            kernel_init=sharded(kernel_init, None, None, None, None),
                            bias_init=sharded(bias_init, None), dtype=cfg.dtype, rngs=rngs)

        def group_norm() -> nnx.GroupNorm:
            return nnx.GroupNorm(c, num_groups=4, epsilon=1e-5, use_fast_variance=False, rngs=rngs,
                                 scale_init=sharded(nnx.initializers.ones_init(), None),
                                 bias_init=sharded(nnx.initializers.zeros_init(), None))

        self.conv1, self.norm1 = conv(1, 15, 8), group_norm()
        self.conv2, self.norm2 = conv(c, 3, 1), group_norm()
        self.conv3, self.norm3 = conv(c, 3, 1), group_norm()

    def __call__(self, x: jax.Array, padding: jax.Array | None = None, packing: Packing | None = None
                 ) -> jax.Array:
        """x [B, N, A, 200] -> [B, N*A, D]; padding [B, N*A] (True = real patch) keeps padded patches out of the
        GroupNorm statistics. With packing, x is a packed row [B, T, 200] and the statistics are each window's."""
        b, t = x.shape[0], x.shape[-1]
        h = x.reshape(b, -1, t, 1)  # NHWC: H = token, W = time
        for conv, norm in ((self.conv1, self.norm1), (self.conv2, self.norm2), (self.conv3, self.norm3)):
            h = conv(h)
            if packing is not None:
                h = gelu(window_group_norm(norm, h, packing))
                continue
            where = None if padding is None else jnp.broadcast_to(padding[:, :, None, None], h.shape)
            h = gelu(norm(h, mask=where))
        return h.reshape(b, h.shape[1], -1)  # [B, NA, T, C] -> (T C)


def window_group_norm(norm: nnx.GroupNorm, h: jax.Array, packing: Packing) -> jax.Array:
    """nnx.GroupNorm of h [B, T, S, C] with each window's statistics (its tokens x S x the group's channels), as the
    original's per-sample statistics for that window alone; mean first, then the mean squared deviation."""
    b, l, s, c = h.shape
    g = h.astype(jnp.float32).reshape(b, l, s, norm.num_groups, c // norm.num_groups)
    count = packing.sizes()[..., None] * (s * c // norm.num_groups)  # [B, W, 1]

    def per_token_mean(values: jax.Array) -> jax.Array:  # [B, T, S, G, C/G] -> each token's window mean [B, T, G]
        return packing.to_tokens(packing.window_sum(values).sum(axis=(2, 4)) / jnp.maximum(count, 1))

    mean = per_token_mean(g)[:, :, None, :, None]
    var = per_token_mean((g - mean) ** 2)[:, :, None, :, None]
    scale = jnp.broadcast_to(jax.lax.rsqrt(var + norm.epsilon), g.shape).reshape(b, l, s, c) * norm.scale[...]
    return ((g - mean).reshape(b, l, s, c) * scale + norm.bias[...]).astype(h.dtype)


class PatchEmbed(nnx.Module):
    """The tokenizer decoder's patch embedding: a 1x1 convolution of the code vectors (a per-token linear map)."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        init = torch_default_uniform(cfg.in_chans)
        self.proj = nnx.Conv(cfg.in_chans, cfg.embed_dim, kernel_size=(1, 1),
                             kernel_init=sharded(init, None, None, "code", "embed"),
                             bias_init=sharded(init, "embed"), dtype=cfg.dtype, rngs=rngs)

    def __call__(self, x: jax.Array, padding: jax.Array | None = None, packing: Packing | None = None
                 ) -> jax.Array:
        # x [B, N, A, code_dim], or a packed row [B, T, code_dim]; a per-token map, so padding and packing need no
        # special care
        if packing is not None:
            return self.proj(x[:, :, None]).reshape(x.shape[0], x.shape[1], -1)
        b, n, a, _ = x.shape
        return self.proj(x).reshape(b, n * a, -1)


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, weight_init: Initializer, proj_init: Initializer):
        d = cfg.embed_dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attention, self.attn_drop_rate, self.drop_rate = cfg.attention, cfg.attn_drop_rate, cfg.drop_rate
        self.qkv = linear(d, 3 * d, ("embed", "qkv"), rngs, kernel_init=weight_init, use_bias=False, dtype=cfg.dtype)
        # The original has q and v biases but no k bias (it concatenates zeros in the middle).
        self.q_bias = nnx.Param(jnp.zeros((d,)), out_sharding=("qkv",)) if cfg.qkv_bias else None
        self.v_bias = nnx.Param(jnp.zeros((d,)), out_sharding=("qkv",)) if cfg.qkv_bias else None
        self.q_norm = layer_norm(cfg.head_dim, cfg.layer_norm_eps, rngs, (None,)) if cfg.qk_norm else None
        self.k_norm = layer_norm(cfg.head_dim, cfg.layer_norm_eps, rngs, (None,)) if cfg.qk_norm else None
        self.proj = linear(d, d, ("qkv", "embed"), rngs, kernel_init=proj_init, dtype=cfg.dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 rngs: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """x [B, L, D]; mask, boolean broadcastable to [B, 1 (heads), L (queries), L (keys)], True where a query may
        attend to a key: [B, 1, 1, L] hides padding, [B, 1, L, L] keeps packed windows apart."""
        b, l, d = x.shape
        qkv = self.qkv(x)
        if self.q_bias is not None:
            qkv = qkv + jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.v_bias[...]), self.v_bias[...]])
        qkv = qkv.reshape(b, l, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, hd]
        if self.q_norm is not None:  # per-head LayerNorm before the 1/sqrt(hd) scaling, as the original
            # LayerNorm computes in float32; back to v's dtype (as the original's type_as) for bf16 compute.
            q, k = self.q_norm(q).astype(v.dtype), self.k_norm(k).astype(v.dtype)
        attn_rng, proj_rng = rngs if rngs is not None else (None, None)
        if self.attn_drop_rate > 0.0 and attn_rng is not None:
            out = attention_with_dropout(q, k, v, self.attn_drop_rate, attn_rng, mask)
        elif self.attention == "cudnn":
            out = fused_attention(q, k, v, self.attention, mask=mask)
        elif self.attention == "chunked":
            out = chunked_attention(q, k, v, mask)
        else:
            out = softmax_attention(q, k, v, mask)
        return dropout(self.proj(out.reshape(b, l, d)), self.drop_rate, proj_rng)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None,
                    head_multiple: int | None = None, mask: jax.Array | None = None) -> jax.Array:
    """jax.nn.dot_product_attention on [B, L, H, hd], so GPUs get cuDNN's fused kernel.

    cuDNN needs head_dim % 8 == 0 and LaBraM's head dims (20, 25, 50) are not; zero-padding q, k and v to
    `head_multiple` (8 for cuDNN) changes no score (the padded coordinates add 0 to q.k) and only appends zero
    output columns, which are sliced off. The scale stays 1/sqrt(real head_dim).
    """
    hd = q.shape[-1]
    multiple = head_multiple or (8 if implementation == "cudnn" else 1)
    pad = (-hd) % multiple
    if pad:
        widths = ((0, 0),) * 3 + ((0, pad),)
        q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=hd ** -0.5, implementation=implementation)
    return out[..., :hd]


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(hd)) v on [B, L, H, hd], the original's explicit attention, with a hand-written VJP.

    Profiled on CPU, autodiff of the softmax makes XLA stream the [B, H, L, L] scores through memory several
    times and keep the probabilities for the backward pass; here the backward recomputes them and uses
    dS = P * (dP - rowsum(dO * O)), so a step reads and writes fewer L x L tensors and stores none. mask:
    boolean, broadcastable to [B, H, L, L] (True = attend).
    """
    hd = q.shape[-1]
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q * hd ** -0.5, k, v))  # [B, H, L, hd], as the original
    return _attention(q, k, v, mask).transpose(0, 2, 1, 3)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                      scores_bytes: int = 4 * 2 ** 20) -> jax.Array:
    """softmax_attention over chunks of the batch, one chunk after another (lax.map), each the most windows per
    device whose float32 scores fit `scores_bytes`.

    On a CPU a whole batch's [B, H, L, L] scores stream through memory several times in the forward and the
    backward pass; a chunk's stay in cache. LaBraM-Base, [16, 231, 10, 20], one thread: forward 37 -> 18 ms,
    forward + backward 86 -> 55 ms, with chunks of 2 windows (4.3 MB of scores). Under a data-parallel mesh chunk
    i takes windows i, i + n, i + 2n, ... (n chunks), so that each device computes its own windows at every step.
    """
    b, l, h, _ = q.shape
    local = b // sharding.devices_along("batch")
    fits = [c for c in range(1, local + 1) if local % c == 0 and c * h * l * l * 4 <= scores_bytes]
    steps = local // max(fits, default=1)
    if steps == 1:
        return softmax_attention(q, k, v, mask)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, *mask.shape[1:]))

    def strided(t: jax.Array) -> jax.Array:  # [B, ...] -> [steps, B / steps, ...]
        t = t.reshape(b // steps, steps, *t.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(t, (None, "batch") + (None,) * (t.ndim - 2))

    out = jax.lax.map(lambda xs: softmax_attention(*xs), (strided(q), strided(k), strided(v),
                                                         None if mask is None else strided(mask)))
    return out.swapaxes(0, 1).reshape(q.shape)


def _probabilities(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
    scores = jnp.einsum("bhld,bhmd->bhlm", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    p = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    return p * (1.0 / p.sum(axis=-1, keepdims=True))


@jax.custom_vjp
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    return jnp.einsum("bhlm,bhmd->bhld", _probabilities(q, k, mask).astype(v.dtype), v)


def _attention_fwd(q, k, v, mask):
    out = _attention(q, k, v, mask)
    return out, (q, k, v, mask, out)


def _attention_bwd(residuals, d_out):
    q, k, v, mask, out = residuals
    p = _probabilities(q, k, mask)
    # d_v and d_k contract over the queries, the scores' rows; written as [B, H, hd, L] products (transposed
    # back after, a small copy), XLA's CPU backend computes them in 0.6x the time of the [B, H, L, hd] forms.
    d_v = jnp.einsum("bhld,bhlm->bhdm", d_out, p.astype(d_out.dtype)).swapaxes(-1, -2)
    d_p = jnp.einsum("bhld,bhmd->bhlm", d_out, v, preferred_element_type=jnp.float32)
    d_s = p * (d_p - (d_out * out).sum(axis=-1, keepdims=True, dtype=jnp.float32))
    d_s = d_s.astype(q.dtype)
    d_q = jnp.einsum("bhlm,bhmd->bhld", d_s, k)
    d_k = jnp.einsum("bhld,bhlm->bhdm", q, d_s).swapaxes(-1, -2)
    return d_q, d_k, d_v.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention_with_dropout(q: jax.Array, k: jax.Array, v: jax.Array, rate: float, rng: jax.Array,
                           mask: jax.Array | None = None) -> jax.Array:
    """The explicit softmax path, only for training with attention dropout (no fused kernel takes a dropout)."""
    scores = jnp.einsum("blhd,bmhd->bhlm", q * q.shape[-1] ** -0.5, k)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1), rate, rng)
    return jnp.einsum("bhlm,bmhd->blhd", probs, v)


class Mlp(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, weight_init: Initializer, fc2_init: Initializer):
        self.drop_rate = cfg.drop_rate
        self.fc1 = linear(cfg.embed_dim, cfg.mlp_dim, ("embed", "mlp"), rngs, kernel_init=weight_init, dtype=cfg.dtype)
        self.fc2 = linear(cfg.mlp_dim, cfg.embed_dim, ("mlp", "embed"), rngs, kernel_init=fc2_init, dtype=cfg.dtype)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        # The original has no dropout between fc1 and fc2 (it is commented out there).
        return dropout(self.fc2(gelu(self.fc1(x))), self.drop_rate, rng)


class Block(nnx.Module):
    """Pre-norm Transformer block with optional layer scale (gamma) and stochastic depth."""

    def __init__(self, cfg: TransformerConfig, layer: int, rngs: nnx.Rngs, init: InitScheme):
        d = cfg.embed_dim
        weight_init = init.weight
        # fix_init_weight: the residual projections of block `layer` (1-based) are divided by sqrt(2 * layer).
        rescaled = scaled(weight_init, 1.0 / math.sqrt(2.0 * layer))
        self.drop_path_rate = cfg.drop_path_rate * (layer - 1) / max(cfg.depth - 1, 1)  # torch.linspace rule
        self.norm1 = layer_norm(d, cfg.layer_norm_eps, rngs)
        self.attn = Attention(cfg, rngs, weight_init, rescaled)
        self.norm2 = layer_norm(d, cfg.layer_norm_eps, rngs)
        self.mlp = Mlp(cfg, rngs, weight_init, rescaled)
        if cfg.init_values > 0:
            self.gamma_1 = nnx.Param(jnp.full((d,), cfg.init_values, jnp.float32), out_sharding=("norm",))
            self.gamma_2 = nnx.Param(jnp.full((d,), cfg.init_values, jnp.float32), out_sharding=("norm",))
        else:
            self.gamma_1 = self.gamma_2 = None

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, rng: jax.Array | None = None,
                 drop_path_rate: jax.Array | None = None, windows: jax.Array | None = None) -> jax.Array:
        """x [B, L, D]; mask: the attention mask (see Attention); drop_path_rate: this block's, when the blocks
        run under a scan (one graph for all of them) rather than from the block's own attribute; windows [B, L]:
        each position's window slot in a packed row (drop_path)."""
        rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        rngs = jax.random.split(rng, 5) if rng is not None else [None] * 5
        h = self.attn(self.norm1(x), mask, (rngs[0], rngs[1]))
        if self.gamma_1 is not None:
            h = self.gamma_1[...] * h
        x = x + drop_path(h, rate, rngs[2], windows)
        h = self.mlp(self.norm2(x), rngs[3])
        if self.gamma_2 is not None:
            h = self.gamma_2[...] * h
        return x + drop_path(h, rate, rngs[4], windows)

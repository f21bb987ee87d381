"""Typed, frozen model configs for LaBraM and its VQ-NSP tokenizer.

Defaults are the original's (github 935963004/LaBraM, c431221): the `labram_*` factories in modeling_finetune.py
and modeling_pretrain.py with the README's fine-tuning flags, and `vqnsp_encoder_*` in modeling_vqnsp.py with the
README's 8192 x 64 codebook. Variants are small functions returning a config, as big_vision does.

A config is the architecture (what an export keeps) and, in RUNTIME_FIELDS, how it runs: compute dtype, attention
implementation, rematerialisation and whether the blocks run as a scan, set where the model runs (the trainer from its run's config; `labram embed`
and `labram convert` at the defaults: float32, the explicit attention, no remat). Matmul precision is not a config
field at all: the trainer sets it around its step.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal, TypeVar

from labram_jax.errors import UserError

PATCH_SIZE = 200  # samples per patch: one second at 200 Hz
NUM_CHANNEL_ROWS = 128  # channel slots of pos_embed; row 0 is the cls token
MAX_PATCHES = 16  # the original's rows of time_embed: at most 16 one-second patches per channel
# The longest window a model (time_rows) or labram prep takes: 10 minutes, past what attention over a window holds.
MAX_WINDOW_S = 600


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The neural Transformer: fine-tuning model, pretraining student, and tokenizer encoder/decoder."""

    embed_dim: int = 200
    depth: int = 12
    num_heads: int = 10
    mlp_ratio: float = 4.0
    # TemporalConv width; 25 time steps x out_chans must equal embed_dim.
    out_chans: int = 8
    # 0 means TemporalConv over raw 200-sample patches; > 0 is the tokenizer decoder's 1x1 projection of codes.
    in_chans: int = 0
    qkv_bias: bool = False
    qk_norm: bool = True
    # Layer scale: gamma_1/gamma_2 exist only when init_values > 0 (the tokenizer uses 0).
    init_values: float = 0.1
    layer_norm_eps: float = 1e-6
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # The fine-tuning head: 0 = no head (features), 1 = one binary logit, C > 1 = C classes.
    num_classes: int = 0
    init_scale: float = 0.001
    # The pretraining vocabulary (lm_head width); the tokenizer's codebook size.
    vocab_size: int = 8192
    # Rows of time_embed, one per one-second patch of a window: the original's 16, or more for longer windows (a
    # run extends a checkpoint's rows as train.extend_time says).
    time_rows: int = MAX_PATCHES
    # The runtime settings (RUNTIME_FIELDS), which an export does not keep.
    # None/'xla': the explicit softmax attention (layers.softmax_attention), anywhere; 'chunked': the same over
    # cache-sized chunks of the batch, for CPUs (the trainer's choice there); 'cudnn': cuDNN's fused kernel
    # through jax.nn.dot_product_attention, on NVIDIA GPUs.
    attention: Literal["xla", "chunked", "cudnn"] | None = None
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # Rematerialisation of each block in the backward pass: "none", "block" (recompute everything) or "dots"
    # (keep matmul outputs, recompute the rest).
    remat: Literal["none", "block", "dots"] = "none"
    # Run the blocks as one lax.scan (one block compiled instead of depth): for pods and AOT checks, where compile
    # time grows with depth; off by default, as XLA's CPU backend runs the matmuls inside a loop more slowly.
    scan_blocks: bool = False

    def __post_init__(self) -> None:
        for name, least in (("embed_dim", 1), ("depth", 0), ("num_heads", 1), ("out_chans", 1), ("in_chans", 0),
                            ("num_classes", 0), ("vocab_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"{name} must be an integer of at least {least}, not {value!r}")
        if not (isinstance(self.mlp_ratio, (int, float)) and 0 < self.mlp_ratio < 1e6):
            raise UserError(f"mlp_ratio must be a positive number, not {self.mlp_ratio!r}")
        if self.embed_dim % self.num_heads:
            raise UserError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.in_chans == 0 and 25 * self.out_chans != self.embed_dim:
            raise UserError(f"TemporalConv gives 25 * out_chans = {25 * self.out_chans} features, "
                            f"but embed_dim is {self.embed_dim}")
        if not (isinstance(self.time_rows, int) and 1 <= self.time_rows <= MAX_WINDOW_S):
            raise UserError(f"time_rows must be an integer from 1 to {MAX_WINDOW_S}, not {self.time_rows!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """VQ-NSP: encoder -> task layer -> normalised-EMA codebook -> decoder -> amplitude and phase heads."""

    encoder: TransformerConfig = TransformerConfig(qkv_bias=True, qk_norm=False, init_values=0.0)
    decoder: TransformerConfig = TransformerConfig(depth=3, in_chans=64, qkv_bias=True, qk_norm=False,
                                                   init_values=0.0)
    codebook_size: int = 8192
    code_dim: int = 64
    decay: float = 0.99
    beta: float = 1.0  # commitment weight
    kmeans_init: bool = True
    kmeans_iters: int = 10
    decoder_out_dim: int = PATCH_SIZE  # one amplitude (or phase) per FFT bin of a patch
    # > 0: a code that no real patch picked in this many consecutive codebook updates is re-seeded from a patch of
    # the current batch (NormEMAVectorQuantizer). 0, the original's behaviour, adds no state. A code used
    # uniformly misses a batch of P patches with probability (1 - 1/codebook_size)^P, so a K too small takes live
    # codes for dead. On EEGMAT (3,200 patches a batch, 8,192 codes) K=10 kept the most codes in use with the
    # lowest held-out loss, ahead of K=30 (bench/RESULTS.md).
    dead_code_restart: int = 0
    # Which patches seed the dead codes: "random" real patches of the batch, or those "farthest" from their code
    # (the largest quantisation error first).
    dead_code_seeds: Literal["random", "farthest"] = "random"

    def __post_init__(self) -> None:
        if self.decoder.in_chans != self.code_dim:
            raise UserError(f"decoder.in_chans ({self.decoder.in_chans}) must equal code_dim ({self.code_dim})")
        if self.dead_code_restart < 0:
            raise UserError(f"tokenizer.dead_code_restart must be >= 0 (0 = off), not {self.dead_code_restart}")
        if self.dead_code_seeds not in ("random", "farthest"):
            raise UserError(f"tokenizer.dead_code_seeds must be 'random' or 'farthest', not {self.dead_code_seeds!r}")

    def replace(self, **changes) -> "TokenizerConfig":
        return dataclasses.replace(self, **changes)


# The largest model a checkpoint or export may describe before it is built: its file's shapes decide the model, so
# a few bytes could otherwise ask for hundreds of gigabytes. Five times LaBraM-Huge's 369M; LABRAM_JAX_MAX_PARAMETERS
# sets another limit, for a model larger still.
MAX_PARAMETERS = 2_000_000_000
MAX_PARAMETERS_ENV = "LABRAM_JAX_MAX_PARAMETERS"


def parameter_count(cfg: "TransformerConfig | TokenizerConfig") -> int:
    """About how many parameters the model has (within a third: 7.5M for LaBraM-Base's 5.8M, 376M for Huge's 383M
    in pretraining), from its config alone: the blocks' matrices, the embeddings and the widest heads; a
    tokenizer's encoder, decoder, codebook and heads. What a size limit needs, before anything is built."""
    if isinstance(cfg, TokenizerConfig):
        e, dec = cfg.encoder, cfg.decoder
        heads = 2 * (dec.embed_dim * dec.embed_dim + dec.embed_dim * cfg.decoder_out_dim)
        return (parameter_count(e.replace(num_classes=0)) + parameter_count(dec.replace(num_classes=0))
                + cfg.codebook_size * cfg.code_dim + 2 * e.embed_dim * cfg.code_dim + heads)
    d, h = cfg.embed_dim, cfg.mlp_dim
    block = 4 * d * d + 2 * d * h + 10 * d + h
    embeddings = (NUM_CHANNEL_ROWS + 2 + cfg.time_rows) * d + max(cfg.in_chans, 1) * d
    return cfg.depth * block + embeddings + d * (cfg.num_classes + cfg.vocab_size)


def check_size(cfg: "TransformerConfig | TokenizerConfig", source: str) -> None:
    """A one-line UserError when `cfg` describes a model of more parameters than the limit (MAX_PARAMETERS, or
    LABRAM_JAX_MAX_PARAMETERS where set)."""
    text = os.environ.get(MAX_PARAMETERS_ENV, "")
    if text and not text.isdigit():
        raise UserError(f"{MAX_PARAMETERS_ENV}={text!r} is not a whole number of parameters")
    limit, count = int(text or MAX_PARAMETERS), parameter_count(cfg)
    if count > limit:
        raise UserError(f"{source} describes a model of {count:,} parameters, more than the {limit:,} this "
                        f"reader builds (set {MAX_PARAMETERS_ENV} to build it)")


def time_rows_of(cfg: "TransformerConfig | TokenizerConfig") -> int:
    """The windows' patches a model of `cfg` embeds: its time_embed rows (a tokenizer's encoder and decoder: the
    fewer)."""
    if isinstance(cfg, TokenizerConfig):
        return min(cfg.encoder.time_rows, cfg.decoder.time_rows)
    return cfg.time_rows


def with_time_rows(cfg: "TransformerConfig | TokenizerConfig", rows: int) -> "TransformerConfig | TokenizerConfig":
    """`cfg` with `rows` time_embed rows (a tokenizer's encoder and decoder both)."""
    if isinstance(cfg, TokenizerConfig):
        return cfg.replace(encoder=cfg.encoder.replace(time_rows=rows), decoder=cfg.decoder.replace(time_rows=rows))
    return cfg.replace(time_rows=rows)


RUNTIME_FIELDS = ("attention", "dtype", "remat", "scan_blocks")
Config = TypeVar("Config", TransformerConfig, TokenizerConfig)


def with_runtime(cfg: Config, **settings: Any) -> Config:
    """`cfg`'s architecture with runtime `settings` (RUNTIME_FIELDS) on each of its Transformers."""
    if unknown := set(settings) - set(RUNTIME_FIELDS):
        raise UserError(f"not runtime settings: {', '.join(sorted(unknown))} (they are {', '.join(RUNTIME_FIELDS)})")
    if isinstance(cfg, TokenizerConfig):
        return cfg.replace(encoder=cfg.encoder.replace(**settings), decoder=cfg.decoder.replace(**settings))
    return cfg.replace(**settings)


def runtime_of(cfg: Config) -> dict[str, Any]:
    """The runtime settings of `cfg` (a tokenizer's: its encoder's, which the trainer sets as its decoder's)."""
    transformer = cfg.encoder if isinstance(cfg, TokenizerConfig) else cfg
    return {name: getattr(transformer, name) for name in RUNTIME_FIELDS}


def architecture(cfg: TransformerConfig | TokenizerConfig) -> dict[str, Any]:
    """`cfg` as a dict without its runtime settings: what an export keeps."""
    def strip(raw: dict[str, Any]) -> dict[str, Any]:
        return {k: strip(v) if isinstance(v, dict) else v for k, v in raw.items() if k not in RUNTIME_FIELDS}
    return strip(dataclasses.asdict(cfg))


# The paper's three sizes (modeling_finetune.py factories; the pretraining factories match).
def base(**overrides) -> TransformerConfig:
    """LaBraM-Base, 5.8M parameters."""
    return TransformerConfig(**overrides)


def large(**overrides) -> TransformerConfig:
    """LaBraM-Large, 46M parameters."""
    return TransformerConfig(embed_dim=400, depth=24, num_heads=16, out_chans=16).replace(**overrides)


def huge(**overrides) -> TransformerConfig:
    """LaBraM-Huge, 369M parameters."""
    return TransformerConfig(embed_dim=800, depth=48, num_heads=16, out_chans=32).replace(**overrides)


def tiny(**overrides) -> TransformerConfig:
    """The TINY parity set's size: for tests only."""
    return TransformerConfig(embed_dim=100, depth=2, num_heads=5, mlp_ratio=2.0, out_chans=4).replace(**overrides)


def tokenizer_base(**overrides) -> TokenizerConfig:
    """vqnsp_encoder_base_decoder_3x200x12 with the README's 8192 x 64 codebook."""
    return TokenizerConfig(**overrides)


def tokenizer_large(**overrides) -> TokenizerConfig:
    """vqnsp_encoder_large_decoder_3x200x24: a 24-layer encoder, otherwise as base."""
    return TokenizerConfig(encoder=TokenizerConfig().encoder.replace(depth=24)).replace(**overrides)


def tokenizer_tiny(**overrides) -> TokenizerConfig:
    """The TINY parity set's tokenizer (512 x 64 codebook): for tests only."""
    kw = dict(embed_dim=100, num_heads=5, mlp_ratio=2.0, qkv_bias=True, qk_norm=False, init_values=0.0)
    return TokenizerConfig(encoder=TransformerConfig(depth=2, out_chans=4, **kw),
                           decoder=TransformerConfig(depth=1, in_chans=64, **kw),
                           codebook_size=512).replace(**overrides)


SIZES = {"base": base, "large": large, "huge": huge, "tiny": tiny}

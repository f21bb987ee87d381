"""Fresh models are initialised as the original's training scripts initialise them.

modeling_finetune.py and the tokenizer use timm's trunc_normal_(std=.02), whose bounds are absolute (+-2: in effect
untruncated), and leave Conv2d at PyTorch's default init; modeling_pretrain.py truncates at +-1 sigma and
re-initialises the student's convs too. Base-size models are used where the statistics need many samples.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from flax import nnx

from labram_jax import LaBraM, LaBraMForMEM, VQNSP, configs
from labram_jax.convert.state_dict import state_dict

STD = 0.02
DEPTH = configs.base().depth
D = configs.base().embed_dim
# The std of a standard normal truncated at +-1 sigma.
TRUNC_1SIGMA = math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))
NORM_WEIGHT = re.compile(r"(^|\.)(norm\d?|q_norm|k_norm|fc_norm)\.weight$")


def rel_tolerance(n: int) -> float:
    """5%, or about five standard errors of a std estimated from n samples when that is wider."""
    return max(0.05, 6 / math.sqrt(n))


def robust_std(w: np.ndarray) -> float:
    """The std of a centred normal from its median |w|.

    timm's trunc_normal_ (and jax.random.truncated_normal) turn a uniform sample of exactly -1 into erfinv(-1) =
    -inf, clamped to the bound: with bound 2 = 100 sigma about one weight in 10^7 is +-2, enough to move a plain std.
    """
    return float(np.median(np.abs(w)) / 0.6744897501960817)


def assert_normal(w: np.ndarray, std: float, key: str) -> None:
    assert robust_std(w) == pytest.approx(std, rel=rel_tolerance(w.size)), key
    assert abs(float(w.mean())) < rel_tolerance(w.size) * std, key


def assert_truncated(w: np.ndarray, std: float, key: str) -> None:
    """Normal(0, std) truncated at +-std."""
    assert np.abs(w).max() <= std, key
    assert float(w.std()) == pytest.approx(std * TRUNC_1SIGMA, rel=rel_tolerance(w.size)), key
    assert abs(float(w.mean())) < rel_tolerance(w.size) * std, key


def assert_uniform(w: np.ndarray, bound: float, key: str) -> None:
    """U(-bound, bound): PyTorch's default Linear/Conv2d init with bound 1/sqrt(fan_in)."""
    assert np.abs(w).max() <= bound, key
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=rel_tolerance(w.size)), key
    assert np.abs(w).max() > 0.5 * bound, key


def assert_norms_and_biases(weights: dict[str, np.ndarray], random_biases: tuple[str, ...] = ()) -> None:
    """LayerNorm/GroupNorm at (1, 0), and every other bias zero but those starting with `random_biases`."""
    for key, value in weights.items():
        if NORM_WEIGHT.search(key):
            np.testing.assert_array_equal(value, 1.0, err_msg=key)
        elif key.endswith("bias") and not key.startswith(random_biases):
            np.testing.assert_array_equal(value, 0.0, err_msg=key)


@pytest.fixture(scope="module")
def finetune() -> dict[str, np.ndarray]:
    return state_dict(LaBraM(configs.base(num_classes=4), rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def pretrain() -> dict[str, np.ndarray]:
    return state_dict(LaBraMForMEM(configs.base(), rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning model (modeling_finetune.py)

def test_finetune_linear_kernels_untruncated(finetune):
    for i in range(DEPTH):
        for name in ("attn.qkv", "mlp.fc1"):
            key = f"blocks.{i}.{name}.weight"
            assert_normal(finetune[key], STD, key)
            assert np.abs(finetune[key]).max() > 2 * STD, f"{key} is truncated"


def test_finetune_residual_projections_rescaled(finetune):
    for i in range(DEPTH):
        for name in ("attn.proj", "mlp.fc2"):
            key = f"blocks.{i}.{name}.weight"
            assert_normal(finetune[key], STD / math.sqrt(2 * (i + 1)), key)


def test_finetune_embeddings_and_head(finetune):
    for key in ("cls_token", "pos_embed", "time_embed"):
        assert_normal(finetune[key], STD, key)
    assert finetune["head.weight"].shape == (4, D)
    assert_normal(finetune["head.weight"], STD * configs.base().init_scale, "head.weight")


def test_finetune_norms_biases_and_layer_scale(finetune):
    assert_norms_and_biases(finetune, random_biases=("patch_embed.conv",))
    for i in range(DEPTH):
        for gamma in ("gamma_1", "gamma_2"):
            np.testing.assert_array_equal(finetune[f"blocks.{i}.{gamma}"], np.float32(0.1))


def test_finetune_temporal_conv_keeps_pytorch_default(finetune):
    out_chans = configs.base().out_chans
    fan_in = {"conv1": 15, "conv2": 3 * out_chans, "conv3": 3 * out_chans}
    scaled = []
    for conv, n in fan_in.items():
        for part in ("weight", "bias"):
            key = f"patch_embed.{conv}.{part}"
            assert np.abs(finetune[key]).max() <= 1 / math.sqrt(n), key
            scaled.append(finetune[key].ravel() * math.sqrt(n))
    # 528 draws that should all be U(-1, 1) once divided by their layer's bound.
    assert_uniform(np.concatenate(scaled), 1.0, "patch_embed.conv*")


def test_qkv_bias_starts_at_zero():
    weights = state_dict(LaBraM(configs.base(num_classes=4, qkv_bias=True), rngs=nnx.Rngs(0)))
    for i in range(DEPTH):
        for key in (f"blocks.{i}.attn.q_bias", f"blocks.{i}.attn.v_bias"):
            np.testing.assert_array_equal(weights[key], 0.0, err_msg=key)


# ---------------------------------------------------------------------------------------------------------------
# Pretraining model (modeling_pretrain.py): the student truncated at +-1 sigma; the MEM-level extras PyTorch-default.

def test_pretrain_student_linear_kernels_truncated(pretrain):
    for i in range(DEPTH):
        for name in ("attn.qkv", "mlp.fc1"):
            key = f"student.blocks.{i}.{name}.weight"
            assert_truncated(pretrain[key], STD, key)
        for name in ("attn.proj", "mlp.fc2"):
            key = f"student.blocks.{i}.{name}.weight"
            assert_truncated(pretrain[key], STD / math.sqrt(2 * (i + 1)), key)
    assert_truncated(pretrain["student.lm_head.weight"], STD, "student.lm_head.weight")


def test_pretrain_student_embeddings_and_convs_truncated(pretrain):
    for key in ("student.cls_token", "student.mask_token", "student.pos_embed", "student.time_embed"):
        assert_truncated(pretrain[key], STD, key)
    kernels = np.concatenate([pretrain[f"student.patch_embed.conv{i}.weight"].ravel() for i in (1, 2, 3)])
    assert_truncated(kernels, STD, "student.patch_embed.conv*.weight")


def test_pretrain_norms_biases_and_layer_scale(pretrain):
    student = {k: v for k, v in pretrain.items() if k.startswith("student.")}
    assert_norms_and_biases(student)
    for i in range(DEPTH):
        for gamma in ("gamma_1", "gamma_2"):
            np.testing.assert_array_equal(pretrain[f"student.blocks.{i}.{gamma}"], np.float32(0.1))


def test_pretrain_heads_outside_the_student(pretrain):
    assert_truncated(pretrain["lm_head.weight"], STD, "lm_head.weight")
    bound = 1 / math.sqrt(D)
    for key in ("lm_head.bias", "projection_head.0.weight", "projection_head.0.bias"):
        assert_uniform(pretrain[key], bound, key)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer (modeling_vqnsp.py, norm_ema_quantizer.py)

def test_tokenizer_kmeans_codebook_starts_empty():
    weights = state_dict(VQNSP(configs.tokenizer_base(), rngs=nnx.Rngs(0)))
    for key in ("quantize.embedding.weight", "quantize.embedding.embed_avg", "quantize.embedding.initted",
                "quantize.embedding.cluster_size", "quantize.cluster_size"):
        np.testing.assert_array_equal(weights[key], 0.0, err_msg=key)


def test_tokenizer_random_codebook_and_task_layers():
    cfg = configs.tokenizer_base(kmeans_init=False)
    weights = state_dict(VQNSP(cfg, rngs=nnx.Rngs(0)))
    codebook = weights["quantize.embedding.weight"]
    assert codebook.shape == (cfg.codebook_size, cfg.code_dim)
    np.testing.assert_allclose(np.linalg.norm(codebook, axis=1), 1.0, rtol=1e-6)
    # l2norm(randn): coordinates of uniform unit vectors, std 1/sqrt(code_dim).
    assert codebook.std() == pytest.approx(1 / math.sqrt(cfg.code_dim), rel=0.05)
    np.testing.assert_array_equal(weights["quantize.embedding.embed_avg"], codebook)
    np.testing.assert_array_equal(weights["quantize.embedding.initted"], [1.0])

    assert not [k for k in weights if re.search(r"gamma_|q_norm|k_norm", k)]
    for layer in ("encode_task_layer", "decode_task_layer", "decode_task_layer_angle"):
        for index in (0, 2):
            key = f"{layer}.{index}.weight"
            assert_normal(weights[key], STD, key)
            np.testing.assert_array_equal(weights[f"{layer}.{index}.bias"], 0.0)
    assert_norms_and_biases({k: v for k, v in weights.items() if not k.startswith("quantize.")},
                            random_biases=("encoder.patch_embed.conv", "decoder.patch_embed.proj"))


# ---------------------------------------------------------------------------------------------------------------
# Seeds

# The sizes built above, so that their initialisers are already compiled.
BUILDERS = {
    "classify": lambda seed: LaBraM(configs.base(num_classes=4), rngs=nnx.Rngs(seed)),
    "pretrain": lambda seed: LaBraMForMEM(configs.base(), rngs=nnx.Rngs(seed)),
    "tokenizer": lambda seed: VQNSP(configs.tokenizer_base(kmeans_init=False), rngs=nnx.Rngs(seed)),
}


@pytest.mark.parametrize("task", BUILDERS)
def test_seeds(task):
    first, again, other = (state_dict(BUILDERS[task](seed)) for seed in (0, 0, 1))
    for key, value in first.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
        if value.ndim >= 2:  # every kernel, embedding and codebook is random
            assert not np.array_equal(other[key], value), key


@pytest.mark.parametrize("build", [
    lambda: LaBraMForMEM(configs.tiny(vocab_size=64, depth=3), rngs=nnx.Rngs(0)),
    lambda: VQNSP(configs.tokenizer_tiny(codebook_size=64), rngs=nnx.Rngs(0))], ids=["pretrain", "tokenizer"])
def test_shapes_only_model_is_the_model(build):
    """Under nnx.eval_shape (AOT checks, parameter counts) each block is built in a trace of its own: the same
    variables, shapes, dtypes and logical sharding names as the model built for real."""
    def layout(model):
        return {path: (type(v).__name__, v.get_value().shape, v.get_value().dtype,
                       v.get_metadata("out_sharding", None)) for path, v in nnx.to_flat_state(nnx.state(model))}

    assert layout(nnx.eval_shape(build)) == layout(build())

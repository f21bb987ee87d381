"""labram_jax.convert: checkpoints of the original PyTorch LaBraM in and out, checked with real torch.

The reference .pth files were written by the original code (tests/fixtures/reference_tiny/README.md); the base-size
set is read from ../shared/reference/base when that folder is beside the checkout.
"""
from __future__ import annotations

import collections
import functools
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from labram_jax import LaBraM, LaBraMForMEM, VQNSP, configs, from_pytorch, to_pytorch
from labram_jax.convert import read_pth, state_dict, write_pth

TINY = Path(__file__).parent / "fixtures" / "reference_tiny"
BASE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "base"
FILES = {"classify": "finetune", "pretrain": "pretrain", "tokenizer": "tokenizer"}
SIZES = ["tiny", "base"]

def reference_dir(size: str) -> Path:
    if size == "base" and not BASE.is_dir():
        pytest.skip(f"no base-size reference set at {BASE}")
    return TINY if size == "tiny" else BASE


@functools.cache
def loaded(size: str, task: str):
    """(reference .pth path, the model loaded from it); cached because base-size loads take seconds."""
    path = reference_dir(size) / f"{FILES[task]}.pth"
    return path, from_pytorch(path, task)


def round_trip(size: str, task: str, tmp_path: Path) -> tuple[dict, dict]:
    """(what torch reads from our re-written file, what torch reads from the reference file)."""
    path, model = loaded(size, task)
    to_pytorch(model, tmp_path / "written.pth")
    return torch.load(tmp_path / "written.pth", weights_only=True), torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def fixture_inputs() -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    data = np.load(TINY / "inputs.npz")
    return jnp.asarray(data["x"]), jnp.asarray(data["input_chans"]), jnp.asarray(data["mask"])


def load_error(tmp_path: Path, obj, task: str = "classify") -> str:
    path = tmp_path / "broken.pth"
    write_pth(path, obj)
    with pytest.raises(ValueError) as info:
        from_pytorch(path, task)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# File-level round trip: reference .pth -> our model -> .pth gives back the same tensors.

@pytest.mark.parametrize("task", FILES)
@pytest.mark.parametrize("size", SIZES)
def test_file_round_trip_is_exact(size, task, tmp_path):
    ours, theirs = round_trip(size, task, tmp_path)
    # What torch's load_state_dict(strict=True) checks: the same key set and shapes, in a {'model': ...} wrapper.
    assert list(ours) == ["model"]
    assert type(ours["model"]) is collections.OrderedDict
    ours, theirs = ours["model"], theirs["model"]
    assert set(ours) == set(theirs)
    for key, ref in theirs.items():
        assert ours[key].dtype == ref.dtype == torch.float32, key
        assert ours[key].shape == ref.shape, key
        assert torch.equal(ours[key], ref), key


@pytest.mark.parametrize("task", ["classify", "pretrain", "tokenizer"])
@pytest.mark.parametrize("size", SIZES)
def test_file_round_trip_keeps_key_order(size, task, tmp_path):
    ours, theirs = round_trip(size, task, tmp_path)
    assert list(ours["model"]) == list(theirs["model"])


# ---------------------------------------------------------------------------------------------------------------
# Model-level round trip: a fresh model -> .pth -> model computes the same outputs.

# Compiled, so that both models run the same XLA program (eager op-by-op results may differ in the last bit) and
# the tests stay fast.
classify = nnx.jit(lambda model, x, chans: model(x, chans))
pretrain = nnx.jit(lambda model, x, chans, mask: model(x, chans, mask))
tokenize = nnx.jit(lambda model, x, chans: (model.tokenize(x, chans), model(x, chans)["loss"]))


def reload(model, tmp_path: Path, task: str):
    path = tmp_path / f"{task}.pth"
    to_pytorch(model, path)
    back = from_pytorch(path, task)
    assert type(back) is type(model)
    for key, value in state_dict(model).items():
        np.testing.assert_array_equal(state_dict(back)[key], value, err_msg=key)
    return back


def test_classifier_round_trip(tmp_path, fixture_inputs):
    x, chans, _ = fixture_inputs
    model = LaBraM(configs.tiny(num_classes=3), rngs=nnx.Rngs(1))
    back = reload(model, tmp_path, "classify")
    assert back.cfg.num_classes == 3
    logits = classify(model, x, chans)
    assert logits.shape == (2, 3)
    np.testing.assert_array_equal(classify(back, x, chans), logits)


def test_mem_round_trip(tmp_path, fixture_inputs):
    x, chans, mask = fixture_inputs
    model = LaBraMForMEM(configs.tiny(vocab_size=64), rngs=nnx.Rngs(1))
    back = reload(model, tmp_path, "pretrain")
    assert back.cfg.vocab_size == 64
    for ours, theirs in zip(pretrain(back, x, chans, mask), pretrain(model, x, chans, mask)):
        assert theirs.shape[-1] == 64
        np.testing.assert_array_equal(ours, theirs)


def test_tokenizer_round_trip(tmp_path, fixture_inputs):
    x, chans, _ = fixture_inputs
    model = VQNSP(configs.tokenizer_tiny(kmeans_init=False), rngs=nnx.Rngs(1))
    back = reload(model, tmp_path, "tokenizer")
    tokens, loss = tokenize(model, x, chans)
    assert tokens.shape == (2, x.shape[1] * x.shape[2])
    back_tokens, back_loss = tokenize(back, x, chans)
    np.testing.assert_array_equal(back_tokens, tokens)
    np.testing.assert_array_equal(back_loss, loss)


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning from a pretraining checkpoint, as run_class_finetuning.py does.

def test_finetune_from_pretraining_checkpoint():
    student = {k.removeprefix("student."): v for k, v in read_pth(TINY / "pretrain.pth")["model"].items()
               if k.startswith("student.")}
    model = from_pytorch(TINY / "pretrain.pth", "classify", num_classes=4)
    assert isinstance(model, LaBraM)
    weights = state_dict(model)
    fresh = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert set(weights) - set(student) == fresh
    # The original's loader ignores what the fine-tuning model lacks.
    assert set(student) - set(weights) == {"mask_token", "norm.weight", "norm.bias", "lm_head.weight",
                                           "lm_head.bias"}
    for key in set(weights) - fresh:
        np.testing.assert_array_equal(weights[key], student[key], err_msg=key)
    assert weights["head.weight"].shape == (4, 100) and weights["head.bias"].shape == (4,)


def test_pretraining_checkpoint_without_num_classes_gives_features(fixture_inputs):
    x, chans, _ = fixture_inputs
    model = from_pytorch(TINY / "pretrain.pth", "classify")
    assert model.head is None and model.cfg.num_classes == 0
    assert not any(k.startswith("head.") for k in state_dict(model))
    assert classify(model, x, chans).shape == (2, 100)


def test_bare_state_dict_loads(tmp_path):
    weights = read_pth(TINY / "finetune.pth")["model"]
    write_pth(tmp_path / "bare.pth", weights)
    model = from_pytorch(tmp_path / "bare.pth", "classify")
    for key, value in state_dict(model).items():
        np.testing.assert_array_equal(value, weights[key], err_msg=key)


# ---------------------------------------------------------------------------------------------------------------
# Architecture inference: the config is read from the weights' shapes alone.

@pytest.mark.parametrize("task", FILES)
@pytest.mark.parametrize("size", SIZES)
def test_inferred_config_matches_reference(size, task):
    meta = json.loads((reference_dir(size) / "meta.json").read_text())["config"]
    cfg = loaded(size, task)[1].cfg
    if task == "tokenizer":
        tok = meta["tokenizer"]
        assert (cfg.codebook_size, cfg.code_dim) == (tok["codebook_size"], tok["code_dim"])
        assert (cfg.encoder.depth, cfg.decoder.depth) == (tok["encoder_depth"], tok["decoder_depth"])
        assert cfg.encoder.out_chans == tok["out_chans"] and cfg.encoder.in_chans == 0
        assert cfg.decoder.in_chans == tok["code_dim"]
        for part in (cfg.encoder, cfg.decoder):
            assert (part.embed_dim, part.num_heads) == (tok["dim"], tok["heads"])
            assert (part.qkv_bias, part.qk_norm, part.init_values) == (tok["qkv_bias"], tok["qk_norm"],
                                                                       tok["init_values"])
            assert part.mlp_ratio == meta["mlp_ratio"] and part.num_classes == 0
        return
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (meta["dim"], meta["depth"], meta["heads"])
    assert (cfg.mlp_ratio, cfg.out_chans, cfg.in_chans) == (meta["mlp_ratio"], meta["out_chans"], 0)
    assert (cfg.qkv_bias, cfg.qk_norm) == (meta["qkv_bias"], meta["qk_norm"])
    assert (cfg.init_values, cfg.layer_norm_eps) == (meta["init_values"], meta["layer_norm_eps"])
    if task == "classify":
        assert cfg.num_classes == meta["num_classes"]
    else:
        assert cfg.vocab_size == meta["vocab"]


# ---------------------------------------------------------------------------------------------------------------
# Broken checkpoints: one ValueError that names every fault, never a half-loaded model.

@pytest.fixture
def finetune_weights() -> dict:
    return read_pth(TINY / "finetune.pth")["model"]


def test_missing_key_is_named(tmp_path, finetune_weights):
    del finetune_weights["blocks.1.mlp.fc2.bias"]
    message = load_error(tmp_path, {"model": finetune_weights})
    assert "missing" in message and "blocks.1.mlp.fc2.bias" in message


def test_wrong_shape_is_named_with_both_shapes(tmp_path, finetune_weights):
    finetune_weights["blocks.0.attn.proj.weight"] = finetune_weights["blocks.0.attn.proj.weight"][:, :50].copy()
    message = load_error(tmp_path, {"model": finetune_weights})
    assert "blocks.0.attn.proj.weight" in message
    assert "(100, 50)" in message and "(100, 100)" in message


def test_unexpected_key_is_named(tmp_path, finetune_weights):
    finetune_weights["blocks.0.foo"] = np.zeros(3, np.float32)
    message = load_error(tmp_path, {"model": finetune_weights})
    assert "unexpected" in message and "blocks.0.foo" in message


def test_all_faults_in_one_message(tmp_path, finetune_weights):
    del finetune_weights["blocks.1.mlp.fc2.bias"]
    finetune_weights["blocks.0.foo"] = np.zeros(3, np.float32)
    finetune_weights["blocks.0.mlp.fc1.weight"] = finetune_weights["blocks.0.mlp.fc1.weight"].T.copy()
    message = load_error(tmp_path, {"model": finetune_weights})
    for part in ("missing", "blocks.1.mlp.fc2.bias", "unexpected", "blocks.0.foo", "blocks.0.mlp.fc1.weight",
                 "(100, 200)", "(200, 100)"):
        assert part in message


@pytest.mark.parametrize("name, task", [("pretrain", "tokenizer"), ("finetune", "tokenizer"),
                                        ("tokenizer", "classify"), ("tokenizer", "pretrain"),
                                        ("finetune", "pretrain")])
def test_checkpoint_of_another_kind(tmp_path, name, task):
    message = load_error(tmp_path, read_pth(TINY / f"{name}.pth"), task)
    assert "broken.pth" in message and task in message


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth"):
        from_pytorch(path, "classify")


def test_checkpoint_without_weights(tmp_path):
    assert "broken.pth" in load_error(tmp_path, {"epoch": 3, "args": [1, 2]})


def test_bad_task_name():
    with pytest.raises(ValueError, match="finetune"):
        from_pytorch(TINY / "finetune.pth", "finetune")

"""labram-jax <-> braindecode 1.8.1's `Labram`, both ways, checked with braindecode itself.

braindecode loads `from_pretrained` weights with strict=False by default, which once let a model load 0 of its
tensors without an error; every load here is strict and asserts that no key is missing or unexpected.
"""
from __future__ import annotations

import json
import sys
import types
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from data_prep.preprocess import preprocess, read_recording, to_model_input, windows
from labram_jax import configs, from_pytorch
from labram_jax.cli import main
from labram_jax.convert import read_pth, state_dict
from labram_jax.convert.braindecode import from_braindecode, to_braindecode
from labram_jax.models.labram import LaBraM

FINETUNE = Path(__file__).parent / "fixtures" / "reference_tiny" / "finetune.pth"
RECORDING = Path(__file__).resolve().parents[1] / "sample_data" / "eegmat" / "Subject00_1.edf"


class _Inert(types.ModuleType):
    """A module whose every attribute is an empty class, so `class X(torchaudio.transforms.Spectrogram)` works."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (), {"__init__": lambda self, *args, **kwargs: None})
        setattr(self, name, placeholder)
        return placeholder


@pytest.fixture(scope="module")
def Labram():
    """braindecode.models.Labram. braindecode imports torchaudio eagerly (one module subclasses a torchaudio
    transform at import time) and no torchaudio release matches torch 2.13; Labram never calls it, so an inert
    stand-in is registered for the import and removed afterwards."""
    names = ("torchaudio", "torchaudio.functional", "torchaudio.transforms")
    added = [name for name in names if name not in sys.modules]
    for name in added:
        sys.modules[name] = _Inert(name)
    for name in added[1:] if added[:1] == ["torchaudio"] else ():
        setattr(sys.modules["torchaudio"], name.split(".")[1], sys.modules[name])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MNE's montage deprecations, raised by other models' module code
            from braindecode.models import Labram
    finally:
        for name in added:
            del sys.modules[name]
    return Labram


@pytest.fixture(scope="module")
def model() -> LaBraM:
    """The reference fine-tuning weights written by the original code (2 blocks, 100 wide, 6 classes)."""
    return from_pytorch(FINETUNE)


@pytest.fixture(scope="module")
def eeg() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Two 15 s windows of a real PhysioNet recording, preprocessed as the original: (x [2, N, 15, 200] in model
    units, input_chans, channel names)."""
    recording = preprocess(read_recording(RECORDING).crop(0, 40), source=str(RECORDING))
    x = to_model_input(windows(recording.signal, 15))[:2]
    return x, recording.channels.input_chans, list(recording.channels.names)


def assert_close(theirs: torch.Tensor, ours: jnp.ndarray, rel: float = 1e-5) -> None:
    theirs, ours = theirs.detach().numpy(), np.asarray(ours)
    assert theirs.shape == ours.shape
    error = np.abs(theirs - ours).max() / np.abs(ours).max()
    assert error <= rel, f"relative error {error:.2e}"


def assert_same_weights(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def strict_load(Labram, directory: Path):
    """Labram.from_pretrained with strict=True, plus the key lists a strict=False load would have hidden."""
    bd = Labram.from_pretrained(str(directory), strict=True).eval()
    config = json.loads((directory / "config.json").read_text())
    config.pop("braindecode_version", None)
    fresh = Labram.from_config(config)
    result = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in
                                    load_file(directory / "model.safetensors").items()}, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    return bd


def run_braindecode(bd, x: np.ndarray, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pooled features) of braindecode's Labram on windows [B, N, A, 200] as [B, N, A*200]."""
    flat = torch.from_numpy(x.reshape(x.shape[0], x.shape[1], -1))
    with torch.no_grad():
        logits = bd(flat, ch_names=names)
        features = bd.forward_features(flat, input_chans=torch.tensor([0] + _braindecode_rows(names)))
    return logits, features


def _braindecode_rows(names: list[str]) -> list[int]:
    from braindecode.models.labram import LABRAM_CHANNEL_ORDER
    index = {name.upper(): i + 1 for i, name in enumerate(LABRAM_CHANNEL_ORDER)}
    return [index[name.upper()] for name in names]


@pytest.mark.slow
def test_braindecode_loads_our_export_strictly_and_matches(Labram, model, eeg, tmp_path):
    out = to_braindecode(model, tmp_path / "bd")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["use_mean_pooling"] is True and config["n_times"] == 3000 and config["n_outputs"] == 6
    bd = strict_load(Labram, out)
    assert bd.temporal_embedding.shape == (1, 16, 100)  # every time_embed row survives
    x, chans, names = eeg
    assert _braindecode_rows(names) == list(chans[1:])  # braindecode's channel table is the original's
    logits, features = run_braindecode(bd, x, names)
    assert_close(logits, model(jnp.asarray(x), jnp.asarray(chans)))
    assert_close(features, model.features(jnp.asarray(x), jnp.asarray(chans)))


@pytest.mark.slow
def test_key_map_covers_every_key_at_base_size(Labram, tmp_path):
    base = LaBraM(configs.TransformerConfig(num_classes=6), rngs=nnx.Rngs(0))
    ours = {k: v.shape for k, v in load_file(to_braindecode(base, tmp_path / "bd") / "model.safetensors").items()}
    theirs = {k: tuple(v.shape) for k, v in Labram(n_times=3000, n_outputs=6, n_chans=128,
                                                    use_mean_pooling=True).state_dict().items()}
    assert ours == theirs


@pytest.mark.slow
def test_n_times_fits_a_window_and_import_pads(Labram, model, eeg, tmp_path):
    with pytest.warns(UserWarning, match=r"rows 6-15 .*dropped"):
        out = to_braindecode(model, tmp_path / "bd", n_times=1000)
    bd = strict_load(Labram, out)
    assert bd.temporal_embedding.shape == (1, 6, 100)
    x, chans, names = eeg
    x = np.ascontiguousarray(x[:, :, :5])  # 5 s windows
    logits, _ = run_braindecode(bd, x, names)
    assert_close(logits, model(jnp.asarray(x), jnp.asarray(chans)))

    with pytest.warns(UserWarning, match=r"rows 6-15 .*zero"):
        back = state_dict(from_braindecode(out))
    original = state_dict(model)
    np.testing.assert_array_equal(back["time_embed"][:, :6], original["time_embed"][:, :6])
    assert not back["time_embed"][:, 6:].any()
    assert_same_weights({k: v for k, v in back.items() if k != "time_embed"},
                        {k: v for k, v in original.items() if k != "time_embed"})


@pytest.mark.slow
def test_braindecode_saved_model_comes_here(Labram, eeg, tmp_path):
    torch.manual_seed(0)
    bd = Labram(n_times=3000, n_outputs=3, n_chans=128, sfreq=200.0, use_mean_pooling=True, num_layers=2,
                num_heads=5, conv_out_channels=4, mlp_ratio=2.0, qkv_bias=True).eval()
    with torch.no_grad():  # layer scale and biases away from their init values, so that a lost tensor shows
        for p in bd.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bd.save_pretrained(str(tmp_path / "bd"))
    ours = from_braindecode(tmp_path / "bd")
    x, chans, names = eeg
    logits, _ = run_braindecode(bd, x, names)
    assert_close(logits, ours(jnp.asarray(x), jnp.asarray(chans)))


def test_round_trip_is_bit_exact(model, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default n_times loses no row, so nothing to warn about
        back = from_braindecode(to_braindecode(model, tmp_path / "bd"))
    assert_same_weights(state_dict(back), state_dict(model))


def test_cli_both_ways(tmp_path, capsys):
    assert main(["convert", str(FINETUNE), str(tmp_path / "bd"), "--to", "braindecode"]) == 0
    assert main(["convert", str(tmp_path / "bd"), str(tmp_path / "back.pth")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("wrote classify model (") and "braindecode" in out[0] and "n_times=3000" in out[0]
    assert_same_weights(read_pth(tmp_path / "back.pth")["model"], read_pth(FINETUNE)["model"])

    assert main(["convert", str(FINETUNE), str(tmp_path / "bd5"), "--to", "braindecode", "--n-times", "1000"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("labram convert: warning: ") and "rows 6-15" in err
    assert main(["convert", str(tmp_path / "bd5"), str(tmp_path / "export")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rows 6-15" in err and "zero" in err


@pytest.mark.parametrize("argv,message", [
    (["--to", "braindecode", "--n-times", "1100"], "n_times 1100 is not a multiple of 200"),
    (["--to", "braindecode", "--n-times", "3200"], "n_times 3200 needs 17 time_embed rows"),
    (["--n-times", "1000"], "--n-times applies only to --to braindecode"),
])
def test_cli_n_times_errors(tmp_path, capsys, argv, message):
    assert main(["convert", str(FINETUNE), str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("labram convert: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_non_classifier_has_no_braindecode_counterpart(tmp_path, capsys):
    tokenizer = FINETUNE.with_name("tokenizer.pth")
    assert main(["convert", str(tokenizer), str(tmp_path / "bd"), "--kind", "tokenizer", "--to", "braindecode"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer" in err and "braindecode" in err


@pytest.fixture
def exported(model, tmp_path) -> Path:
    return to_braindecode(model, tmp_path / "bd")


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"use_mean_pooling": False}, "use_mean_pooling"),
    ({"learned_patcher": True}, "learned_patcher"),
    ({"activation": "torch.nn.modules.activation.ReLU"}, "activation"),
    ({"num_layers": 12}, "num_layers 12"),
    ({"n_outputs": 4}, "n_outputs 4"),
    ({"n_times": 2000}, "n_times 2000"),
])
def test_import_refuses_a_config_that_is_not_the_weights(exported, changes, message):
    _edit_config(exported, **changes)
    with pytest.raises(ValueError) as info:
        from_braindecode(exported)
    text = str(info.value)
    assert "\n" not in text and "config.json" in text and message in text


def test_import_names_missing_and_unexpected_keys(exported):
    weights = load_file(exported / "model.safetensors")
    weights["patch_embed.segment_patch.patcher.weight"] = weights.pop("blocks.1.mlp.2.bias")
    save_file(weights, exported / "model.safetensors")
    with pytest.raises(ValueError) as info:
        from_braindecode(exported)
    text = str(info.value)
    assert "\n" not in text and "model.safetensors" in text
    assert "missing: blocks.1.mlp.2.bias" in text and "unexpected: patch_embed.segment_patch.patcher.weight" in text


def test_not_a_braindecode_directory(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        from_braindecode(tmp_path)


def test_cli_directory_of_neither_kind(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a labram-jax export" in err and "config.json" in err

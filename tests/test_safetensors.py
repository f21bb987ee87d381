"""`.safetensors` in the original's layout: the same keys and tensors as the `model` dict of a .pth, both ways."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from labram_jax import from_pytorch, to_pytorch
from labram_jax.cli import main
from labram_jax.convert import read_pth, read_safetensors, state_dict

REFERENCE = Path(__file__).parent / "fixtures" / "reference_tiny"
TASKS = [("finetune", "classify"), ("pretrain", "pretrain"), ("tokenizer", "tokenizer")]


def assert_same(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


@pytest.mark.parametrize("name,task", TASKS)
def test_pth_to_safetensors_and_back(tmp_path, capsys, name, task):
    original = REFERENCE / f"{name}.pth"
    written = tmp_path / f"{name}.safetensors"
    assert main(["convert", str(original), str(written), "--kind", task]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {task} model (")
    theirs = read_pth(original)["model"]
    assert_same(read_safetensors(written), theirs)
    # torch's own reader sees what torch.load sees in the .pth
    by_torch = safetensors.torch.load_file(written)
    for key, tensor in torch.load(original, weights_only=True)["model"].items():
        assert torch.equal(by_torch[key], tensor), key

    assert main(["convert", str(written), str(tmp_path / "export"), "--kind", task]) == 0
    assert main(["convert", str(tmp_path / "export"), str(tmp_path / "back.pth")]) == 0
    assert_same(read_pth(tmp_path / "back.pth")["model"], theirs)


def test_export_to_safetensors_by_suffix_or_flag(tmp_path):
    original = REFERENCE / "finetune.pth"
    assert main(["convert", str(original), str(tmp_path / "export")]) == 0
    assert main(["convert", str(tmp_path / "export"), str(tmp_path / "a.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "export"), str(tmp_path / "b.weights"), "--to", "safetensors"]) == 0
    for out in ("a.safetensors", "b.weights"):
        assert_same(read_safetensors(tmp_path / out), read_pth(original)["model"])


def test_api_reads_and_writes_safetensors(tmp_path):
    model = from_pytorch(REFERENCE / "finetune.pth")
    to_pytorch(model, tmp_path / "m.safetensors")
    assert_same(state_dict(from_pytorch(tmp_path / "m.safetensors")), state_dict(model))


def test_not_a_safetensors_file(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"labram convert: {bad}: not a safetensors file") and err.count("\n") == 1

"""The `labram` command, called in-process."""
from pathlib import Path

import numpy as np
import pytest

from labram_jax.cli import main
from labram_jax.convert import read_pth

REFERENCE = Path(__file__).parent / "fixtures" / "reference_tiny"


@pytest.mark.parametrize("name,task", [("finetune", "classify"), ("pretrain", "pretrain"),
                                       ("tokenizer", "tokenizer")])
def test_convert_round_trip(tmp_path, capsys, name, task):
    original = REFERENCE / f"{name}.pth"
    assert main(["convert", str(original), str(tmp_path / "export"), "--task", task]) == 0
    assert main(["convert", str(tmp_path / "export"), str(tmp_path / "back.pth")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"wrote {task} model (") for line in lines)
    assert lines[0].endswith(str(tmp_path / "export")) and lines[1].endswith(str(tmp_path / "back.pth"))
    ours, theirs = read_pth(tmp_path / "back.pth")["model"], read_pth(original)["model"]
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def test_convert_errors(tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    assert main(["convert", str(missing), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"labram convert: {missing}: no such file or directory\n"
    assert not (tmp_path / "out").exists()
    # A tokenizer checkpoint is not a classifier: the converter's message comes through on one line.
    assert main(["convert", str(REFERENCE / "tokenizer.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("labram convert: ") and err.count("\n") == 1 and "classify" in err


@pytest.mark.slow
def test_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FRESHLY INITIALISED" in out and "identical" in out
    result = np.load(tmp_path / "embeddings.npz")
    windows = 4 * (45 + 15)
    assert result["features"].shape == (windows, 200) and result["logits"].shape == (windows, 1)
    assert result["tokens"].shape == (windows, 80) and result["tokens"].max() < 8192
    assert np.isfinite(result["features"]).all() and np.isfinite(result["logits"]).all()
    np.testing.assert_array_equal(np.bincount(result["labels"]), [180, 60])
    np.testing.assert_array_equal(np.unique(result["subjects"]), [0, 1, 2, 3])
    assert (tmp_path / "labram_base.pth").is_file() and (tmp_path / "labram_base_export" / "labram.json").is_file()

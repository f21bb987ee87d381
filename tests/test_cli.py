"""The `labram` command, called in-process."""
from pathlib import Path

import numpy as np
import pytest

from labram_jax.cli import main
from labram_jax.convert import read_pth

REFERENCE = Path(__file__).parent / "fixtures" / "reference_tiny"
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "eegmat"


@pytest.mark.parametrize("name,task", [("finetune", "classify"), ("pretrain", "pretrain"),
                                       ("tokenizer", "tokenizer")])
def test_convert_round_trip(tmp_path, capsys, name, task):
    original = REFERENCE / f"{name}.pth"
    assert main(["convert", str(original), str(tmp_path / "export"), "--kind", task]) == 0
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


def test_embed(tmp_path, capsys):
    recordings = [str(SAMPLE / "Subject00_2.edf"), str(SAMPLE / "Subject01_2.edf")]
    out = tmp_path / "emb.npz"
    assert main(["embed", str(REFERENCE / "pretrain.pth"), *recordings, "--out", str(out), "--patches",
                 "--window", "4"]) == 0
    assert "wrote 30 window embeddings of size 100" in capsys.readouterr().out
    result = np.load(out)
    # 62 s recordings in 4 s windows: 15 each; 20 channels x 4 patches per window.
    assert result["embeddings"].shape == (30, 100) and np.isfinite(result["embeddings"]).all()
    np.testing.assert_array_equal(result["recording"], np.repeat([0, 1], 15))
    np.testing.assert_array_equal(result["start"][:3], [0, 4, 8])
    assert result["patches_0"].shape == (15, 80, 100)
    assert list(result["recordings"]) == recordings


def test_embed_needs_an_encoder(tmp_path, capsys):
    assert main(["embed", str(REFERENCE / "tokenizer.pth"), str(SAMPLE / "Subject00_2.edf"),
                 "--out", str(tmp_path / "e.npz")]) == 2
    assert capsys.readouterr().err.startswith("labram embed: ")


@pytest.mark.slow
def test_demo(tmp_path, capsys):
    """The README's main job, end to end on the bundled sample (fewer steps than the default)."""
    assert main(["demo", "--out", str(tmp_path), "--steps", "60"]) == 0
    out = capsys.readouterr().out
    for stage in ("1. prep", "2. tokenizer", "3. pretrain", "4. finetune", "5. evaluate", "6. convert"):
        assert stage in out
    assert (tmp_path / "labram_eegmat.pth").is_file()
    assert read_pth(tmp_path / "labram_eegmat.pth")["model"]["head.weight"].shape == (1, 100)
    for stage in ("tokenizer", "pretrain", "finetune"):
        assert (tmp_path / stage / "export" / "labram.json").is_file()
        assert (tmp_path / stage / "metrics.jsonl").is_file()


def test_embed_runs_an_export_of_a_gpu_run_on_the_cpu(tmp_path, capsys):
    """An export made under bf16, cuDNN attention and remat holds the architecture only: `labram embed` runs it in
    float32 with the explicit attention, as it runs the same weights from a .pth."""
    from labram_jax import configs
    from labram_jax.checkpoint import save_model
    from labram_jax.convert import from_pytorch, to_pytorch
    from labram_jax.convert.state_dict import build, load_state_dict, state_dict

    weights = from_pytorch(REFERENCE / "finetune.pth")
    gpu = build(weights.cfg.replace(dtype="bfloat16", attention="cudnn", remat="block"), "classify")
    load_state_dict(gpu, state_dict(weights))
    save_model(gpu, tmp_path / "export")
    to_pytorch(weights, tmp_path / "same.pth")
    recording = str(SAMPLE / "Subject00_2.edf")
    for checkpoint, out in ((tmp_path / "export", "export.npz"), (tmp_path / "same.pth", "pth.npz")):
        assert main(["embed", str(checkpoint), recording, "--out", str(tmp_path / out), "--window", "4"]) == 0, \
            capsys.readouterr().err
    ours, reference = np.load(tmp_path / "export.npz"), np.load(tmp_path / "pth.npz")
    assert ours["embeddings"].dtype == np.float32
    np.testing.assert_array_equal(ours["embeddings"], reference["embeddings"])

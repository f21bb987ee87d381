"""The `labram` command, called in-process."""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import labram_jax
from labram_jax import recipes
from labram_jax.cli import _parser, main
from labram_jax.convert import read_pth
from labram_jax.train import launch
from conftest import FAST_COMPILE

REFERENCE = Path(__file__).parent / "fixtures" / "reference_tiny"
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "eegmat"


def test_the_command_line_and_the_corpus_engine_start_without_jax():
    """`labram train` and `labram demo` parse their arguments and start again with huge pages before JAX is
    imported, and a corpus job's worker processes never import it (1-2 s each)."""
    script = ("import sys\nfrom labram_jax import cli\ncli._parser().parse_args(['train', 'finetune_eegmat', "
              "'--workdir', 'w'])\nimport data_prep.build, data_prep.engine, data_prep.pool, data_prep.prep\n"
              "print(sorted(m for m in ('jax', 'flax', 'orbax', 'torch') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


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


# -- labram train: the recipes by name or file, with the launchers' flags ------------------------------------------
RECIPES = ("finetune_eegmat", "finetune_tuab", "finetune_tuev", "pretrain_base", "pretrain_huge", "pretrain_large",
           "train_tokenizer")


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"labram": parser, **sub.choices}


def test_train_lists_the_recipes(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--list"])
    assert stop.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert tuple(line.split()[0] for line in lines) == RECIPES
    # One line each, from the recipe's docstring.
    assert all(len(line.split()) > 3 for line in lines)
    assert any("LaBraM-Huge" in line for line in lines if line.startswith("pretrain_huge"))


def test_train_takes_the_launchers_flags():
    """`labram train RECIPE` parses every flag of experiments/*.py to the same values."""
    argv = ["--workdir", "W", "--data", "a", "--data", "b", "--set", "train.steps=3", "model.depth=1",
            "--seeds", "0,1", "--aot", "--simulate-devices", "4", "--coordinator", "h:1234", "--num-processes", "2",
            "--process-id", "1", "--distributed", "auto"]
    launcher = vars(launch.parser("").parse_args(argv))
    ours = vars(_parser().parse_args(["train", "finetune_eegmat", *argv]))
    assert {k: ours[k] for k in launcher} == launcher


def test_the_launchers_run_the_package_recipes(monkeypatch):
    """experiments/NAME.py, what pods launch, is the packaged recipe NAME (one definition of each)."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    for name in RECIPES:
        assert importlib.import_module(name).config is recipes.load(name), name


@pytest.fixture(scope="module")
def eegmat_two_subjects(tmp_path_factory) -> Path:
    """Two subjects of the bundled sample as a builder lays them out, in the finetune_eegmat recipe's 4-s windows."""
    from data_prep.builders.eegmat import build_eegmat

    out = tmp_path_factory.mktemp("eegmat")
    build_eegmat(SAMPLE, out, seconds=4, splits={"train": [0], "val": [1]})
    return out


SMALL = ["model.depth=1", "model.embed_dim=100", "model.num_heads=5", "model.out_chans=4", "train.batch_size=8",
         "train.log_every=1", "train.save_every=100"]


def test_train_runs_a_recipe_by_name(eegmat_two_subjects, tmp_path, capsys):
    """train.steps given on the command line wins over the recipe's epochs, and the warmup keeps its share."""
    workdir = tmp_path / "run"
    assert main(["train", "finetune_eegmat", "--workdir", str(workdir), "--data", str(eegmat_two_subjects),
                 "--set", "train.steps=20", *SMALL]) == 0
    assert '"val/balanced_accuracy"' in capsys.readouterr().out
    config = json.loads((workdir / "config.json").read_text())
    assert config["stage"] == "finetune" and config["model"]["depth"] == 1
    # The recipe's own fields: lr, layer decay, drop path; its 5 of 50 warmup epochs as 2 of 20 steps.
    assert config["train"]["lr"] == 5e-4 and config["train"]["layer_decay"] == 0.65
    assert config["model"]["drop_path_rate"] == 0.1
    assert (config["train"]["steps"], config["train"]["warmup_steps"], config["train"]["epochs"]) == (20, 2, 0)
    steps = [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps[-1] == 20 and (workdir / "export" / "labram.json").is_file()


def test_train_runs_a_recipe_file(tmp_path, capsys):
    """A recipe file outside the package, importing a recipe beside it as experiments/ do."""
    (tmp_path / "house.py").write_text(
        "from labram_jax.recipes import finetune_tuab\n\n\n"
        "def config():\n    return finetune_tuab.config(channels=4, seconds=2, batch=8)\n")
    (tmp_path / "mine.py").write_text(
        '"""My recipe: the house one with a smaller lr."""\nimport dataclasses\n\nimport house\n\n\n'
        "def config():\n    exp = house.config()\n"
        "    return exp.replace(train=dataclasses.replace(exp.train, lr=1e-5))\n")
    recipe = recipes.load(str(tmp_path / "mine.py"))
    exp = recipe()
    assert exp.train.lr == 1e-5 and exp.data.max_channels == 4
    assert main(["train", str(tmp_path / "mine.py"), "--workdir", str(tmp_path / "w"), "--aot", "--set", *SMALL,
                 "model.num_classes=1"]) == 0
    assert "finetune step compiled for 8 devices" in capsys.readouterr().out


def test_train_simulates_devices_in_a_fresh_process(tmp_path):
    """The multi-host and device flags act before JAX starts its backend, as in experiments/*.py."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"} | {"XLA_FLAGS": FAST_COMPILE}
    run = subprocess.run([sys.executable, "-m", "labram_jax.cli", "train", "finetune_eegmat", "--workdir",
                          str(tmp_path), "--aot", "--simulate-devices", "4", "--set", *SMALL, "mesh.fsdp=2"],
                         env=env | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "finetune step compiled for 4 devices, mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in run.stdout


@pytest.mark.parametrize("recipe,message", [
    ("fnord", "labram train: no recipe 'fnord' (labram train --list shows them)\n"),
    ("finetune_eegmta", "labram train: no recipe 'finetune_eegmta'; did you mean finetune_eegmat? (labram train "
                        "--list shows them)\n"),
    ("{tmp}/missing.py", "labram train: {tmp}/missing.py: no such file\n"),
    ("{tmp}/empty.py", "labram train: {tmp}/empty.py: no config() returning an Experiment\n")])
def test_train_errors(tmp_path, capsys, recipe, message):
    (tmp_path / "empty.py").write_text("x = 1\n")
    assert main(["train", recipe.format(tmp=tmp_path), "--workdir", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err == message.format(tmp=tmp_path)


# -- a CLI that explains itself ------------------------------------------------------------------------------------
def test_help_shows_every_command_with_an_example(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for name in commands():
        if name != "labram":
            assert re.search(rf"^  labram {name} \S", text, re.M), name


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"labram {labram_jax.__version__}\n"


def test_every_option_has_help_with_units_and_defaults():
    for name, parser in commands().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, where
            # A value with a unit or a count names it (--window SECONDS, --workers N), not the flag's own name.
            if action.option_strings and action.nargs != 0 and action.type not in (None, str) and not action.choices:
                assert action.metavar, where
            if action.default not in (None, False, [], "", argparse.SUPPRESS):
                assert "default" in formatter._expand_help(action), where


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

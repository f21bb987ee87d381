"""A real install: the wheel `python -m build` makes, in a fresh venv, run from outside the clone.

The venv holds only our wheel (installed without dependencies); its dependencies are seen through a .pth line naming
this interpreter's site-packages, which comes after the venv's own, so labram_jax is imported from the wheel
(asserted) and the run stays offline. A .pth line adds a folder only: the editable install's finder in it is not run.
The install and the README's main job on it, `labram demo`, are conftest's demo_run, which test_train's learning
test and test_plots read too; the other commands run here.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from labram_jax.convert.pth import read_pth
from conftest import FAST_COMPILE

ROOT = Path(__file__).resolve().parents[1]


def source_tree(out: Path) -> Path:
    """The clone's files as git sees them (tracked, and new ones not ignored), so the build writes nothing here."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source, target = ROOT / name, out / name
        if source.exists() or source.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target, follow_symlinks=False)
    return out


def run(words: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    done = subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{words}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def install_wheel(tmp_path: Path) -> dict:
    """Build the wheel, install it alone in a fresh venv, and return how to run it from a folder outside the clone,
    with nothing of the clone on the path and on one CPU device (the xdist workers already share the cores):
    "python", "labram", "cwd", "env", and the venv's "site"."""
    src = source_tree(tmp_path / "src")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)],
        cwd=tmp_path, env=os.environ.copy())
    wheel, = (tmp_path / "dist").glob("labram_jax-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                    os.environ.copy()).strip())
    ours = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)], tmp_path, os.environ.copy())

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env |= {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1",
            "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
    return {"python": python, "labram": str(venv / "bin" / "labram"), "cwd": cwd, "env": env, "site": site}


@pytest.mark.slow
@pytest.mark.xdist_group("demo-run")  # one worker installs the wheel and runs the demo once (conftest's demo_run)
def test_the_wheel_runs_demo_train_prep_and_embed_outside_the_clone(demo_run):
    python, labram, cwd = demo_run["python"], demo_run["labram"], demo_run["cwd"]
    env = demo_run["env"] | {"XLA_FLAGS": FAST_COMPILE}  # the demo kept XLA's defaults; these commands train 5 steps
    package = Path(run([str(python), "-c", "import labram_jax, data_prep; print(labram_jax.__file__); "
                        "print(data_prep.__file__)"], cwd, env).split()[0]).parent
    assert package == demo_run["site"] / "labram_jax"
    sample = package / "sample_data" / "eegmat"
    assert len(list(sample.glob("Subject*_[12].edf"))) == 8 and (package / "sample_data" / "README.md").is_file()

    # The README's main job: every stage, its exports and logs, the .pth.
    out = demo_run["stdout"]
    assert f"1. prep: {sample} -> d/data/" in out
    for stage in ("2. tokenizer", "3. pretrain", "4. finetune", "5. evaluate", "6. convert"):
        assert stage in out
    assert read_pth(cwd / "d" / "labram_eegmat.pth")["model"]["head.weight"].shape == (1, 100)
    for stage in ("tokenizer", "pretrain", "finetune"):
        assert (cwd / "d" / stage / "export" / "labram.json").is_file()
        assert (cwd / "d" / stage / "metrics.jsonl").is_file()
    # 7. plot: each stage's curves, and the fine-tuned model's ROC and confusion matrix on the held-out subject.
    plots = cwd / "d" / "plots"
    assert "7. plot: each stage's curves -> " in out
    expected = {"tokenizer": {"loss", "lr", "grad_norm", "codebook_usage", "codebook_perplexity",
                              "batch_codebook_usage", "batch_codebook_perplexity", "val_loss"},
                "pretrain": {"loss", "lr", "grad_norm", "masked_accuracy", "val_loss"},
                "finetune": {"loss", "lr", "grad_norm", "val_loss", "val_balanced_accuracy", "val_roc_auc",
                             "roc_test", "confusion_test", "roc_best_test", "confusion_best_test"}}
    for stage, names in expected.items():
        folder = plots / stage
        assert {p.stem for p in folder.glob("*.png")} >= names, stage

    assert "finetune_eegmat " in run([labram, "train", "--list"], cwd, env)
    # The recipe on the demo's build of the sample, for 5 steps of 16 windows, with 2 of its 12 blocks, validated at
    # the end only (the installed recipe, its loader, trainer and export are what is tested; the 10 blocks more cost
    # two minutes of XLA compilation): the window shape (5 s, not the recipe's 4) comes from the build's manifests.
    out = run([labram, "train", "finetune_eegmat", "--workdir", "w", "--data", "d/data", "--set", "train.steps=5",
               "train.batch_size=16", "model.depth=2", "train.eval_epochs=0"], cwd, env)
    assert "val/balanced_accuracy" in out
    config = json.loads((cwd / "w" / "config.json").read_text())
    assert config["model"]["embed_dim"] == 200 and config["model"]["depth"] == 2 and config["train"]["steps"] == 5
    assert (cwd / "w" / "export" / "labram.json").is_file()

    out = run([labram, "prep", str(sample / "Subject00_1.edf"), "--out", "p"], cwd, env)
    assert json.loads((cwd / "p" / "manifest.json").read_text())["recordings"] == 1
    out = run([labram, "embed", "w/export", str(sample / "Subject00_2.edf"), "--out", "e.npz", "--window", "5"],
              cwd, env)
    assert "wrote 12 window embeddings of size 200" in out

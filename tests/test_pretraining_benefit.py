"""experiments/pretraining_benefit.py on the four bundled EEGMAT subjects at tiny budgets: the study's summary, a
test subject kept out of pretraining, a SIGTERM that exits 75 and a rerun that resumes, a rerun that runs nothing."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import child_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "pretraining_benefit.py"
EEGMAT = ROOT / "sample_data" / "eegmat"
# The tokenizer and pretraining at batch 16, not the study's 64: a quarter of their steps' cost, the same code.
TINY = ["--quick", "--quiet", "--test-subjects", "3", "--val-subjects", "2", "--seeds", "0,1",
        "--set", "tokenizer.train.steps=4", "pretrain.train.steps=4", "finetune.train.epochs=2",
        "tokenizer.train.batch_size=16", "pretrain.train.batch_size=16"]
METRICS = ("balanced_accuracy", "roc_auc", "pr_auc")


def study(workdir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), "--data", str(EEGMAT), "--workdir", str(workdir),
                             *TINY, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=dict(child_env(), PYTHONUNBUFFERED="1"))


def finished(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err


@pytest.mark.slow
def test_the_study_stops_on_sigterm_resumes_and_writes_its_summary(tmp_path):
    workdir = tmp_path / "study"
    first = study(workdir)
    for line in first.stdout:  # stop it once the tokenizer has finished
        if line.startswith("pretrain:"):
            first.send_signal(signal.SIGTERM)
            break
    code, _, err = finished(first)
    assert code == 75, err
    assert "preempted:" in err
    tokenizer = (workdir / "tokenizer" / "result.json").stat().st_mtime_ns

    code, out, err = finished(study(workdir))
    assert code == 0, err
    assert (workdir / "tokenizer" / "result.json").stat().st_mtime_ns == tokenizer  # not trained again
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["test_subjects"] == [3] and summary["val_subjects"] == [2] and summary["train_subjects"] == [0, 1]
    assert set(summary["arms"]) == {"pretrained", "scratch"}
    for arm in summary["arms"].values():
        assert set(arm) == set(METRICS)
        for metric in arm.values():
            assert len(metric["per_seed"]) == 2 and all(0 <= v <= 1 for v in metric["per_seed"])
            assert metric["mean"] == pytest.approx(sum(metric["per_seed"]) / 2)
    assert 0 < summary["tokenizer"]["codebook_usage"] <= 1 and summary["tokenizer"]["codebook_perplexity"] >= 1
    assert summary["wall_hours"] > 0 and 0 < summary["pretraining"]["masked_accuracy"] <= 1
    # Pretraining saw the training and validation subjects' EEG, never the test subject's.
    manifest = json.loads((workdir / "data" / "unlabelled" / "train" / "manifest.json").read_text())
    assert manifest["subject_ids"] == ["Subject00", "Subject01", "Subject02"]
    hours = json.loads((workdir / "data" / "unlabelled" / "report.json").read_text())["totals"]["hours_written"]
    assert summary["pretraining_hours"] == hours
    # The pretrained arm started from the pretrained model, the scratch arm from nothing.
    configs = {arm: json.loads((workdir / "finetune" / arm / "seed_1" / "config.json").read_text())
               for arm in ("pretrained", "scratch")}
    assert configs["pretrained"]["init"] == str(workdir / "pretrain" / "export") and configs["scratch"]["init"] == ""
    assert {k: v for k, v in configs["pretrained"].items() if k != "init"} == {
        k: v for k, v in configs["scratch"].items() if k != "init"}
    assert (workdir / "pretraining_benefit.png").stat().st_size > 0
    assert out.splitlines()[-3].startswith("pretrained: balanced_accuracy ")

    results = sorted(workdir.glob("finetune/*/*/result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    code, _, err = finished(study(workdir))  # everything done: nothing trains again
    assert code == 0, err
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert json.loads((workdir / "summary.json").read_text())["arms"] == summary["arms"]

    code, _, err = finished(study(workdir, "--model", "base"))
    assert code == 2 and err.count("\n") == 1 and "other model" in err and "use another --workdir" in err, err


@pytest.mark.parametrize("flags,message", [
    (["--test-subjects", "3", "--val-subjects", "3"], "subjects 3 are in both --test-subjects and --val-subjects"),
    (["--test-subjects", "7"], "--test-subjects: subjects 7 have no recordings in"),
    (["--test-subjects", "0,1", "--val-subjects", "2,3"], "no training subjects"),
    (["--test-subjects", "3", "--val-subjects", "2", "--set", "finetune.train.nope=1"],
     "unknown config key 'train.nope'"),
    (["--test-subjects", "3", "--val-subjects", "2", "--set", "probe.train.lr=1"],
     "keys start with a stage, one of tokenizer, pretrain, finetune"),
])
def test_a_bad_study_stops_with_one_line(tmp_path, flags, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(EEGMAT), "--workdir", str(tmp_path / "w"),
                           *flags], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists()


def test_a_stage_budget_set_by_hand_keeps_a_tenth_of_warmup(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import pretraining_benefit

    def stages(*sets: str) -> dict:
        flags = ["--data", str(EEGMAT), "--workdir", str(tmp_path), "--test-subjects", "3", "--val-subjects", "2"]
        return pretraining_benefit.plan(pretraining_benefit.parse(flags + (["--set", *sets] if sets else []))).stages

    default = stages()
    assert [default[s].train.warmup_steps for s in ("tokenizer", "pretrain")] == [100, 300]
    assert (default["finetune"].train.epochs, default["finetune"].train.warmup_epochs) == (50, 5)
    assert default["finetune"].train.class_weights == (1.0, 3.0)  # the finetune_eegmat recipe, at the tiny size
    assert default["finetune"].model.depth == default["pretrain"].model.depth == 2
    changed = stages("tokenizer.train.steps=40", "pretrain.train.warmup_steps=7", "finetune.train.epochs=1")
    assert [changed[s].train.warmup_steps for s in ("tokenizer", "pretrain")] == [4, 7]
    assert changed["finetune"].train.warmup_epochs == pytest.approx(0.1)

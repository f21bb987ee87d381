"""Our training loops against the original's, step by step, without torch: recorded trajectories of its engines.

Each folder of tests/fixtures/train_trajectories is one stage's run of the original's engine_for_vqnsp,
engine_for_pretraining or engine_for_finetuning (its optimizer factory, cosine schedules, loss scaler with clipping,
EMA codebook), recorded by `bench/train_vs_pytorch.py --record` (that folder's README says with which command):
spec.json (shapes, seed, settings, where the weights start), the per-step losses, peak lrs and pretraining masks, and
the weights after the last step. Our Trainer's compiled step replays the same batches from the same weights and
must stay within the bench's tolerance (1e-4 relative, loss and weights) at every step.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAJECTORIES = ROOT / "tests" / "fixtures" / "train_trajectories"
sys.path.insert(0, str(ROOT / "bench"))
import train_vs_pytorch as bench  # noqa: E402

RUNS = sorted(p.parent for p in TRAJECTORIES.glob("*/*/spec.json"))


def test_the_trajectories_cover_every_stage_and_both_fine_tuning_tasks():
    specs = [json.loads((run / "spec.json").read_text()) for run in RUNS]
    assert {s["stage"] for s in specs} == set(bench.STAGES)
    classes = {s["settings"]["classes"] for s in specs if s["stage"] == "finetune"}
    assert 1 in classes and any(c > 1 for c in classes)
    assert any(s["settings"]["smoothing"] > 0 for s in specs if s["stage"] == "finetune" and
               s["settings"]["classes"] > 1)


@pytest.mark.parametrize("run", RUNS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_our_loop_follows_the_original(run: Path):
    spec, line = bench.replay(run)
    assert line["lr_max_abs"] <= 1e-6 * spec.settings["lr"], line
    assert bench.passed(line), line

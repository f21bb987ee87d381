"""Live training progress: a bar on a terminal (a pty), plain lines in a pipe, nothing with --quiet.

The runs are experiments/finetune_eegmat.py at its smallest on one bundled real EEGMAT subject; each line shown is
checked against the losses the same run wrote to metrics.jsonl.
"""
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from labram_jax.train import launch, progress
from test_train import child_env

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "eegmat"
STEPS, LOG_EVERY, BATCH = 6, 2, 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Subject 00's two recordings as 4-s windows (20 channels x 4 patches): training shards only."""
    from data_prep.builders.eegmat import build_eegmat

    out = tmp_path_factory.mktemp("eegmat")
    build_eegmat(SAMPLE, out, seconds=4, splits={"train": [0]})
    return out / "train"


def recipe_args(workdir: Path, data: Path) -> list[str]:
    return ["--workdir", str(workdir), "--data", str(data), "--set", "train.epochs=0", "train.warmup_epochs=0",
            f"train.steps={STEPS}", "train.warmup_steps=1", f"train.batch_size={BATCH}",
            f"train.log_every={LOG_EVERY}", "model.depth=1", "model.embed_dim=100", "model.num_heads=5",
            "model.out_chans=4", "data.max_channels=20", "data.max_patches=4"]


def recipe_command(workdir: Path, data: Path) -> list[str]:
    return [sys.executable, str(ROOT / "experiments" / "finetune_eegmat.py"), *recipe_args(workdir, data)]


def logged_losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.mark.slow
def test_a_terminal_shows_a_live_bar(shards, tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 140, 0, 0))  # a 140-column terminal
    process = subprocess.Popen(recipe_command(tmp_path, shards), env=child_env(), stdin=subprocess.DEVNULL,
                               stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.wait(timeout=300) == 0, b"".join(chunks)[-3000:]
    screen = b"".join(chunks).decode()
    losses = logged_losses(tmp_path)
    # The bar is redrawn in place: carriage returns, one state per redraw, the last one complete.
    states = [s.strip() for s in re.split(r"[\r\n]", screen) if s.strip().startswith("train")]
    assert len(states) >= STEPS // LOG_EVERY, screen
    final = next(s for s in reversed(states) if f"{STEPS}/{STEPS}" in s)
    assert "100%" in final and "█" in final, final
    assert f"loss {losses[STEPS]:.4f}" in final and re.search(r"[\d.]+ samples/s", final) and "eta 00:00" in final
    for step in range(LOG_EVERY, STEPS, LOG_EVERY):  # every logged loss was on the bar at its step
        assert any(f"{step}/{STEPS}" in s and f"loss {losses[step]:.4f}" in s for s in states), (step, states)
    assert not re.search(r"^step \d+/", screen, re.M)  # no plain lines on a terminal


@pytest.mark.slow
def test_a_pipe_gets_plain_lines(shards, tmp_path):
    run = subprocess.run(recipe_command(tmp_path, shards), env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = logged_losses(tmp_path)
    assert "\r" not in run.stderr and "█" not in run.stderr
    lines = re.findall(r"^step (\d+)/(\d+) \((\d+)%\): loss (\S+), ([\d.?]+) samples/s, elapsed (\S+), eta (\S+)$",
                       run.stderr, re.M)
    assert [int(step) for step, *_ in lines] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), run.stderr
    for step, total, percent, loss, rate, _, eta in lines:
        assert int(total) == STEPS and int(percent) == 100 * int(step) // STEPS
        assert loss == f"{losses[int(step)]:.4f}"
        assert float(rate) > 0 and re.fullmatch(r"\d\d:\d\d", eta)
    assert lines[-1][-1] == "00:00"


def test_quiet_shows_no_progress(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    from finetune_eegmat import config

    assert launch.main(config, recipe_args(tmp_path, shards) + ["--quiet"]) == 0
    out = capsys.readouterr()
    assert len(logged_losses(tmp_path)) == STEPS // LOG_EVERY  # the run logged as always
    assert not re.search(r"step \d+/|samples/s|eta", out.out + out.err), out


def test_rate_and_eta_from_the_steps_of_this_session(monkeypatch, capsys):
    """Resumed at step 10 of 30, one step a second after a slow first step (compilation): the rate and ETA come
    from the steps after the first of the session, and only a logged loss is shown."""
    clock = iter([100.0, 130.0, 131.0, 132.0, 133.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = progress.Progress(total=30, start=10, batch_size=8)  # stderr is not a terminal under capsys
    for step in (11, 12, 13, 14):
        bar.advance(step)
        bar.write(step, {"loss": 2.0 / step, "lr": 1e-3} if step % 2 == 0 else {})
    bar.write(14, {"val/loss": 0.25, "val/accuracy": 0.75})
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    # 8 windows a step, one step a second since step 11: 18 steps to go at step 12, 16 at step 14.
    assert lines == ["step 12/30 (40%): loss 0.1667, 8.0 samples/s, elapsed 00:31, eta 00:18",
                     "step 14/30 (46%): loss 0.1429, 8.0 samples/s, elapsed 00:33, eta 00:16",
                     "step 14/30: val/loss 0.2500, val/accuracy 0.7500"]


def test_the_status_is_one_format_and_shows_only_what_is_known():
    """Before the first logged step no `loss ?`; a loss of 9 prints as 9.0000 beside 9.0400."""
    bar = progress.Progress(total=30, start=0, batch_size=8, enabled=False)
    assert bar._status() == "compiling"
    bar.loss = 9.0
    assert bar._status() == "loss 9.0000"
    bar.loss = 9.04
    assert bar._status() == "loss 9.0400"

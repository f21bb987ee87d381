"""Files from strangers: crafted inputs end within seconds, in one line, and never block a job for good.

Each case is built here, run as a user would (a subprocess with a deadline), and must end fast with its one line.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.pool import ordered_map
from test_train import child_env

ROOT = Path(__file__).resolve().parents[1]
EDF = ROOT / "labram_jax" / "sample_data" / "eegmat" / "Subject00_2.edf"


def labram(*words: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labram_jax.cli", *words], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


# -- inputs that hang ---------------------------------------------------------------------------------------------
def test_prep_never_opens_a_fifo_and_its_globs_do_not_follow_links(tmp_path):
    """A FIFO named like a recording or a BrainVision header is listed as skipped, never opened (opening it would
    wait for a writer forever); `in/**/*.edf` over links back to `in` finds each recording once."""
    data = tmp_path / "in"
    data.mkdir()
    shutil.copy(EDF, data / "real.edf")
    os.mkfifo(data / "x.edf")
    os.mkfifo(data / "y.vhdr")
    done = labram("prep", "in", "--out", "o", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    skipped = {Path(e["path"]).name: e["reason"] for e in report["recordings"] if e["status"] == "skipped"}
    assert skipped["x.edf"] == skipped["y.vhdr"] == "not a regular file (a FIFO): never opened"
    assert report["totals"]["written"] == 1

    os.unlink(data / "x.edf")
    os.unlink(data / "y.vhdr")
    os.symlink(".", data / "a")
    os.symlink(".", data / "b")
    tic = time.monotonic()
    done = labram("prep", "in/**/*.edf", "--out", "g", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - tic < 60
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    assert [e["recording"] for e in report["recordings"]] == ["real.edf"]


def test_train_refuses_a_fifo_named_like_a_shard(tmp_path, synthetic):
    shards = tmp_path / "train"
    shutil.copytree(synthetic / "train", shards)
    os.mkfifo(shards / "d-00000.array_record")
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "finetune_eegmat.py"), "--workdir",
                           str(tmp_path / "w"), "--data", str(shards), "--set", "train.steps=2", "model.depth=1"],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        f"error: {shards / 'd-00000.array_record'}: not a regular file (a FIFO)"


def _open_blocking(path: str) -> bytes:
    with open(path, "rb") as f:  # a FIFO with no writer: blocks until killed
        return f.read()


def test_an_abandoned_pool_ends_workers_blocked_for_good(tmp_path):
    """A stop (poll raises) while a worker waits on a file that never answers: the map ends within seconds and
    no worker is left behind to hold the interpreter's exit."""
    fifo = tmp_path / "never"
    os.mkfifo(fifo)
    deadline = time.monotonic() + 2

    def poll() -> None:
        if time.monotonic() > deadline:
            raise KeyboardInterrupt

    import multiprocessing

    tic = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        list(ordered_map(_open_blocking, [str(fifo)], 1, lambda item, why: b"", poll=poll))
    assert time.monotonic() - tic < 30
    time.sleep(0.5)
    assert not [p for p in multiprocessing.active_children() if p.is_alive() and "Fork" not in p.name]


@pytest.mark.parametrize("planted", [".lock", ".progress-00000-of-00001.jsonl"])
def test_prep_does_not_write_through_a_link_planted_in_its_output(tmp_path, planted):
    out = tmp_path / "o"
    out.mkdir()
    target = tmp_path / "elsewhere"
    os.symlink(target, out / planted)
    done = labram("prep", str(EDF), "--out", "o", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"labram prep: o/{planted}: a symbolic link, not followed (this "
                                                "job writes its own file there): remove it"]
    assert not target.exists()

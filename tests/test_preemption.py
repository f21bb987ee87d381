"""Told to stop: SIGTERM or SIGINT ends training (one process or two), `labram prep` and `labram build` after
saving, with exit status 75, and the rerun ends where an uninterrupted run ends; a full disk during a checkpoint
save stops the run and keeps the previous checkpoint.

The end-to-end tests run the EEGMAT fine-tuning recipe at test size (test_train.recipe_command) and the prep job
of test_prep in subprocesses, and signal them at a random point.
"""
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax.checkpoint import load_model
from labram_jax.preemption import EXIT_CODE, StopAgreement, StopSignals
from labram_jax.train import launch
from labram_jax.train.checkpoints import Checkpoints, DiskFull
from labram_jax.train.config import override
from labram_jax.train.trainer import Trainer
from test_prep import EEGMAT, FIXTURES, output_files
from test_train import child_env, completed_steps, recipe_command, weights

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 30  # what preemptible machines typically allow between SIGTERM and the kill


class Child:
    """A subprocess in its own process group, its output collected while it runs."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path | None = None):
        self.process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self.lines]
        for reader in self.readers:
            reader.start()

    def _read(self, name: str) -> None:
        for line in getattr(self.process, name):
            self.lines[name].append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.lines["stdout"])

    @property
    def stderr(self) -> str:
        return "".join(self.lines["stderr"])

    def wait_for(self, condition, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"ended ({self.process.returncode}) too early:\n{self.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"timed out:\n{self.stderr[-3000:]}"
            time.sleep(0.01)

    def signal(self, number: int, group: bool = False) -> None:
        (os.killpg if group else os.kill)(self.process.pid, number)

    def finish(self, timeout: float = 300) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
        for reader in self.readers:
            reader.join(timeout=10)
        return code


def logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the signal handling itself ------------------------------------------------------------------------------------
def test_signals_set_a_flag_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals("the test") as signals:
        assert not signals.requested and StopAgreement(signals)() is False
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # the second is noted, and raises no KeyboardInterrupt
        assert signals.received == "SIGTERM" and StopAgreement(signals)() is True
    assert signal.getsignal(signal.SIGTERM) is before


def test_signals_from_another_thread_leave_the_handlers_alone():
    handlers = []
    thread = threading.Thread(target=lambda: handlers.append(StopSignals("x").__enter__()._previous))
    thread.start()
    thread.join()
    assert handlers == [{}]


# -- training: one process ------------------------------------------------------------------------------------------
TEST_SIZE = ["--set", "train.save_every=10"]  # periodic checkpoints at 10 and 20 of the 24 steps


@pytest.mark.slow
@pytest.mark.xdist_group("recipe-reference")  # one worker trains the shared uninterrupted run once
def test_sigterm_saves_the_step_reached_and_the_rerun_ends_bit_identical(synthetic, recipe_reference, tmp_path):
    workdir = tmp_path / "preempted"
    signal_at = random.Random().randint(3, 18)
    run = Child(recipe_command(workdir, synthetic) + TEST_SIZE, child_env())
    run.wait_for(lambda: len(logged_steps(workdir)) >= signal_at)
    run.signal(signal.SIGTERM)
    sent = time.monotonic()
    run.wait_for(lambda: "SIGTERM: training stops" in run.stderr, timeout=GRACE_S)
    run.signal(signal.SIGINT)  # a second signal, while the run finishes its step and saves: no torn checkpoint
    assert run.finish(timeout=GRACE_S) == EXIT_CODE, run.stderr[-3000:]
    took = time.monotonic() - sent
    stopped = re.search(r"preempted: stopped at step (\d+): checkpoint (\S+) saved", run.stderr)
    assert stopped, run.stderr[-3000:]
    step = int(stopped[1])
    print(f"SIGTERM after logging step {signal_at}; exited {took:.2f} s later with checkpoint {step}")
    assert took < GRACE_S and "SIGINT: already stopping after SIGTERM" in run.stderr
    # The step it reached, not the last periodic save (10 or 20), with the loader position beside it.
    assert signal_at <= step == logged_steps(workdir)[-1] and completed_steps(workdir)[-1] == step
    assert Path(stopped[2]) == workdir / "checkpoints" / str(step)
    assert (workdir / "checkpoints" / "data_state" / f"step_{step}.process_0.json").exists()
    assert not (workdir / "export").exists()

    resumed = subprocess.run(recipe_command(workdir, synthetic) + TEST_SIZE, env=child_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step} " in resumed.stdout
    # The reference checkpointed every 4 steps, this run every 10: checkpoints leave the weights alone.
    expected, got = (weights(load_model(d / "export")) for d in (recipe_reference, workdir))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert logged_steps(workdir) == list(range(1, step + 1)) + list(range(step + 1, 25))


@pytest.mark.slow
def test_a_group_signal_with_loader_workers_saves_and_resumes(synthetic, tmp_path):
    """Packed training with data.workers=2, and the signal to the whole process group, as SLURM and Ctrl-C send it:
    each run saves the step it reaches and the next resumes from it, whether the signal comes while the workers
    start (with the step compiling), with their prefetch buffers full (steps logged) or while validating. One run
    after another, each resuming the last: four processes, not two per moment."""
    workdir = tmp_path / "run"
    command = recipe_command(workdir, synthetic) + TEST_SIZE + [
        "data.workers=2", "train.steps=12", "train.eval_every=8", "data.eval_batch_size=2",
        "data.pack_tokens=16", "data.pack_windows=2"]
    reached = 0
    for moment in ("startup", "training", "validation"):
        run = Child(command, child_env())
        if moment == "startup":
            run.wait_for(lambda: (workdir / "config.json").exists())
        else:  # the validation at step 8 starts as soon as step 8 is logged
            run.wait_for(lambda: len(logged_steps(workdir)) >= (8 if moment == "validation" else reached + 3))
        run.signal(signal.SIGTERM, group=True)
        assert run.finish(timeout=GRACE_S) == EXIT_CODE, f"{moment}: {run.stderr[-3000:]}"
        if reached:
            assert f"resumed from step {reached} " in run.stdout, moment
        stopped = re.search(r"preempted: stopped at step (\d+)", run.stderr)
        assert stopped, f"{moment}: {run.stderr[-3000:]}"
        reached = int(stopped[1])
    assert reached == 8, "the signal during the validation at step 8 saves step 8"
    resumed = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {reached} " in resumed.stdout
    assert logged_steps(workdir)[-1] == 12


# -- training: two processes ---------------------------------------------------------------------------------------
def two_processes(workdir: Path, data: Path) -> list[Child]:
    """The recipe on two local processes of one CPU device each, under jax.distributed. Training windows only:
    the test metrics of the best validation checkpoint (Trainer._best_test) fail across processes."""
    port = free_port()
    return [Child(recipe_command(workdir, data / "train") + TEST_SIZE + ["--coordinator", f"127.0.0.1:{port}",
                                                              "--num-processes", "2", "--process-id", str(i)],
                  child_env())
            for i in range(2)]


def finish_all(children: list[Child], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [child.finish(timeout=max(deadline - time.monotonic(), 1)) for child in children]
    finally:
        for child in children:
            if child.process.poll() is None:
                os.killpg(child.process.pid, signal.SIGKILL)


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_one_is_signalled(synthetic, tmp_path):
    reference = tmp_path / "reference"
    children = two_processes(reference, synthetic)
    assert finish_all(children, timeout=300) == [0, 0], "\n".join(c.stderr[-3000:] for c in children)

    workdir = tmp_path / "preempted"
    signal_at = random.Random().randint(3, 18)
    children = two_processes(workdir, synthetic)
    children[0].wait_for(lambda: len(logged_steps(workdir)) >= signal_at)  # process 0 logs
    children[1].signal(signal.SIGTERM)
    sent = time.monotonic()
    codes = finish_all(children, timeout=GRACE_S)
    took = time.monotonic() - sent
    assert codes == [EXIT_CODE, EXIT_CODE], "\n".join(c.stderr[-2000:] for c in children)
    steps = {int(re.search(r"preempted: stopped at step (\d+)", c.stderr)[1]) for c in children}
    assert len(steps) == 1, steps
    step = steps.pop()
    print(f"SIGTERM to process 1 after step {signal_at}; both exited {took:.2f} s later at step {step}")
    assert took < GRACE_S and signal_at <= step == logged_steps(workdir)[-1]
    assert completed_steps(workdir)[-1] == step
    assert all((workdir / "checkpoints" / "data_state" / f"step_{step}.process_{i}.json").exists() for i in (0, 1))

    children = two_processes(workdir, synthetic)
    assert finish_all(children, timeout=300) == [0, 0], "\n".join(c.stderr[-2000:] for c in children)
    assert f"resumed from step {step} " in children[0].stdout
    expected, got = (weights(load_model(d / "export")) for d in (reference, workdir))
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


# -- a full disk --------------------------------------------------------------------------------------------------
def test_disk_full_names_the_folder_and_size_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    state = {"w": jnp.arange(1000, dtype=jnp.float32), "step": jnp.zeros((), jnp.int32)}
    ckpt = Checkpoints(tmp_path, keep=3)
    ckpt.save(1, state, {"position": 1}, {})
    ckpt.wait()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("labram_jax.files.replace_atomically", full)  # the loader state's write, before Orbax's
    with pytest.raises(DiskFull) as raised:
        ckpt.save(2, jax.tree.map(lambda a: a + 1, state), {"position": 2}, {})
    monkeypatch.undo()
    message = str(raised.value)
    assert f"no space left on device for checkpoint 2 in {tmp_path / 'checkpoints'}: it needs about 4,004 " \
           "bytes" in message and "checkpoint 1 is intact" in message
    ckpt.close()
    like = jax.tree.map(np.zeros_like, state)
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
    step, restored, data_state, _ = Checkpoints(tmp_path, keep=3).restore_latest(like, shardings)
    assert step == 1 and data_state == {"position": 1}
    np.testing.assert_array_equal(restored["w"], state["w"])


def _can_mount_tmpfs(where: Path) -> bool:
    where.mkdir()
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_full_disk_during_a_background_save_stops_the_run(synthetic, tmp_path):
    """The checkpoints on a 4.5 MB tmpfs (in a user and mount namespace): the first checkpoint (about 3 MB)
    fits, the second runs out of space in Orbax's background write."""
    if shutil.which("unshare") is None or not _can_mount_tmpfs(tmp_path / "probe"):
        pytest.skip("needs unshare and unprivileged user namespaces to mount a small tmpfs")
    workdir, kept = tmp_path / "run", tmp_path / "kept"
    (workdir / "checkpoints").mkdir(parents=True)
    kept.mkdir()
    command = recipe_command(workdir, synthetic)  # checkpoints every 4 steps
    script = (f'mount -t tmpfs -o size=4500k tmpfs {workdir / "checkpoints"} && "$@"; code=$?; '
              f'cp -a {workdir / "checkpoints"} {kept}; exit $code')
    run = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script, "sh", *command], env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]
    error = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and re.fullmatch(
        rf"error: no space left on device for checkpoint 8 in {workdir / 'checkpoints'}: it needs about "
        r"[\d,]+ bytes, [\d,]+ are free; checkpoint 4 is intact; free space \(or use another workdir\) and rerun "
        "to resume", error[0]), run.stderr[-3000:]
    # Stopped rather than training on without checkpoints: once the failure is known, at the next save at the latest.
    assert logged_steps(workdir)[-1] <= 12

    # The checkpoint before the failed one loads into the run's state (the tmpfs is gone: its copy).
    sys.path.insert(0, str(ROOT / "experiments"))
    import finetune_eegmat

    exp = launch._split_folders([str(synthetic)], override(finetune_eegmat.config(),
                                                           *command[command.index("--set") + 1:]))
    trainer = Trainer(exp, kept, devices=jax.devices()[:1])
    restored = Checkpoints(kept, keep=3, identity={"stage": "finetune"}).restore_latest(trainer.state,
                                                                                      trainer.shardings)
    assert restored is not None and restored[0] == 4 and int(restored[1]["step"]) == 4


# -- labram prep and labram build ----------------------------------------------------------------------------------
def labram(*words: str, cwd: Path) -> Child:
    return Child([sys.executable, "-m", "labram_jax.cli", *words], {**os.environ, "PYTHONPATH": str(ROOT)}, cwd=cwd)


@pytest.mark.slow
def test_prep_stopped_by_sigterm_resumes_to_identical_shards(tmp_path):
    words = ("prep", str(FIXTURES), str(EEGMAT), "--out", "out", "--workers", "2", "--shard-windows", "4")
    for name in "ab":
        (tmp_path / name).mkdir()
    reference = labram(*words, cwd=tmp_path / "a")
    assert reference.finish(timeout=300) == 0, reference.stderr

    job = labram(*words, cwd=tmp_path / "b")
    journal = tmp_path / "b" / "out" / ".progress-00000-of-00001.jsonl"
    closed = random.Random().randint(1, 5)  # shards closed before the signal
    job.wait_for(lambda: journal.exists() and journal.read_bytes().count(b"\n") >= 1 + closed)
    job.signal(signal.SIGTERM, group=True)  # as a scheduler that signals every process: the workers too
    sent = time.monotonic()
    assert job.finish(timeout=GRACE_S) == EXIT_CODE, job.stderr
    took = time.monotonic() - sent
    stopped = re.search(r"labram prep: stopped by SIGTERM: (\d+) of 14 inputs are done and journaled", job.stderr)
    assert stopped, job.stderr
    print(f"prep: SIGTERM after {closed} shards, exited {took:.2f} s later with {stopped[1]} recordings done")
    assert took < GRACE_S and "rejected" not in job.stderr  # no worker was taken for a crash
    done = sum(len(json.loads(line)["entries"]) for line in journal.read_text().splitlines()[1:])
    assert int(stopped[1]) == done and not (tmp_path / "b" / "out" / "manifest.json").exists()

    resumed = labram(*words, cwd=tmp_path / "b")
    assert resumed.finish(timeout=300) == 0, resumed.stderr
    assert f"({done} done before)" in resumed.stdout
    assert output_files(tmp_path / "b" / "out") == output_files(tmp_path / "a" / "out")


@pytest.mark.slow
def test_build_stopped_by_sigterm_builds_again_identically(tmp_path):
    reference = labram("build", "eegmat", str(EEGMAT), str(tmp_path / "a"), "--workers", "2", cwd=tmp_path)
    assert reference.finish(timeout=300) == 0, reference.stderr

    out = tmp_path / "b"
    job = labram("build", "eegmat", str(EEGMAT), str(out), "--workers", "2", cwd=tmp_path)
    job.wait_for(lambda: any(out.glob(".staging/train/*.tmp")))  # the first file's windows are being written
    job.signal(signal.SIGTERM, group=True)
    assert job.finish(timeout=GRACE_S) == EXIT_CODE, job.stderr
    assert re.search(r"labram build: stopped by SIGTERM after \d of 8 files; .* is incomplete", job.stderr)
    assert not (out / "report.json").exists() and not list(out.glob("train/*.array_record"))

    again = labram("build", "eegmat", str(EEGMAT), str(out), "--workers", "2", cwd=tmp_path)
    assert again.finish(timeout=300) == 0, again.stderr
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    got, expected = files(out), files(tmp_path / "a")
    assert got.keys() == expected.keys()
    for name in got:  # the manifests and the report name their source folder, the same here
        assert got[name] == expected[name], name

"""Two local processes (2 CPU devices each, Gloo collectives) train as one: the same parameters as one process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from labram_jax.data.records import Window
from labram_jax.data.shards import write_shard
from labram_jax.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

# Each process: the launcher's distributed flags, then the trainer's whole loop (loader slice per process, global
# batches, Orbax checkpoints at step 2 and 4, evaluation gathered over processes, export); then process 0 writes
# the final parameters, gathered from both processes.
CHILD = '''
import json
import sys
from pathlib import Path

import numpy as np

from labram_jax.train import launch

workdir, data, port, index, tests = sys.argv[1:6]
launch._initialize_distributed(launch.parser("").parse_args(
    ["--workdir", workdir, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", index]))

import jax  # noqa: E402 - after the distributed setup, as the launcher does
from jax.experimental import multihost_utils  # noqa: E402

sys.path.insert(0, tests)
from test_train_distributed import experiment  # noqa: E402
from labram_jax.train.trainer import Trainer  # noqa: E402

trainer = Trainer(experiment(data), workdir)
export_error, summary = None, {}
try:
    summary = trainer.train()
except AssertionError as error:  # the export's Orbax barrier (see the test)
    export_error = str(error)
params = multihost_utils.process_allgather(trainer.state["params"], tiled=True)
if jax.process_index() == 0:
    np.savez(f"{workdir}/params.npz", **{jax.tree_util.keystr(p): np.asarray(v)
                                         for p, v in jax.tree_util.tree_leaves_with_path(params)})
    Path(f"{workdir}/result.json").write_text(json.dumps(
        {"devices": jax.device_count(), "local": jax.local_device_count(), "mesh": dict(trainer.mesh.shape),
         "summary": summary, "export_error": export_error}))
'''


def experiment(data: str):
    """A tiny fine-tuning run; imported by the child processes too, so both sides train the same thing."""
    from labram_jax import configs
    from labram_jax.train.config import DataConfig, Experiment, TrainConfig

    # eps 1e-4: Adam's first steps would otherwise turn gradients that are zero up to rounding (the conv bias
    # before GroupNorm) into steps of up to lr that depend on the summation order.
    return Experiment(stage="finetune", model=configs.tiny(num_classes=1),
                      data=DataConfig(train=(f"{data}/train",), val=(f"{data}/val",), test=(f"{data}/test",),
                                      max_channels=4, max_patches=2),
                      train=TrainConfig(steps=4, batch_size=8, lr=1e-3, min_lr=1e-4, eps=1e-4, log_every=1,
                                        save_every=2))


def weights(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.array(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 8), ("test", 12)):
        (root / split).mkdir(parents=True)
        labels = np.arange(count) % 2
        signal = rng.normal(0, 10, (count, 4, 2, 200)) + labels[:, None, None, None] * 20
        write_shard(root / split / "syn-00000.array_record", [
            Window(signal=s.astype(np.float32), channel_rows=np.arange(1, 5, dtype=np.int16),
                   channel_names=("C0", "C1", "C2", "C3"), recording=f"syn/{i}", start=0.0, label=int(y))
            for i, (s, y) in enumerate(zip(signal, labels))])
    return root


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    data = write_data(tmp_path / "data")
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    from conftest import FAST_COMPILE  # not at the top: the children import this module, and conftest sets 8 devices

    port, workdir = free_port(), tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env |= {"XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(ROOT)}
    children = [subprocess.Popen([sys.executable, str(child), str(workdir), str(data), str(port), str(i),
                                  str(Path(__file__).parent)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for i in range(2)]
    outputs = []
    try:
        for process in children:
            outputs.append(process.communicate(timeout=420)[0])
    finally:
        for process in children:
            if process.poll() is None:
                process.kill()
    for i, (process, out) in enumerate(zip(children, outputs)):
        assert process.returncode == 0, f"process {i}:\n{out[-4000:]}"
    result = json.loads((workdir / "result.json").read_text())
    assert result["devices"] == 4 and result["local"] == 2 and result["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}

    # One process, one device, the same global batches (the processes' halves of them, in another row order).
    single = Trainer(experiment(str(data)), tmp_path / "single", devices=jax.devices()[:1])
    initial = weights(single.state["params"])
    summary = single.train()
    expected = weights(single.state["params"])
    got = dict(np.load(workdir / "params.npz"))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    assert not np.allclose(expected["['head']['kernel'].value"], initial["['head']['kernel'].value"])
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert result["export_error"] is None, (
        "the export failed in the 2-process run: labram_jax.checkpoint.export.save_model builds an Orbax "
        "checkpointer that synchronises every process although only process 0 calls it: " + result["export_error"])
    # With a validation split the run ends with the test metrics of its best export too, placed on both hosts.
    for key in ("test/loss", "best_test/loss"):
        np.testing.assert_allclose(result["summary"][key], summary[key], rtol=1e-4, err_msg=key)

"""The launcher's CPU devices: a single-process run on a CPU host splits its batch over one device per core."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labram_jax.recipes import finetune_eegmat
from labram_jax.train import launch
from labram_jax.train.config import override

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cores, sets, devices", [
    (2, ["train.batch_size=32"], 2),
    (3, ["train.batch_size=32"], 2),  # the most cores that split the batch
    (8, ["train.batch_size=12"], 6),
    (7, ["train.batch_size=7"], 7),
    (4, ["train.batch_size=8", "train.grad_accum=4"], 2),  # the micro-batch of 2 is what splits
    (2, ["train.batch_size=3"], 1),
    (1, ["train.batch_size=32"], 1),
    (16, ["train.batch_size=32", "mesh.fsdp=4"], 16),
    (6, ["train.batch_size=32", "mesh.fsdp=4"], 4),
    (2, ["train.batch_size=32", "mesh.fsdp=8"], 1),  # too few cores: the mesh's own error follows
    (8, ["train.batch_size=6", "mesh.tensor=2"], 6),  # the batch splits over data x fsdp = devices / tensor
    (4, ["train.batch_size=32", "mesh.data=2"], 2),  # an explicit mesh is what it says
    (4, ["train.batch_size=32", "mesh.data=8"], 1),
])
def test_cpu_devices_are_one_per_core_as_the_mesh_and_batch_allow(cores, sets, devices):
    exp = override(finetune_eegmat.config(), *sets)
    assert launch.cpu_devices(exp, cores) == devices


@pytest.mark.slow
@pytest.mark.parametrize("env, expected", [({}, "cores"), ({"JAX_NUM_CPU_DEVICES": "1"}, 1)])
def test_a_train_command_uses_every_core_unless_told(tmp_path, env, expected):
    """The recipe's step compiled ahead of time by the command a user runs, in a fresh process without the
    session's 8 simulated devices: one device per core (2 on CI's 2 cores), or the count JAX_NUM_CPU_DEVICES
    sets."""
    child = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    child |= {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **env}
    sets = ["model.depth=1", "train.batch_size=16"]
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "finetune_eegmat.py"), "--workdir",
                          str(tmp_path), "--aot", "--set", *sets], env=child, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    if expected == "cores":
        expected = launch.cpu_devices(override(finetune_eegmat.config(), *sets), len(os.sched_getaffinity(0)))
    assert f"step compiled for {expected} devices, mesh {{'data': {expected}, " in run.stdout

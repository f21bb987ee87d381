"""The launcher on a CPU host: a single-process run splits its batch over one device per core, and a command runs
with huge pages behind malloc's large blocks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labram_jax import host
from labram_jax.recipes import finetune_eegmat
from labram_jax.train import launch
from labram_jax.train.config import override
from conftest import FAST_COMPILE

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
    child = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    child |= {"XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **env}
    sets = ["model.depth=1", "train.batch_size=16"]
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "finetune_eegmat.py"), "--workdir",
                          str(tmp_path), "--aot", "--set", *sets], env=child, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    if expected == "cores":
        expected = launch.cpu_devices(override(finetune_eegmat.config(), *sets), host.cpu_count())
    assert f"step compiled for {expected} devices, mesh {{'data': {expected}, " in run.stdout


@pytest.mark.skipif(host.cpu_count() < 2, reason="needs 2 CPUs for a count of devices to change")
def test_a_second_run_in_one_process_uses_the_devices_it_has_or_says_why_not():
    """JAX fixes its CPU device count when it starts: a second run that would pick another count runs on the
    devices there are where its batch splits over them (one line says so), and otherwise stops with one line."""
    script = """
import jax.numpy as jnp
from labram_jax.errors import UserError
from labram_jax.recipes import finetune_eegmat
from labram_jax.train import launch
from labram_jax.train.config import override
launch.use_cores(override(finetune_eegmat.config(), "mesh.data=1"))  # one device
jnp.ones(1).block_until_ready()  # JAX has started
launch.use_cores(finetune_eegmat.config())  # would take one per core: runs on the one there is
try:
    launch.use_cores(override(finetune_eegmat.config(), "mesh.data=2"))  # needs two
except UserError as error:
    print("error:", error)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    run = subprocess.run([sys.executable, "-c", script], env=env | {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "this process already runs JAX on 1 CPU devices (an earlier run set them): this run uses them" in run.stderr
    assert run.stdout.strip() == ("error: this process already runs JAX on 1 CPU devices (an earlier run set them), "
                                  "which this run's batch cannot split over; run it in a fresh process")


def test_a_recipe_from_stdin_trains_and_exports_without_huge_pages(synthetic, tmp_path):
    """`python - <<EOF`: the script cannot be read again, so there is no rerun (which would run nothing and exit
    0); it trains in this process and says once that huge pages are off."""
    from test_train import child_env, recipe_command

    script = "from labram_jax.recipes import finetune_eegmat\nfrom labram_jax.train import launch\n" \
             "raise SystemExit(launch.main(finetune_eegmat.config))\n"
    args = recipe_command(tmp_path / "run", synthetic)[2:]  # the recipe's flags, without the script
    env = {k: v for k, v in child_env().items() if k != "GLIBC_TUNABLES"}
    run = subprocess.run([sys.executable, "-", *args], input=script, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("huge pages off: a script read from stdin cannot run again") == 1
    assert (tmp_path / "run" / "export").is_dir() and (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_command_runs_again_once_with_huge_pages(tmp_path):
    """The command line runs a second time with the tunable added to the ones set, its arguments unchanged, and
    not a third time."""
    script = tmp_path / "probe.py"
    script.write_text("import os, sys\nfrom labram_jax.train.launch import rerun_with_huge_pages\n"
                      "print('start', flush=True)\nrerun_with_huge_pages()\n"
                      "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    run = subprocess.run([sys.executable, str(script), "--workdir", "w x"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["start", "start",
                                       "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 ['--workdir', 'w x']"]


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_huge_pages_spare_a_step_its_page_faults(tmp_path):
    """A jitted step with a 1 GiB temporary (2^14 x 2^14 floats), as XLA's CPU client maps one per execution: in 4 KiB pages every
    call faults it in anew; with the tunable most of it comes in 2 MiB pages."""
    script = tmp_path / "faults.py"
    script.write_text(
        "import resource, jax, jax.numpy as jnp\n"
        "f = jax.jit(lambda x: (jnp.outer(x, x) * 2.0).sum(axis=0))\n"
        "x = jnp.ones(2 ** 14)\n"
        "f(x).block_until_ready()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5): f(x).block_until_ready()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = {}
    for tunables in ("", HUGE := "glibc.malloc.hugetlb=1"):
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
        env |= {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": tunables}
        run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        faults[tunables] = int(run.stdout.split()[-1])
    assert faults[""] > 5 * 2 ** 30 / 4096 / 4, faults  # a fault per 4 KiB page of each call's temporary, or near
    assert faults[HUGE] < faults[""] / 10, faults

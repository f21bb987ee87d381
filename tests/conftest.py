"""Test session setup, before JAX starts: 8 simulated CPU devices for the sharding tests, XLA's CPU backend
without LLVM's optimisations, and one persistent XLA compilation cache for the whole session.

Most test programs are compiled once and run for a few steps, so they are built for a quick compilation: LLVM
without its optimisation passes, and XLA's older loop emitters for the fusions (the newer MLIR emitters cost more to
compile at that level). One program of the scan-blocks test compiles in 2.0 s instead of 5.1 s and steps in 73 ms
instead of 36, so the demo, which trains 400 steps, keeps XLA's defaults. The settings change how XLA's fusions
become machine code, not the HLO program: shardings, cost and memory analyses are the same. The test subprocesses
get them through FAST_COMPILE. XLA_FLAGS set by the caller come after them and win, so
`XLA_FLAGS="--xla_backend_optimization_level=3 --xla_cpu_use_fusion_emitters=true" make test` runs the in-process
tests, the parity tests among them, as XLA compiles by default.

Most of the suite's time is XLA compiling the same tiny programs again: each Trainer jits its own step, and every
subprocess (the recipe runs of the preemption tests, the CLI) starts with an empty in-memory cache. The cache
folder is made by the first process (the xdist controller, or the only one) and reaches the xdist workers and every
subprocess through the environment; it starts empty, so a run still compiles everything once, and it is removed
at the end of the session.
"""
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = " ".join(filter(None, [FAST_COMPILE, os.environ.get("XLA_FLAGS"),
                                                 "--xla_force_host_platform_device_count=8"]))

_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="labram-jax-tests-xla-cache-")
    # Every program, however fast it compiled: the tiny test models compile in well under JAX's default 1 s.
    # Bounded, as labram_jax.compile_cache bounds the commands' cache: JAX keeps an access-time file beside each
    # entry only when bounded, and a bounded process that finds entries without one warns at every write.
    os.environ |= {"JAX_COMPILATION_CACHE_DIR": _CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 * 2 ** 30)}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items: list) -> None:
    """The slow end-to-end tests first (each keeps its place among them). xdist hands tests (and xdist groups)
    out in this order as workers free up, so the minutes-long ones start early and the many short ones fill in
    at the end, rather than one long test started last keeping one worker busy while the other waits.

    And the xdist_group marks, on a worker under --dist loadgroup: xdist 3.8 names a test's group by setting
    item._nodeid, which pytest 9 no longer reads (the node id is item._id), so without this every group's tests
    were spread over both workers and each built the group's fixture."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                        for mark in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix):
            item._id = coerce_node_id(item.nodeid + suffix)


def pytest_unconfigure(config) -> None:
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """train (32 windows), val and test (16 each) of test_train's synthetic windows, balanced labels, as a dataset
    builder lays them out."""
    from test_train import synthetic_window, write_split

    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("val", 16), ("test", 16)):
        write_split(root / split, [synthetic_window(i, i % 2, rng) for i in range(count)])
    return root


@pytest.fixture(scope="session")
def recipe_reference(synthetic, tmp_path_factory) -> Path:
    """The uninterrupted run of test_train.recipe_command that the killed and the signalled runs must end equal to
    (its periodic checkpoints change nothing of the weights). Read only: the tests that use it share it, in the
    xdist group "recipe-reference"."""
    from test_train import child_env, recipe_command

    workdir = tmp_path_factory.mktemp("recipe-reference") / "run"
    run = subprocess.run(recipe_command(workdir, synthetic), env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict:
    """The README's main job as a user runs it: the wheel `python -m build` makes, installed alone in a fresh
    venv, and `labram demo --out d` started from a folder outside the clone (the bundled sample as 5-s windows,
    subjects 00-01 train, 02 validates, 03 tests; a 256-code tokenizer, pretraining against it, fine-tuning from
    the pretrained export, evaluation, conversion, plots). test_install checks the install and the job's outputs,
    test_train that the stages learn, test_plots draws them: read only, in the xdist group "demo-run".

    The stage workdirs by name, the data under "data", the fine-tuning run's last logged value of each metric
    under "summary", the demo's output under "stdout", and test_install.install_wheel's keys to run `labram`."""
    from test_install import install_wheel, run

    installed = install_wheel(tmp_path_factory.mktemp("demo-run"))
    stdout = run([installed["labram"], "demo", "--out", "d"], installed["cwd"], installed["env"], timeout=900)
    out = installed["cwd"] / "d"
    summary: dict = {}
    for record in map(json.loads, (out / "finetune" / "metrics.jsonl").read_text().splitlines()):
        summary |= record
    return installed | {stage: out / stage for stage in ("tokenizer", "pretrain", "finetune")} | {
        "data": out / "data", "summary": summary, "stdout": stdout}

"""Test session setup, before JAX starts: 8 simulated CPU devices for the sharding tests, and one persistent XLA
compilation cache for the whole session.

Most of the suite's time is XLA compiling the same tiny programs again: each Trainer jits its own step, and every
subprocess (the recipe runs of the preemption tests, the CLI) starts with an empty in-memory cache. The cache
folder is made by the first process (the xdist controller, or the only one) and reaches the xdist workers and every
subprocess through the environment; it starts empty, so a run still compiles everything once, and it is removed
at the end of the session.
"""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="labram-jax-tests-xla-cache-")
    # Every program, however fast it compiled: the tiny test models compile in well under JAX's default 1 s.
    os.environ |= {"JAX_COMPILATION_CACHE_DIR": _CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


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

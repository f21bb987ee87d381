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
def eegmat_runs(tmp_path_factory) -> dict:
    """The three stages on the bundled sample as 4-s windows (20 channels x 4 patches; subjects 00-01 train, 02
    validates, 03 tests): a 64-code tokenizer, pretraining against it and fine-tuning from the pretrained export,
    validated at steps 50 and 100. test_train checks that they learn, test_plots draws them: read only, in the
    xdist group "eegmat-runs". The workdirs by stage, the data under "data", the fine-tuning summary under
    "summary"."""
    import jax

    from data_prep.builders.eegmat import build_eegmat
    from labram_jax import configs
    from labram_jax.demo import SAMPLE
    from labram_jax.train.config import DataConfig, Experiment, TrainConfig
    from labram_jax.train.trainer import Trainer

    root = tmp_path_factory.mktemp("eegmat-runs")
    data = root / "data"
    build_eegmat(SAMPLE, data, seconds=4, splits={"train": [0, 1], "val": [2], "test": [3]})
    one = jax.devices()[:1]
    unlabelled = DataConfig(train=(str(data / "train"),), val=(str(data / "val"),), max_channels=20,
                            max_patches=4)
    labelled = DataConfig(train=(str(data / "train"),), val=(str(data / "val"),),
                          test=(str(data / "test"),), max_channels=20, max_patches=4)
    common = dict(batch_size=16, log_every=1, save_every=1000, warmup_steps=4)
    # A gentle tokenizer lr keeps the codebook alive: at 1e-3 per-batch usage falls to a third within 30 steps.
    tok = Experiment(stage="tokenizer", tokenizer=configs.tokenizer_tiny(codebook_size=64), data=unlabelled,
                     train=TrainConfig(steps=40, lr=2e-4, min_lr=2e-5, weight_decay=1e-4, b2=0.99, **common))
    Trainer(tok, root / "tokenizer", devices=one).train(progress=False)
    pre = Experiment(stage="pretrain", model=configs.tiny(vocab_size=64), data=unlabelled,
                     tokenizer_checkpoint=str(root / "tokenizer" / "export"),
                     train=TrainConfig(steps=40, lr=5e-4, min_lr=1e-5, b2=0.98, clip_grad=3.0, **common))
    Trainer(pre, root / "pretrain", devices=one).train(progress=False)
    # The paper's fine-tuning recipe at this size: drop path 0.1, layer decay 0.65.
    ft = Experiment(stage="finetune", model=configs.tiny(num_classes=1, drop_path_rate=0.1), data=labelled,
                    init=str(root / "pretrain" / "export"),
                    train=TrainConfig(**{**common, "warmup_steps": 10}, steps=100, lr=1e-3, min_lr=1e-5,
                                      layer_decay=0.65, eval_every=50))
    summary = Trainer(ft, root / "finetune", devices=one).train(progress=False)
    return {stage: root / stage for stage in ("tokenizer", "pretrain", "finetune")} | {"data": data,
                                                                                      "summary": summary}

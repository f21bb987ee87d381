"""The persistent compilation cache every command turns on: a second run of the same recipe and shapes compiles
nothing the first one compiled (counted from JAX's compile log, not timed), the train step is not even traced (it is
stored, also where JAX's entry served it), a corrupt entry costs one warning and a compilation, and a cache folder
that cannot be written leaves the run without a cache and one warning."""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import child_env, recipe_command

ROOT = Path(__file__).resolve().parents[1]
STEP = "jit(_train_step)"


def env(cache: Path | str, **extra: str) -> dict[str, str]:
    """The child's environment with our cache setting instead of the session's JAX_COMPILATION_CACHE_DIR."""
    base = {k: v for k, v in child_env().items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    return base | {"LABRAM_JAX_CACHE": str(cache), "JAX_LOG_COMPILES": "1"} | extra


def compiled(stderr: str) -> tuple[list[str], list[str]]:
    """(programs compiled, programs loaded from the cache), by JAX's compile log."""
    lines = stderr.splitlines()
    started = [line.split("Compiling ", 1)[1].split(" ", 1)[0] for line in lines if "Compiling " in line]
    hits = [line for line in lines if "Persistent compilation cache hit" in line]
    return started, hits


@pytest.mark.xdist_group("recipe-reference")
def test_a_second_run_compiles_nothing_and_a_corrupt_entry_is_survived(synthetic, tmp_path):
    cache = tmp_path / "cache"

    def run(name: str, *sets: str) -> tuple[list[str], list[str], str]:
        done = subprocess.run(recipe_command(tmp_path / name, synthetic) + list(sets), env=env(cache),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return *compiled(done.stderr), done.stderr

    first, first_hits, _ = run("first")
    # Another seed: the step's program is the same (the seed draws its inputs), so the first run's stored step
    # serves it, not even traced, and every other program is loaded from JAX's entries.
    second, second_hits, _ = run("second", "train.seed=1")
    assert first and not first_hits  # an empty cache: everything compiled
    assert STEP in first and STEP not in second
    assert sorted(second) == sorted(p for p in first if p != STEP) and len(second_hits) == len(second)
    # A setting that changes the stored step's key but not its program (remat auto resolves to none here): the
    # step is traced and loaded from JAX's entry, and stored from it too (XLA's CPU backend cannot serialize an
    # executable it loaded from one).
    other, other_hits, _ = run("other", "runtime.remat=none")
    assert sorted(other) == sorted(first) and len(other_hits) == len(other)
    # Both stored steps refer to the one JAX entry of their program: the one the first run wrote.
    steps = list((cache / "steps").glob("*.step"))
    referred = {tuple(re.findall(rb"jit__train_step-[0-9a-f]{64}", p.read_bytes())) for p in steps}
    assert len(steps) == 2 and len(referred) == 1 and len(next(iter(referred))) == 1
    assert (cache / f"{next(iter(referred))[0].decode()}-cache").is_file()
    # the stored steps and the train step's XLA entry (the largest) cut short: a warning each, the step compiled
    # again, the run goes on
    for entry in (*steps, max(cache.glob("*-cache"), key=lambda p: p.stat().st_size)):
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    third, third_hits, stderr = run("third", "train.seed=2")
    assert stderr.count("did not load") == 1, stderr[-3000:]
    assert stderr.count("Error reading persistent compilation cache entry") == 1, stderr[-3000:]
    assert STEP in third and len(third) - len(third_hits) == 1


def test_the_stored_step_is_keyed_by_what_decides_its_program(tmp_path):
    """Two trainers of one experiment share a key, and so do runs that differ in settings the program does not
    read (NOT_IN_THE_STEP); a changed setting, model size or batch shape gives another."""
    from labram_jax import compile_cache, configs
    from labram_jax.train.config import DataConfig, Experiment, TrainConfig, override
    from labram_jax.train.trainer import Trainer

    exp = Experiment(stage="finetune", model=configs.tiny(num_classes=2),
                     data=DataConfig(train=("unused",), max_channels=3, max_patches=2),
                     train=TrainConfig(batch_size=8, steps=4, epochs=0, warmup_epochs=0, warmup_steps=1))
    key = lambda e: compile_cache.step_key(Trainer(e, tmp_path)._step_parts())
    same = key(exp)
    assert key(exp) == same
    start = Trainer(exp, tmp_path / "start").export("export")  # a checkpoint to start from
    assert key(override(exp, "train.seed=3", f"init={start}", "data.train=a,b", "data.val=v",
                        "data.workers=2", "train.log_every=1", "train.save_every=2", "train.eval_every=2",
                        "train.best_metric=val/loss")) == same
    changed = [exp.replace(train=dataclasses.replace(exp.train, lr=1e-3)), exp.replace(model=exp.model.replace(depth=1)),
               exp.replace(model=exp.model.replace(num_heads=1)), exp.replace(data=dataclasses.replace(exp.data, max_patches=3)),
               exp.replace(train=dataclasses.replace(exp.train, batch_size=16))]
    assert same not in {key(e) for e in changed} and len({key(e) for e in changed}) == len(changed)
    # A stored step is used only where it takes the state and batch as they are (Trainer._takes).
    trainer, other = Trainer(exp, tmp_path), Trainer(changed[-1], tmp_path)
    step = trainer.compiled_step()
    assert trainer._takes(step) and not other._takes(step)

def where(environment: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from labram_jax import compile_cache; print(compile_cache.enable())"],
                          env=environment, capture_output=True, text=True, timeout=120)


def test_where_the_cache_lives(tmp_path):
    plain = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "LABRAM_JAX_CACHE"))}
    plain |= {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    assert where(plain | {"XDG_CACHE_HOME": str(tmp_path / "xdg")}).stdout.strip() == str(tmp_path / "xdg" /
                                                                                          "labram-jax" / "xla")
    assert where(plain | {"HOME": str(tmp_path / "home")}).stdout.strip() == str(tmp_path / "home" / ".cache" /
                                                                                "labram-jax" / "xla")
    assert where(plain | {"LABRAM_JAX_CACHE": str(tmp_path / "mine")}).stdout.strip() == str(tmp_path / "mine")
    assert where(plain | {"LABRAM_JAX_CACHE": "off"}).stdout.strip() == "None"
    # JAX's own setting wins
    theirs = where(plain | {"LABRAM_JAX_CACHE": str(tmp_path / "mine"), "JAX_COMPILATION_CACHE_DIR": str(tmp_path)})
    assert theirs.stdout.strip() == str(tmp_path)
    # a folder that cannot be made (a file is in the way): no cache, one warning
    (tmp_path / "file").write_text("")
    blocked = where(plain | {"LABRAM_JAX_CACHE": str(tmp_path / "file" / "cache")})
    assert blocked.returncode == 0 and blocked.stdout.strip() == "None"
    assert blocked.stderr.count("warning: no compilation cache:") == 1 and "LABRAM_JAX_CACHE=DIR" in blocked.stderr

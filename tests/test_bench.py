"""The bench scripts import, and run: a script whose import broke (a function that moved) or whose code path rotted
fails here, not the day someone runs it."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import child_env

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_a_bench_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their peer.py helper
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)  # not as __main__: definitions only
    assert callable(getattr(module, "main", None)) or script == "peer.py", f"{script} has no main()"


# Scripts whose other side is the original: without --reference their smoke run says so (step_parts runs one side
# a process: its torch side, below, skips).
NEEDS_ORIGINAL = {"codebook_usage.py", "step_vs_pytorch.py", "train_vs_pytorch.py"}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py") if p.name != "peer.py"))
def test_a_bench_script_runs_its_smoke_mode(script, tmp_path):
    """Each script's --smoke: the same code path at tiny shapes, in seconds, with no checkout of the original
    (step_parts runs its JAX side; its torch side then skips)."""
    # step_parts' torch side runs below; train_vs_pytorch replays one recorded stage (test_train_vs_reference
    # replays them all) and step_vs_pytorch times the other
    args = {"step_parts.py": ["--side", "jax"], "train_vs_pytorch.py": ["--stages", "pretrain"],
            "step_vs_pytorch.py": ["--stages", "finetune"]}.get(script, [])
    run = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env=child_env())
    assert run.returncode == 0, f"{script} --smoke: exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    assert run.stdout.strip(), f"{script} --smoke printed nothing"
    if script in NEEDS_ORIGINAL:
        assert "no --reference: the original's" in run.stdout
    if script == "step_parts.py":
        torch_side = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--side", "torch"],
                                    cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert torch_side.returncode == 0 and torch_side.stdout.startswith("no --reference: the original's side is "
                                                                             "skipped"), torch_side.stderr[-2000:]

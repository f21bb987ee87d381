"""Time to the first logged step: a first run (empty compilation cache) and a second (the cache the first filled)
of our recipes, against the original's process start to the end of its first step, alternating, in one sitting.

    python bench/first_step.py --data EEGMAT_BUILD [--reference DIR --peer-python PY] [--pairs 1]
    python bench/first_step.py --smoke    # seconds: finetune_eegmat alone on the bundled sample, TINY, batch 4

Recipes: experiments/finetune_eegmat.py and experiments/pretrain_base.py at batch 32, on the windows of an EEGMAT
build (`labram build eegmat`; 20 channels x 5 s), pretraining against a fresh base tokenizer export. Each of our runs
is a new process with `LABRAM_JAX_CACHE` set to a folder of this sitting; the clock runs from its start until
metrics.jsonl holds its first row (train.log_every=1), then the run is killed. Per run it prints that time and the
programs compiled and loaded from the cache before then (JAX's compile log). The original's side is
bench/step_vs_pytorch.py's torch worker on the same batch shape: imports, model, optimizer and one step, without
data loading (the original's loaders read TUH pickles; ours read the build).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"finetune_eegmat": "finetune", "pretrain_base": "pretrain"}


def tokenizer_export(folder: Path) -> Path:
    """A fresh base tokenizer export for pretraining to draw its targets from."""
    sys.path.insert(0, str(ROOT))
    from flax import nnx

    from labram_jax import configs
    from labram_jax.checkpoint import save_model
    from labram_jax.models.vqnsp import VQNSP

    return save_model(VQNSP(configs.tokenizer_base(kmeans_init=False), rngs=nnx.Rngs(0)), folder / "tokenizer")


def ours(recipe: str, data: Path, cache: Path, workdir: Path, sets: list[str]) -> dict:
    """One run of the recipe until its first logged step: seconds from the process start, programs compiled."""
    shutil.rmtree(workdir, ignore_errors=True)
    log = workdir.parent / f"{workdir.name}.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    env |= {"LABRAM_JAX_CACHE": str(cache), "JAX_LOG_COMPILES": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "experiments" / f"{recipe}.py"), "--workdir", str(workdir), "--data",
               str(data), "--set", "train.log_every=1", *sets]
    metrics = workdir / "metrics.jsonl"
    tic = time.perf_counter()
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        while not (metrics.exists() and metrics.read_text().strip()):
            if process.poll() is not None:
                raise SystemExit(f"{recipe} ended (exit {process.returncode}) before its first logged step:\n"
                                 + log.read_text()[-3000:])
            time.sleep(0.05)
        seconds = time.perf_counter() - tic
        process.kill()
        process.wait()
    lines = log.read_text().splitlines()
    return {"first_step_s": seconds, "compiled": sum("Compiling " in line for line in lines),
            "cache_hits": sum("Persistent compilation cache hit" in line for line in lines)}


def original(stage: str, args: argparse.Namespace, batch: int, model: str) -> dict:
    command = [args.peer_python, str(ROOT / "bench" / "step_vs_pytorch.py"), "--worker", "torch", "--models", model,
               "--stages", stage, "--steps", "1", "--batch", str(batch), "--channels", "20", "--patches", "5",
               "--reference", args.reference]
    run = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if run.returncode:
        raise SystemExit(f"the original's {stage} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="an EEGMAT build (labram build eegmat)")
    parser.add_argument("--reference", help="a checkout of github 935963004/LaBraM (the original's side)")
    parser.add_argument("--peer-python", default=sys.executable, help="the interpreter that runs the original")
    parser.add_argument("--pairs", type=int, default=1, help="first and second runs per recipe")
    parser.add_argument("--smoke", action="store_true", help="a check of the script in seconds: "
                        "finetune_eegmat alone on the bundled sample, TINY sizes, batch 4")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="first_step_"))
    try:
        batch, model, sets, recipes = 32, "base", [], RECIPES
        if args.smoke:
            sys.path.insert(0, str(ROOT))
            from labram_jax.demo import build_sample
            from peer import TINY
            args.data = scratch / "eegmat"
            build_sample(args.data)
            batch, model, recipes = 4, "tiny", {"finetune_eegmat": RECIPES["finetune_eegmat"]}
            sets = [f"model.{key}={value}" for key, value in TINY.items()]
        if args.data is None:
            parser.error("--data is required (or --smoke)")
        if not args.reference:
            print("no --reference: the original's side is skipped")
        print(f"batch {batch}, {model}; {os.cpu_count()} CPUs", flush=True)
        for recipe, stage in recipes.items():
            extra = [f"train.batch_size={batch}", *sets]
            if stage == "pretrain":
                extra += [f"tokenizer_checkpoint={tokenizer_export(scratch)}"]
            for pair in range(args.pairs):
                cache = scratch / f"cache-{recipe}-{pair}"
                results = {}
                # the original between the two pairs' runs of ours: after them, then before them
                order = (["original"] if args.reference and pair % 2 else []) + ["first", "second"] + (
                    ["original"] if args.reference and not pair % 2 else [])
                for side in order:
                    if side == "original":
                        r = original(stage, args, batch, model)
                        results[side] = {"first_step_s": r["first_step_s"]}
                    else:
                        results[side] = ours(recipe, args.data, cache, scratch / f"run-{recipe}", extra)
                    r = results[side]
                    counts = f"  {r['compiled']} programs compiled, {r['cache_hits']} from the cache" \
                        if "compiled" in r else ""
                    print(f"{recipe:15s} pair {pair} {side:8s} first logged step after {r['first_step_s']:5.1f} s"
                          f"{counts}", flush=True)
                print(json.dumps({"recipe": recipe, "pair": pair, **results}), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Our train step against the original PyTorch code (935963004/LaBraM) on the same work, in one sitting.

    python bench/step_vs_pytorch.py --reference DIR [--peer-python PY] [--models base,large]
                                    [--stages finetune,pretrain] [--pairs 3] [--steps 5] [--batch 32]
    python bench/step_vs_pytorch.py --smoke [--reference DIR]   # seconds: TINY, batch 4, one pair of one step

Each measurement is its own process; the two sides alternate (and swap who goes first every pair), so both see
the same machine state and the printed ratios hold even where absolute CPU figures drift. Per side it prints
samples/s of warm steps, the time from process start to the end of the first step, and the peak host memory.

The same work on both sides: float32, train mode, batch [32, 23 channels, 10 patches, 200] (--batch, --channels,
--patches), AdamW with the original's parameter groups. Fine-tuning: one logit, BCE, drop path 0.1, layer decay 0.65. Pretraining: targets
from a frozen VQ-NSP tokenizer (its forward is part of the step), mask ratio 0.5, both passes, CE on each, clip
3.0. braindecode's `Labram` is timed too where it is installed (fine-tuning only: it has no pretraining model).

The original is imported at run time from the checkout at --reference (never copied into this project). Its
interpreter (--peer-python, default this one) needs torch 2.13.0 CPU, einops, pillow and timm 0.4.12 installed
with --no-deps; timm imports torchvision, which has no CPU wheel that loads here, so inert stand-in modules are
registered for it (the models never touch them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peer import import_original

BATCH, CHANNELS, PATCHES = 32, 23, 10  # --batch, --channels and --patches set them in the sitting and its workers
ROOT = Path(__file__).resolve().parents[1]
START = time.perf_counter()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def report(first_step_s: float, seconds: float, steps: int, extra: dict | None = None) -> None:
    print(json.dumps({"samples_per_s": steps * BATCH / seconds, "first_step_s": first_step_s,
                      "peak_rss_mib": peak_rss_mib(), **(extra or {})}))


# -- labram-jax ---------------------------------------------------------------------------------------------------
def jax_step(model: str, stage: str, channels: int = CHANNELS, patches: int = PATCHES, batch_size: int = BATCH,
             overrides: tuple[str, ...] = ()):
    """(trainer, batch) for one LaBraM size and stage, on the benchmark's batch (or another shape), with config
    `overrides` (`key=value`, as `labram train --set`) applied last."""
    sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]
    import jax
    import numpy as np
    from flax import nnx

    import finetune_tuab
    import pretrain_base
    from labram_jax import configs
    from labram_jax.checkpoint import save_model
    from labram_jax.models.vqnsp import VQNSP
    from labram_jax.train import launch
    from labram_jax.train.config import DataConfig, override
    from labram_jax.train.trainer import Trainer

    size = configs.SIZES[model]
    data = DataConfig(train=("unused",), max_channels=channels, max_patches=patches)
    if stage == "finetune":
        exp = finetune_tuab.config()
        exp = exp.replace(model=size(num_classes=1, drop_path_rate=0.1, init_values=0.1, qkv_bias=False))
    else:
        exp = pretrain_base.config(size())
        # A trained tokenizer's codebook is initialised; an untrained one would run k-means in every step's
        # tokenizer call (the original's side has quantize_kmeans_init=False).
        exp = exp.replace(tokenizer=exp.tokenizer.replace(kmeans_init=False))
        if model == "tiny":  # the TINY reference set's tokenizer and its vocabulary
            tokenizer = configs.tokenizer_tiny(kmeans_init=False)
            exp = exp.replace(model=exp.model.replace(vocab_size=tokenizer.codebook_size), tokenizer=tokenizer)
    exp = exp.replace(data=data, train=dataclasses.replace(exp.train, steps=1000, epochs=0, warmup_epochs=0,
                                                           warmup_steps=10, batch_size=batch_size))
    exp = override(exp, *overrides)
    launch.use_cores(exp)  # as `labram train` does, before anything touches a device
    if stage == "pretrain":
        tokenizer = save_model(VQNSP(exp.tokenizer, rngs=nnx.Rngs(0)), Path(tempfile.mkdtemp()) / "tokenizer")
        exp = exp.replace(tokenizer_checkpoint=str(tokenizer))
    trainer = Trainer(exp, tempfile.mkdtemp())
    batch = {k: np.zeros(v.shape, v.dtype) for k, v in trainer.abstract_batch().items()}
    batch["x"] = np.random.default_rng(0).normal(0, 0.2, batch["x"].shape).astype(np.float32)
    batch["input_chans"][:] = np.arange(channels + 1)
    batch["mask"][:] = True
    batch["valid"][:] = True
    batch["label"][:] = np.arange(batch_size) % 2
    return trainer, trainer.global_batch(batch)


def run_jax(model: str, stage: str, steps: int) -> None:
    import jax
    trainer, batch = jax_step(model, stage, CHANNELS, PATCHES, BATCH)
    # As a run does before its first step: runtime.remat auto picks what fits this host (one line when not none).
    trainer.fit_memory()
    plan = trainer.planned_bytes()
    rng = jax.random.key(0)
    step = trainer.compiled_step()
    state, metrics = step(trainer.state, batch, rng)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - START
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    tic = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, batch, jax.random.fold_in(rng, i))
    jax.block_until_ready(metrics)
    report(first, time.perf_counter() - tic, steps,
           {"loss": float(metrics["loss"]), "remat": trainer.exp.runtime.remat,
            "grad_accum": trainer.exp.train.grad_accum, "planned_gib": plan and plan[0] / 2 ** 30,
            "available_gib": plan and plan[1] / 2 ** 30})


# -- the original ---------------------------------------------------------------------------------------------------
def _reference_function(reference: str, file: str, name: str):
    """One function of the original's file, without importing the file (its utils import pulls h5py, pyhealth,
    sklearn and pandas, which the models never need)."""
    import ast

    import torch
    tree = ast.parse((Path(reference) / file).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), file, "exec"), namespace)
    return namespace[name]


def _reference_optimizer(model, depth: int, lr: float, betas, layer_decay: float | None):
    """The original's AdamW parameter groups (optim_factory.get_parameter_groups), as run_*.py build them."""
    import torch
    from optim_factory import LayerDecayValueAssigner, get_num_layer_for_vit, get_parameter_groups

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if layer_decay is None:
        groups = get_parameter_groups(model, 0.05, skip)
    else:
        assigner = LayerDecayValueAssigner([layer_decay ** (depth + 1 - i) for i in range(depth + 2)])
        groups = get_parameter_groups(model, 0.05, skip, lambda n: get_num_layer_for_vit(n, depth + 2),
                                      assigner.get_scale)
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale", 1.0)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def run_torch(model: str, stage: str, steps: int, reference: str, peer: str) -> None:
    import numpy as np
    import torch
    import_original(reference)
    import peer as builders
    depth = builders.DEPTH[model]
    torch.manual_seed(0)
    x = torch.from_numpy(np.random.default_rng(0).normal(0, 0.2, (BATCH, CHANNELS, PATCHES, 200))
                         .astype(np.float32))
    chans = list(range(CHANNELS + 1))
    if stage == "finetune" and peer == "braindecode":
        from braindecode.models import Labram
        import mne
        names = mne.channels.make_standard_montage("standard_1020").ch_names[:CHANNELS]
        net = Labram(n_chans=CHANNELS, n_outputs=1, n_times=PATCHES * 200, chs_info=[{"ch_name": n} for n in names],
                     drop_path=0.1, use_mean_pooling=True)
        net.train()
        opt = _reference_optimizer(net, 12, 5e-4, (0.9, 0.999), None)
        inputs = (x.reshape(BATCH, CHANNELS, PATCHES * 200),)
        step = _finetune_step(net, opt, inputs, torch)
    elif stage == "finetune":
        import modeling_finetune
        if model == "tiny":  # the TINY reference set's model (drop path off there): a check of the script only
            net = builders.finetune_model("tiny", 1)
        else:
            factory = getattr(modeling_finetune, f"labram_{model}_patch200_200")
            net = factory(num_classes=1, drop_path_rate=0.1, use_mean_pooling=True, init_values=0.1, qkv_bias=False,
                          use_abs_pos_emb=True, use_rel_pos_bias=False)
        net.train()
        opt = _reference_optimizer(net, depth, 5e-4, (0.9, 0.999), 0.65)
        step = _finetune_step(net, opt, (x, chans), torch)
    else:
        random_masking = _reference_function(reference, "engine_for_pretraining.py", "random_masking")
        vqnsp = builders.tokenizer("tiny" if model == "tiny" else "base").eval()
        net = builders.pretrain_model(model, vqnsp.quantize.num_tokens)
        net.train()
        opt = _reference_optimizer(net, depth, 5e-4, (0.9, 0.98), None)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            with torch.no_grad():
                ids = vqnsp.get_codebook_indices(x, chans)
            mask = random_masking(x.flatten(1, 2), mask_ratio=0.5)
            x_rec, x_rec_sym = net(x, chans, bool_masked_pos=mask)
            loss = loss_fn(x_rec, ids[mask]) + loss_fn(x_rec_sym, ids[~mask])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 3.0)
            opt.step()
            return loss
    step()
    first = time.perf_counter() - START
    step()
    tic = time.perf_counter()
    for _ in range(steps):
        loss = step()
    report(first, time.perf_counter() - tic, steps, {"loss": float(loss), "threads": torch.get_num_threads()})


def _finetune_step(net, opt, inputs, torch):
    loss_fn = torch.nn.BCEWithLogitsLoss()
    y = (torch.arange(BATCH) % 2).float()

    def step():
        logits = net(*inputs)
        loss = loss_fn(logits[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss
    return step


# -- the sitting ----------------------------------------------------------------------------------------------------
def measure(side: str, model: str, stage: str, args: argparse.Namespace) -> dict:
    python = sys.executable if side == "jax" else args.peer_python
    cmd = [python, __file__, "--worker", side, "--models", model, "--stages", stage, "--steps", str(args.steps),
           "--batch", str(args.batch), "--channels", str(args.channels), "--patches", str(args.patches)] + (
               ["--reference", args.reference] if args.reference else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if out.returncode == -9:  # what the kernel's OOM killer sends, without a word on stderr
        return {"error": "killed by SIGKILL (out of memory?)"}
    if out.returncode:
        lines = out.stderr.strip().splitlines() or [f"exit {out.returncode}"]
        print(out.stderr[-3000:], file=sys.stderr)
        return {"error": lines[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def peer_has_braindecode(python: str) -> bool:
    return subprocess.run([python, "-c", "import braindecode.models"], capture_output=True).returncode == 0


def main() -> None:
    global BATCH, CHANNELS, PATCHES  # the sitting's and its workers' batch shape
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", help="a checkout of github 935963004/LaBraM (without it, our side alone)")
    parser.add_argument("--peer-python", default=sys.executable,
                        help="the interpreter with torch, einops, timm 0.4.12 (default: this one)")
    parser.add_argument("--models", default="base,large", help="comma-separated: base, large, huge")
    parser.add_argument("--stages", default="finetune,pretrain", help="comma-separated: finetune, pretrain")
    parser.add_argument("--pairs", type=int, default=3, help="alternating pairs per model and stage")
    parser.add_argument("--steps", type=int, default=5, help="timed warm steps per process")
    parser.add_argument("--batch", type=int, default=BATCH, help="windows per step (the original's per-device "
                        "batch is 64 for pretraining and fine-tuning)")
    parser.add_argument("--channels", type=int, default=CHANNELS, help="channels per window")
    parser.add_argument("--patches", type=int, default=PATCHES, help="1-s patches per channel")
    parser.add_argument("--smoke", action="store_true", help="a check of the script in seconds: TINY, batch 4, "
                        "one pair of one step per stage; without --reference our side only")
    parser.add_argument("--worker", choices=("jax", "torch", "braindecode"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.models, args.pairs, args.steps, args.batch = "tiny", 1, 1, 4
    BATCH, CHANNELS, PATCHES = args.batch, args.channels, args.patches
    if args.worker == "jax":
        sys.path.insert(0, str(ROOT))
        from labram_jax.train.launch import rerun_with_huge_pages

        rerun_with_huge_pages()  # as `labram train` does
        return run_jax(args.models, args.stages, args.steps)
    if args.worker:
        return run_torch(args.models, args.stages, args.steps, args.reference, args.worker)
    if not args.reference:
        print("no --reference: the original's side is skipped")
    braindecode = bool(args.reference) and peer_has_braindecode(args.peer_python)
    print(f"machine: {os.cpu_count()} cores; batch [{BATCH}, {CHANNELS}, {PATCHES}, 200] float32; "
          f"{args.steps} warm steps per process; braindecode {'timed' if braindecode else 'not installed'}")
    for model in args.models.split(","):
        for stage in args.stages.split(","):
            peers = (["torch"] if args.reference else []) + (
                ["braindecode"] if braindecode and stage == "finetune" and model == "base" else [])
            ratios: dict[str, list[float]] = {p: [] for p in peers}
            for pair in range(args.pairs):
                order = ["jax", *peers] if pair % 2 == 0 else [*peers, "jax"]
                results = {}
                for side in order:  # each printed as it ends: a sitting of large models takes an hour
                    r = results[side] = measure(side, model, stage, args)
                    if "error" in r:
                        print(f"{model:5s} {stage:8s} pair {pair} {side:11s} failed: {r['error']}", flush=True)
                        continue
                    ran = (f"  remat {r['remat']}, {r['grad_accum']} micro-batch(es), planned "
                           f"{r['planned_gib']:.1f} of {r['available_gib']:.1f} GiB"
                           if side == "jax" and r.get("planned_gib") else "")
                    print(f"{model:5s} {stage:8s} pair {pair} {side:11s} {r['samples_per_s']:6.2f} samples/s  "
                          f"first step {r['first_step_s']:5.1f} s  peak {r['peak_rss_mib']:6.0f} MiB{ran}",
                          flush=True)
                for p in peers:
                    if "error" in results[p] or "error" in results["jax"]:
                        continue
                    ratios[p].append(results["jax"]["samples_per_s"] / results[p]["samples_per_s"])
                    print(f"{model:5s} {stage:8s} pair {pair} ratio jax/{p}: {ratios[p][-1]:.3f}", flush=True)
            for p in peers:
                if not ratios[p]:
                    continue
                print(f"{model:5s} {stage:8s} median ratio jax/{p}: {statistics.median(ratios[p]):.3f} "
                      f"(pairs {', '.join(f'{r:.3f}' for r in ratios[p])})", flush=True)


if __name__ == "__main__":
    main()

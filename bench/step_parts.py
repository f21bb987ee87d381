"""Single-thread CPU time of a fine-tuning step and of its parts, ours against the original's.

    python bench/step_parts.py --side jax [--parts step,block,embed,optim] [--reps 3]
    PEER_PY bench/step_parts.py --side torch --reference DIR
    python bench/step_parts.py --side jax --smoke    # seconds: TINY at batch 4, one rep (torch: with --reference)

Each side runs with one thread (the script sets it: XLA's flags and OMP_NUM_THREADS before JAX starts, and
torch.set_num_threads(1)) so that other jobs on the machine move wall time but not the CPU time of the process;
--threads 0 leaves each library its default threads (and labram-jax a CPU device per core, as `labram train`),
and then the CPU time includes what the threads spend waiting for each other.
It prints time.process_time per call, the median of --reps warm calls, for: the whole fine-tuning step of
bench/step_vs_pytorch.py (LaBraM-Base, [32, 23, 10, 200], drop path 0.1, layer decay 0.65), one Transformer block's
forward + backward on [32, 231, 200] (block 6, its drop path on; with the all-True key mask our step has), the
patch embedding's forward + backward, and the optimizer's update alone. What the parts leave of the step is the
rest: embeddings, the head and loss, the step's bookkeeping.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from peer import DEPTH

ROOT = Path(__file__).resolve().parents[1]
BATCH, CHANNELS, PATCHES = 32, 23, 10


def cpu_time(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        tic = time.process_time()
        fn()
        times.append(time.process_time() - tic)
    return statistics.median(times)


def jax_parts(parts: list[str], reps: int, size: str = "base", batch_size: int = BATCH) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "bench"))
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from step_vs_pytorch import jax_step
    trainer, batch = jax_step(size, "finetune", batch_size=batch_size)
    out: dict[str, float] = {}
    rng = jax.random.key(0)
    state = [trainer.state]
    train_step = trainer.compiled_step()

    def step():
        state[0], m = train_step(state[0], batch, rng)
        jax.block_until_ready(m)

    if "step" in parts:
        out["step"] = cpu_time(step, reps)
    model = trainer._merge(state[0], state[0]["params"], state[0]["rest"])
    if "block" in parts:
        block = model.blocks[len(model.blocks) // 2 - 1]
        graphdef, params = nnx.split(block)
        x = jax.random.normal(jax.random.key(1), (batch_size, 1 + CHANNELS * PATCHES, block.attn.qkv.in_features))
        mask = jnp.ones((batch_size, 1, 1, x.shape[1]), bool)

        @jax.jit
        def block_grad(params, x, rng):
            def f(params, x):
                return (nnx.merge(graphdef, params)(x, mask, rng) ** 2).sum()
            return jax.grad(f, argnums=(0, 1))(params, x)

        with jax.default_matmul_precision("highest"):
            out["block"] = cpu_time(lambda: jax.block_until_ready(block_grad(params, x, rng)), reps)
    if "embed" in parts:
        graphdef, params = nnx.split(model.patch_embed)
        x = batch["x"]
        padding = jnp.ones((batch_size, CHANNELS * PATCHES), bool)

        @jax.jit
        def embed_grad(params, x):
            return jax.grad(lambda p: (nnx.merge(graphdef, p)(x, padding) ** 2).sum())(params)

        out["embed"] = cpu_time(lambda: jax.block_until_ready(embed_grad(params, x)), reps)
    if "optim" in parts:
        params = state[0]["params"]
        grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

        @jax.jit
        def update(params, opt):
            updates, opt = trainer.tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt

        opt = state[0]["opt"]
        out["optim"] = cpu_time(lambda: jax.block_until_ready(update(params, opt)), reps)
    return out


def torch_parts(parts: list[str], reps: int, reference: str, threads: int, size: str = "base",
                batch_size: int = BATCH) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "bench"))
    import numpy as np
    import torch

    from peer import finetune_model, import_original
    from step_vs_pytorch import _finetune_step, _reference_optimizer
    if threads == 1:
        torch.set_num_threads(1)
    import_original(reference)
    import modeling_finetune
    torch.manual_seed(0)
    if size == "tiny":  # --smoke: the TINY reference set's model (drop path off there)
        net = finetune_model("tiny", 1)
    else:
        net = modeling_finetune.labram_base_patch200_200(num_classes=1, drop_path_rate=0.1, use_mean_pooling=True,
                                                         init_values=0.1, qkv_bias=False, use_abs_pos_emb=True,
                                                         use_rel_pos_bias=False)
    net.train()
    opt = _reference_optimizer(net, DEPTH[size], 5e-4, (0.9, 0.999), 0.65)
    x = torch.from_numpy(np.random.default_rng(0).normal(0, 0.2, (batch_size, CHANNELS, PATCHES, 200))
                         .astype(np.float32))
    out: dict[str, float] = {}
    if "step" in parts:
        out["step"] = cpu_time(_finetune_step(net, opt, (x, list(range(CHANNELS + 1))), torch), reps)
    if "block" in parts:
        block = net.blocks[len(net.blocks) // 2 - 1]
        h = torch.randn(batch_size, 1 + CHANNELS * PATCHES, block.attn.qkv.in_features, requires_grad=True)

        def block_grad():
            block.zero_grad()
            (block(h) ** 2).sum().backward()

        out["block"] = cpu_time(block_grad, reps)
    if "embed" in parts:
        def embed_grad():
            net.patch_embed.zero_grad()
            (net.patch_embed(x) ** 2).sum().backward()

        out["embed"] = cpu_time(embed_grad, reps)
    if "optim" in parts:
        for p in net.parameters():
            p.grad = torch.full_like(p, 1e-3)
        out["optim"] = cpu_time(opt.step, reps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", required=True, choices=("jax", "torch"))
    parser.add_argument("--reference", default="", help="a checkout of github 935963004/LaBraM (torch side)")
    parser.add_argument("--parts", default="step,block,embed,optim")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1, or 0 for each library's default (all cores)")
    parser.add_argument("--smoke", action="store_true", help="a check of the script in seconds: TINY at batch 4, "
                        "one rep; the torch side without --reference is skipped")
    args = parser.parse_args()
    size, batch_size = ("tiny", 4) if args.smoke else ("base", BATCH)
    if args.smoke:
        args.reps = 1
    if args.side == "torch" and not args.reference:
        if not args.smoke:
            parser.error("--side torch needs --reference")
        return print("no --reference: the original's side is skipped")
    if args.threads == 1:
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")  # one device on one thread (not one per core)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    parts = args.parts.split(",")
    if args.side == "jax":
        result = jax_parts(parts, args.reps, size, batch_size)
    else:
        result = torch_parts(parts, args.reps, args.reference, args.threads, size, batch_size)
    if "step" in result:
        result["rest"] = result["step"] - DEPTH[size] * result.get("block", 0) - result.get("embed", 0) \
            - result.get("optim", 0)
    print(f"{args.side}: " + "  ".join(f"{k} {v:.3f} s" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()

"""Codebook usage over tokenizer training on real EEG: the original's engine against ours, and ours with restarts.

    python bench/codebook_usage.py --shards DIR --out DIR --reference LABRAM --peer-python PY
        [--arms original,ours,restart,restart_farthest] [--steps 300] [--batch 32] [--every 30] [--set KEY=VALUE ...]
    python bench/codebook_usage.py --smoke [--reference LABRAM]    # seconds: the bundled sample, 2 steps

DIR is an EEGMAT build (`labram build eegmat`): the tokenizer trains on its train and val splits (subjects 00-31)
and is scored on its test split (32-35, never trained on). Every arm is the base tokenizer (8192 x 64 codebook,
k-means init on the first batch, EMA 0.99) on the same windows for the same steps and schedule (AdamW betas 0.9,
0.99, weight decay 1e-4, lr 5e-5 (the original's base lr) to 1e-5 on a cosine, 10% warmup), at the same batch size:
- `original`: the original's engine_for_vqnsp.train_one_epoch, over shuffled batches of the same windows;
- `ours`: `labram train train_tokenizer` with those settings;
- `restart`: ours with `tokenizer.dead_code_restart=30`, dead codes re-seeded from random patches of the batch;
- `restart_farthest`: the same, re-seeded from the batch's worst-quantised patches first;
- `restart_k10`, `restart_farthest_k10`, ...: the same with another K.
Each --set is applied to our arms after these (--set tokenizer.dead_code_restart=K to try another K).

Every `--every` steps each arm counts the codes of every training patch in eval mode (codebook_usage: the share of
the 8192 codes used; codebook_perplexity) and scores the held-out subjects (val/loss, val/rec_loss,
val/rec_angle_loss). Each arm writes OUT/ARM/metrics.jsonl; a rerun skips the arms that finished and resumes the
others (ours from its checkpoints, the original from its last scored step). Then OUT/usage.png (usage against step,
one curve an arm) and one JSON line per arm on stdout: its last usage, perplexity and held-out losses.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("original", "ours", "restart", "restart_farthest")
# Our arms by name: restart[_farthest][_kK], K (default 30) the updates a code may go unused before its restart.
ARM = re.compile(r"ours|(?P<restart>restart)(?P<farthest>_farthest)?(?:_k(?P<k>[1-9]\d*))?")
# --smoke: a one-block encoder and decoder with 64 codes, for a check of the script in seconds
SMOKE_TOKENIZER = ("tokenizer.encoder.depth=1", "tokenizer.decoder.depth=1", "tokenizer.codebook_size=64")
KEYS = ("codebook_usage", "codebook_perplexity", "val/loss", "val/rec_loss", "val/rec_angle_loss")


def schedule(steps: int, batch: int) -> dict[str, Any]:
    return dict(steps=steps, batch=batch, lr=5e-5, min_lr=1e-5, warmup_steps=steps // 10, weight_decay=1e-4,
                b1=0.9, b2=0.99, eps=1e-8)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def scored(path: Path) -> list[dict]:
    """The rows that hold a usage count, one per step (a resumed run may log a step twice: the last one holds)."""
    by_step = {r["step"]: r for r in rows(path) if "codebook_usage" in r}
    return [by_step[s] for s in sorted(by_step)]


# -- ours ---------------------------------------------------------------------------------------------------------
def run_ours(arm: str, shards: Path, out: Path, s: dict[str, Any], every: int, sets: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    from labram_jax.recipes import train_tokenizer
    from labram_jax.train.config import override
    from labram_jax.train.trainer import Trainer

    exp = train_tokenizer.config()
    assignments = [f"data.train={shards / 'train'},{shards / 'val'}", f"data.val={shards / 'test'}",
                   "data.max_channels=20", "data.max_patches=5", f"train.steps={s['steps']}", "train.epochs=0",
                   "train.warmup_epochs=0", f"train.batch_size={s['batch']}", f"train.lr={s['lr']}",
                   f"train.min_lr={s['min_lr']}", f"train.warmup_steps={s['warmup_steps']}",
                   f"train.eval_every={every}", f"train.save_every={every}", "train.log_every=10"]
    restart = ARM.fullmatch(arm)
    if restart.group("restart"):
        assignments.append(f"tokenizer.dead_code_restart={restart.group('k') or 30}")
    if restart.group("farthest"):
        assignments.append("tokenizer.dead_code_seeds=farthest")
    exp = override(exp, *assignments, *sets)
    assert (exp.train.weight_decay, exp.train.b1, exp.train.b2) == (s["weight_decay"], s["b1"], s["b2"])
    Trainer(exp, out).train()


# -- the original -------------------------------------------------------------------------------------------------
def windows(folder: Path) -> tuple[np.ndarray, list[str]]:
    """Every window of a split as the original's loaders give them, [N, channels, seconds * 200] in µV, and the
    channel names (the same for every EEGMAT window)."""
    sys.path.insert(0, str(ROOT))
    from labram_jax.channels import STANDARD_1020
    from labram_jax.data.pipeline import LoaderConfig, eval_dataset

    xs, rows_ = [], None
    for batch in eval_dataset({str(folder): [folder]}, LoaderConfig(batch_size=64, max_channels=20, max_patches=5)):
        valid = batch["valid"]
        assert batch["mask"][valid].all(), "EEGMAT windows fill the 20 x 5 grid"
        x = batch["x"][valid]
        xs.append((100 * x).reshape(len(x), x.shape[1], -1))  # back to µV: the original's engine divides by 100
        chans = batch["input_chans"][valid]
        assert rows_ is None or (chans == rows_).all()
        rows_ = chans[0]
    return np.concatenate(xs).astype(np.float32), [STANDARD_1020[r - 1] for r in rows_[1:]]


def run_original(shards: Path, out: Path, s: dict[str, Any], every: int, reference: str, peer: str) -> None:
    data = out / "windows.npz"
    if not data.exists():
        train, names = windows(shards / "train")
        extra, _ = windows(shards / "val")
        test, _ = windows(shards / "test")
        np.savez(out / "windows.tmp.npz", train=np.concatenate([train, extra]), test=test, names=np.array(names))
        os.replace(out / "windows.tmp.npz", data)
    spec = out / "spec.json"
    spec.write_text(json.dumps(dict(s, every=every, reference=reference)))
    subprocess.run([peer, __file__, "--worker", str(spec)], check=True,
                   env=dict(os.environ, PYTHONWARNINGS="ignore"))


def original_worker(spec_path: Path) -> None:
    """In the peer's interpreter: the original's engine `every` steps at a time (its epoch loop over a list of
    batches, the schedule indexed by the global step), then the pass over the training windows and the held-out
    score. The model, optimizer and step are saved after each scoring, so a rerun resumes there."""
    out = spec_path.parent
    s = json.loads(spec_path.read_text())
    sys.path.insert(0, str(ROOT / "bench"))
    import peer
    peer.import_original(s["reference"])
    import torch
    import engine_for_vqnsp
    import optim_factory
    import utils

    data = np.load(out / "windows.npz")
    train, test, names = data["train"], data["test"], [str(n) for n in data["names"]]
    torch.manual_seed(0)
    model = peer.tokenizer("base", 0.99, kmeans_init=True)
    args = argparse.Namespace(opt="adamw", opt_eps=s["eps"], opt_betas=[s["b1"], s["b2"]], lr=s["lr"],
                              weight_decay=s["weight_decay"], momentum=0.9)
    optimizer = optim_factory.create_optimizer(args, model)
    # Its scheduler honours warmup_steps only with warmup_epochs > 0 (bench/RESULTS.md, issue 32).
    warmup = dict(warmup_epochs=1, warmup_steps=s["warmup_steps"]) if s["warmup_steps"] else {}
    lr_schedule = utils.cosine_scheduler(s["lr"], s["min_lr"], 1, s["steps"], **warmup)
    start, state = 0, out / "state.pt"
    if state.exists():
        saved = torch.load(state, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start = saved["step"]
    chans = utils.get_input_chans(names)
    log = out / "metrics.jsonl"
    while start < s["steps"]:
        n = min(s["every"], s["steps"] - start)
        order = np.random.default_rng(start).permutation(len(train))
        picks = [order[i * s["batch"]:(i + 1) * s["batch"]] for i in range(n)]
        if len(picks[-1]) < s["batch"]:
            picks = [np.random.default_rng([start, i]).choice(len(train), s["batch"], replace=False)
                     for i in range(n)]
        batches = [torch.from_numpy(train[p]) for p in picks]
        scaler = peer.Recorder(utils.NativeScalerWithGradNormCount(), optimizer)
        engine_for_vqnsp.train_one_epoch(peer.Wrapped(model), [batches], optimizer, torch.device("cpu"), 0, scaler,
                                         clip_grad=None, start_steps=start, lr_schedule_values=lr_schedule,
                                         ch_names_list=[names])
        start += n
        row = {"step": start, "loss": float(np.mean(scaler.losses[-10:]))} | score(model, train, test, chans, torch)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": start},
                   out / "state.tmp.pt")
        os.replace(out / "state.tmp.pt", state)


def score(model: Any, train: np.ndarray, test: np.ndarray, chans: list[int], torch: Any) -> dict[str, float]:
    """Codes over every training patch, and the held-out losses, in eval mode (the original's quantizer then
    updates only its usage statistic, which training never reads)."""
    model.eval()
    counts = np.zeros(model.quantize.num_tokens, np.int64)
    sums = {"val/loss": 0.0, "val/rec_loss": 0.0, "val/rec_angle_loss": 0.0}  # window-weighted
    with torch.no_grad():
        for i in range(0, len(train), 64):
            x = torch.from_numpy(train[i:i + 64]) / 100
            tokens = model.get_codebook_indices(x.reshape(len(x), x.shape[1], -1, 200), chans)
            counts += np.bincount(tokens.reshape(-1).numpy(), minlength=counts.size)
        for i in range(0, len(test), 64):
            x = torch.from_numpy(test[i:i + 64]) / 100
            loss, log = model(x, input_chans=chans)
            for key, value in (("val/loss", loss), ("val/rec_loss", log["val/rec_loss"]),
                               ("val/rec_angle_loss", log["val/rec_angle_loss"])):
                sums[key] += float(value) * len(x)
    model.train()
    p = counts[counts > 0] / counts.sum()
    return {"codebook_usage": float((counts > 0).mean()), "codebook_perplexity": float(np.exp(-(p * np.log(p)).sum()))
            } | {k: v / len(test) for k, v in sums.items()}


# -- the figure ---------------------------------------------------------------------------------------------------
def plot(out: Path, arms: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in arms:
        r = scored(out / arm / "metrics.jsonl")
        ax.plot([x["step"] for x in r], [x["codebook_usage"] for x in r], marker="o", label=arm)
    ax.set_xlabel("step")
    ax.set_ylabel("share of the 8192 codes used\n(a pass over the training windows)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "usage.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--reference", help="a checkout of github 935963004/LaBraM (the original arm)")
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--every", type=int, default=30)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--smoke", action="store_true", help="a check of the script in seconds: the bundled sample "
                        "(subjects 00-01 train, 02 val, 03 test) in a scratch folder, 2 steps of a one-block tokenizer "
                        "with 64 codes; the original's arm only with --reference")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return original_worker(args.worker)
    if args.smoke:
        scratch = tempfile.TemporaryDirectory()
        sys.path.insert(0, str(ROOT))
        from labram_jax.demo import build_sample
        args.shards = Path(scratch.name) / "eegmat"
        build_sample(args.shards)
        args.out, args.steps, args.batch, args.every = Path(scratch.name) / "out", 2, 4, 2
        args.arms, args.set = "ours,original" if args.reference else "ours", [*SMOKE_TOKENIZER, *args.set]
        if not args.reference:
            print("no --reference: the original's arm is skipped")
    if args.shards is None or args.out is None:
        parser.error("--shards and --out are required")
    arms = args.arms.split(",")
    if unknown := [a for a in arms if a != "original" and not ARM.fullmatch(a)]:
        parser.error(f"--arms: unknown {unknown} (arms: {', '.join(ARMS)}, or restart[_farthest]_kK)")
    s = schedule(args.steps, args.batch)
    for arm in arms:
        out = args.out / arm
        out.mkdir(parents=True, exist_ok=True)
        done = scored(out / "metrics.jsonl")
        if done and done[-1]["step"] >= args.steps:
            continue
        if arm == "original":
            if not args.reference:
                parser.error("the original arm needs --reference")
            run_original(args.shards, out, s, args.every, args.reference, args.peer_python)
        else:
            run_ours(arm, args.shards, out, s, args.every, args.set)
    plot(args.out, arms)
    for arm in arms:
        last = scored(args.out / arm / "metrics.jsonl")[-1]
        print(json.dumps({"arm": arm, "step": last["step"]} | {k: last.get(k) for k in KEYS}), flush=True)


if __name__ == "__main__":
    main()

"""N optimizer steps of each training stage, ours against the original's engines, step by step.

    python bench/train_vs_pytorch.py --reference DIR --peer-python PY [--stages tokenizer,pretrain,finetune]
        [--model tiny|base|large] [--batch 4] [--channels 8] [--patches 4] [--steps 10] [--seed 0]
        [--classes 1] [--init DIR] [--set key=value ...] [--record DIR]
    python bench/train_vs_pytorch.py --smoke [--reference DIR --peer-python PY]    # seconds: 2 steps a stage

Both sides start from the same weights (the original's init, saved by the peer and read by our converter), see the
same batches and, in pretraining, the same masks (the original's `random_masking` draws them; our step takes its
`bool_masked_pos` from the batch). Drop path and dropout are off. Each side runs its real training code: the
peer calls the original's optimizer factory (`optim_factory.create_optimizer`, with run_class_finetuning.py's
layer-decay assigner), `utils.cosine_scheduler` and its engine's `train_one_epoch` (engine_for_vqnsp,
engine_for_pretraining, engine_for_finetuning) over the batches as one epoch; ours runs `Trainer`'s compiled train
step on the recipe's config (train_tokenizer, pretrain_base, finetune_tuab) with the settings applied.

One JSON line per stage on stdout; exit 1 when a stage misses the tolerance (1e-4 for both relative measures):
    {"stage": ..., "steps": N, "loss_max_rel": ..., "param_max_rel": ..., "lr_max_abs": ...}
loss_max_rel: the largest relative difference of the training loss over the steps; param_max_rel: the largest,
over tensors (the codebook and the quantizer's EMA buffers included), of |ours - original|_2 / |original|_2 after
the last step; lr_max_abs: the largest difference of the step's peak lr (the original's largest group lr). Tensors
the loss does not depend on (loss_invariant: the keys' LayerNorm bias; TINY's conv biases before a one-channel
GroupNorm) get roundoff gradients on both sides and are reported apart on stderr; so are the top differences.

--classes: the fine-tuning head, 1 = one logit with BCE (TUAB), more = softmax cross entropy with the recipe's label
smoothing (TUEV). --set takes the project's config keys, as `labram train --set` does (defaults: the stage's
recipe, warmup 2 steps): train.lr, train.min_lr, train.warmup_steps, train.weight_decay, train.clip_grad (none:
off), train.b1, train.b2, train.eps, tokenizer.decay (the codebook's EMA), train.layer_decay (fine-tuning; none:
off), train.label_smoothing (multi-class fine-tuning). A key of another stage is left to that stage. The schedule
spans the N steps, so warmup and the whole cosine are exercised.

--smoke: 2 steps of each stage at the defaults; without --reference our side replays, for each stage, the
tests/fixtures/train_trajectories/tiny_recipe run the original recorded, and is compared with it as above.

--record DIR writes the original's trajectory (spec.json, init weights, per-step losses, lrs and masks, final
weights) as a test vector for tests/test_train_vs_reference.py, which checks our loops against it without torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tokenizer", "pretrain", "finetune")
TOLERANCE = 1e-4
# Channel names in the original's standard_1020 spelling: TUH's 23, then further 10-10 positions.
CHANNELS = ("FP1 FP2 F3 F4 C3 C4 P3 P4 O1 O2 F7 F8 T3 T4 T5 T6 A1 A2 FZ CZ PZ T1 T2 FPZ AF7 AF3 AFZ AF4 AF8 F5 F1 F2 "
            "F6 FT7 FC5 FC3 FC1 FCZ FC2 FC4 FC6 FT8 C5 C1 C2 C6 TP7 CP5 CP3 CP1 CPZ CP2 CP4 CP6 TP8 P5 P1 P2 P6 PO7 "
            "PO3 POZ PO4 PO8 OZ").split()
# The settings both sides read, under the project's config keys (as `labram train --set` takes them) and the short
# names a Spec records them by; the stages each one applies to (the original's pretraining has no layer decay).
KEYS = {"train.lr": "lr", "train.min_lr": "min_lr", "train.warmup_steps": "warmup_steps",
        "train.weight_decay": "weight_decay", "train.clip_grad": "clip_grad", "train.b1": "b1", "train.b2": "b2",
        "train.eps": "eps", "tokenizer.decay": "ema_decay", "train.layer_decay": "layer_decay",
        "train.label_smoothing": "smoothing"}
ONLY = {"ema_decay": ("tokenizer",), "layer_decay": ("finetune",), "smoothing": ("finetune",)}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One stage's run: the shapes, the seed and every optimizer setting, resolved (both sides read this)."""
    stage: str
    model: str
    batch: int
    channels: int
    patches: int
    steps: int
    seed: int
    settings: dict[str, Any]
    init: str = ""  # a folder of the original's checkpoints to start from (tokenizer.pth, pretrain.pth, finetune.pth)

    @property
    def ch_names(self) -> list[str]:
        return list(CHANNELS[:self.channels])


def stage_settings(stage: str, classes: int, assignments: list[str]) -> dict[str, Any]:
    """The stage's optimizer settings: our recipe's (train_tokenizer, pretrain_base, finetune_tuab with `classes`
    outputs; warmup 2 steps), with the --set assignments applied by the project's own `override`. A key outside
    KEYS raises one line; one of another stage's (tokenizer.decay in fine-tuning) is left to that stage."""
    sys.path.insert(0, str(ROOT))
    from labram_jax.errors import UserError
    from labram_jax.recipes import finetune_tuab, pretrain_base, train_tokenizer
    from labram_jax.train.config import override

    if stage == "finetune":
        exp = finetune_tuab.config(num_classes=classes, task_kind="binary" if classes == 1 else "multiclass")
    else:
        exp = {"tokenizer": train_tokenizer, "pretrain": pretrain_base}[stage].config()
    exp = exp.replace(train=dataclasses.replace(exp.train, warmup_steps=2))
    mine = []
    for assignment in assignments:
        key = assignment.partition("=")[0]
        if key not in KEYS:
            raise SystemExit(f"--set {assignment!r}: the key must be one of {', '.join(KEYS)}")
        if stage in ONLY.get(KEYS[key], (stage,)):
            mine.append(assignment)
    try:
        exp = override(exp, *mine)
    except UserError as error:
        raise SystemExit(f"--set: {error}") from None
    settings = {name: getattr(getattr(exp, key.split(".")[0]), key.split(".")[1]) for key, name in KEYS.items()
                if stage in ONLY.get(name, (stage,))}
    return settings | ({"classes": classes} if stage == "finetune" else {})


def batches(spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """The run's batches, the same on both sides: signals in µV as the engines read them (they divide by 100), and
    integer labels. x float32 [steps, B, C, P * 200], labels int64 [steps, B]."""
    rng = np.random.default_rng(spec.seed)
    x = (100 * rng.standard_normal((spec.steps, spec.batch, spec.channels, spec.patches * 200))).astype(np.float32)
    classes = max(int(spec.settings.get("classes") or 2), 2)
    labels = rng.integers(0, classes, (spec.steps, spec.batch))
    return x, labels


def batches_digest(spec: Spec) -> str:
    x, labels = batches(spec)
    return hashlib.sha256(x.tobytes() + labels.astype(np.int64).tobytes()).hexdigest()


# -- the original -------------------------------------------------------------------------------------------------
def start_from(model: Any, folder: str, stage: str) -> Any:
    """`model` with the weights of FOLDER/STAGE.pth where a folder is given; a fine-tuning head of another width
    stays as the model initialised it, as run_class_finetuning.py drops it."""
    if not folder:
        return model
    import torch
    weights = torch.load(Path(folder) / f"{stage}.pth", map_location="cpu", weights_only=True)["model"]
    own = model.state_dict()
    fresh = [k for k in weights if k.startswith("head.") and weights[k].shape != own[k].shape]
    missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if k not in fresh}, strict=False)
    if unexpected or set(missing) != set(fresh):
        raise SystemExit(f"{folder}/{stage}.pth does not fit the {stage} model: missing {missing}, unexpected "
                         f"{unexpected}")
    return model


def run_original(spec: Spec, reference: str, out: Path) -> None:
    """The peer's side: the original's init saved as init.pth (and the tokenizer as tokenizer.pth), then its
    engine over the batches; per-step losses, lrs and masks and the final weights in trajectory.npz."""
    sys.path.insert(0, str(ROOT / "bench"))
    import peer
    peer.import_original(reference)
    import torch
    import engine_for_finetuning
    import engine_for_pretraining
    import engine_for_vqnsp
    import optim_factory
    import utils

    s = spec.settings
    x, labels = batches(spec)
    data = [torch.from_numpy(b) for b in x]
    torch.manual_seed(spec.seed)
    if spec.stage == "tokenizer":
        model = peer.tokenizer(spec.model, s["ema_decay"])
    elif spec.stage == "pretrain":
        vqnsp = start_from(peer.tokenizer(spec.model), spec.init, "tokenizer").eval()
        torch.save({"model": vqnsp.state_dict()}, out / "tokenizer.pth")
        model = peer.pretrain_model(spec.model, vqnsp.quantize.num_tokens)
    else:
        model = peer.finetune_model(spec.model, s["classes"])
    model = start_from(model, spec.init, spec.stage)
    torch.save({"model": model.state_dict()}, out / "init.pth")

    args = argparse.Namespace(opt="adamw", opt_eps=s["eps"], opt_betas=[s["b1"], s["b2"]], lr=s["lr"],
                              weight_decay=s["weight_decay"], momentum=0.9, gradient_accumulation_steps=1,
                              distributed=False)
    if spec.stage == "finetune" and s["layer_decay"] is not None and s["layer_decay"] < 1.0:
        depth = model.get_num_layers()  # run_class_finetuning.py's assigner
        assigner = optim_factory.LayerDecayValueAssigner([s["layer_decay"] ** (depth + 1 - i)
                                                          for i in range(depth + 2)])
        optimizer = optim_factory.create_optimizer(args, model, skip_list=model.no_weight_decay(),
                                                   get_num_layer=assigner.get_layer_id,
                                                   get_layer_scale=assigner.get_scale)
    elif spec.stage == "finetune":
        optimizer = optim_factory.create_optimizer(args, model, skip_list=model.no_weight_decay())
    else:
        optimizer = optim_factory.create_optimizer(args, model)
    # The original's scheduler applies warmup_steps only when warmup_epochs > 0.
    warmup = dict(warmup_epochs=1, warmup_steps=s["warmup_steps"]) if s["warmup_steps"] else {}
    lr_schedule = utils.cosine_scheduler(s["lr"], s["min_lr"], 1, spec.steps, **warmup)
    wd_schedule = utils.cosine_scheduler(s["weight_decay"], s["weight_decay"], 1, spec.steps)
    scaler = peer.Recorder(utils.NativeScalerWithGradNormCount(), optimizer)
    masks = []
    common = dict(device=torch.device("cpu"), epoch=0, loss_scaler=scaler, log_writer=None, start_steps=0,
                  lr_schedule_values=lr_schedule)
    if spec.stage == "tokenizer":
        engine_for_vqnsp.train_one_epoch(peer.Wrapped(model), [data], optimizer, clip_grad=s["clip_grad"],
                                         lr_scheduler=None, ch_names_list=[spec.ch_names], **common)
    elif spec.stage == "pretrain":
        draw = engine_for_pretraining.random_masking

        def recorded(*a: Any, **k: Any) -> Any:
            masks.append(draw(*a, **k))
            return masks[-1]
        engine_for_pretraining.random_masking = recorded
        engine_for_pretraining.train_one_epoch(model, vqnsp, [data], optimizer, max_norm=s["clip_grad"],
                                               lr_scheduler=None, wd_schedule_values=wd_schedule,
                                               ch_names_list=[spec.ch_names], args=args, **common)
    else:
        binary = s["classes"] == 1
        if binary:
            criterion = torch.nn.BCEWithLogitsLoss()
        elif s["smoothing"] > 0:
            from timm.loss import LabelSmoothingCrossEntropy
            criterion = LabelSmoothingCrossEntropy(smoothing=s["smoothing"])
        else:
            criterion = torch.nn.CrossEntropyLoss()
        loader = [(b, torch.from_numpy(y)) for b, y in zip(data, labels)]
        engine_for_finetuning.train_one_epoch(model, criterion, loader, optimizer, max_norm=s["clip_grad"],
                                              model_ema=None, wd_schedule_values=wd_schedule,
                                              num_training_steps_per_epoch=spec.steps, update_freq=1,
                                              ch_names=spec.ch_names, is_binary=binary, **common)
    final = {f"final/{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    extra = {"masks": torch.stack(masks).numpy()} if masks else {}
    np.savez(out / "trajectory.npz", loss=np.array(scaler.losses), lr=np.array(scaler.lrs), **extra, **final)


# -- labram-jax -----------------------------------------------------------------------------------------------------
def experiment(spec: Spec, init: Path, tokenizer: Path | None) -> Any:
    """Our recipe for the stage at the spec's size, shapes and settings, starting from the peer's weights."""
    sys.path.insert(0, str(ROOT))
    from labram_jax import configs
    from labram_jax.recipes import finetune_tuab, pretrain_base, train_tokenizer
    from labram_jax.train.config import DataConfig

    s = spec.settings
    size = configs.SIZES[spec.model]
    if spec.stage == "tokenizer":
        exp = train_tokenizer.config()
        tok = configs.tokenizer_tiny() if spec.model == "tiny" else configs.tokenizer_base()
        exp = exp.replace(tokenizer=tok.replace(kmeans_init=False, decay=s["ema_decay"]))
    elif spec.stage == "pretrain":
        exp = pretrain_base.config(size())
        exp = exp.replace(model=exp.model.replace(vocab_size=512 if spec.model == "tiny" else 8192),
                          tokenizer_checkpoint=str(tokenizer))
    else:
        kind = "binary" if s["classes"] == 1 else "multiclass"
        exp = finetune_tuab.config(num_classes=s["classes"], task_kind=kind)
        exp = exp.replace(model=size(num_classes=s["classes"], drop_path_rate=0.0, init_values=0.1, qkv_bias=False))
    train = dataclasses.replace(
        exp.train, steps=spec.steps, epochs=0, warmup_epochs=0, batch_size=spec.batch, seed=spec.seed,
        lr=s["lr"], min_lr=s["min_lr"], warmup_steps=s["warmup_steps"], weight_decay=s["weight_decay"],
        clip_grad=s["clip_grad"], b1=s["b1"], b2=s["b2"], eps=s["eps"],
        layer_decay=s.get("layer_decay"), label_smoothing=s.get("smoothing") or 0.0)
    data = DataConfig(train=("unused",), max_channels=spec.channels, max_patches=spec.patches)
    return exp.replace(train=train, data=data, init=str(init),
                       runtime=dataclasses.replace(exp.runtime, precision="float32"))


def run_ours(spec: Spec, init: Path, tokenizer: Path | None, masks: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Our Trainer's train step over the spec's batches: per-step losses and lrs, and the final weights under the
    original's state-dict names."""
    import jax
    sys.path.insert(0, str(ROOT))
    from labram_jax.channels import channel_row
    from labram_jax.convert import state_dict
    from labram_jax.train.trainer import Trainer

    exp = experiment(spec, init, tokenizer)
    workdir = tempfile.mkdtemp(prefix="train_vs_pytorch_")
    try:
        trainer = Trainer(exp, workdir, devices=jax.devices()[:1])  # the batch need not split over devices
        x, labels = batches(spec)
        rows = np.array([channel_row(name) for name in spec.ch_names], np.int32)
        b, c, p = spec.batch, spec.channels, spec.patches
        fixed = {"input_chans": np.tile(np.concatenate([[0], rows]), (b, 1)).astype(np.int32),
                 "mask": np.ones((b, c, p), bool), "token_channels": np.tile(np.repeat(rows, p), (b, 1)),
                 "token_times": np.tile(np.tile(np.arange(p, dtype=np.int32), c), (b, 1)),
                 "dataset": np.zeros(b, np.int32), "valid": np.ones(b, bool)}
        losses, lrs = [], []
        step = None
        for i in range(spec.steps):
            batch = dict(fixed, x=(x[i] / np.float32(100)).reshape(b, c, p, 200), label=labels[i].astype(np.int32),
                         target=labels[i].astype(np.float32))
            if masks is not None:
                batch["bool_masked_pos"] = masks[i]
            step = step or trainer.compiled_step(batch)
            trainer.state, metrics = step(trainer.state, trainer.global_batch(batch), jax.random.key(spec.seed))
            losses.append(float(metrics["loss"]))
            lrs.append(float(metrics["lr"]))
        final = {k: np.asarray(v) for k, v in state_dict(trainer.model()).items()}
        return np.array(losses), np.array(lrs), final
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def rel(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    norm = np.linalg.norm(ref)
    return float(np.linalg.norm(ours - ref) / norm if norm else np.linalg.norm(ours - ref))


def loss_invariant(name: str, model: str) -> bool:
    """Whether the loss does not depend on the tensor at all. Its gradient is then roundoff on both sides, which
    Adam's normalisation turns into steps of up to the lr in random directions, so no two implementations can
    agree on its trajectory; such tensors are reported apart, not in param_max_rel.
    - `attn.k_norm.bias` adds one vector to every key, i.e. one constant to all the scores of a query, which the
      softmax drops;
    - in TINY, TemporalConv's GroupNorm(4, 4) has one channel per group and so removes any per-channel constant,
      the bias of the conv before it included (in the paper's sizes a group has two or more channels)."""
    return name.endswith("attn.k_norm.bias") or (model == "tiny" and re.search(r"patch_embed\.conv\d\.bias$", name)
                                                  is not None)


def compare(spec: Spec, trajectory: dict[str, np.ndarray], ours: tuple) -> dict[str, Any]:
    """The stage's JSON line; a tensor on one side only is an error naming it."""
    losses, lrs, final = ours
    theirs = {k[len("final/"):]: v for k, v in trajectory.items() if k.startswith("final/")}
    if set(theirs) != set(final):
        raise SystemExit(f"{spec.stage}: state dicts differ: only the original has {sorted(set(theirs) - set(final))}, "
                         f"only ours {sorted(set(final) - set(theirs))}")
    loss_rel = np.abs(losses - trajectory["loss"]) / np.abs(trajectory["loss"])
    compared = [k for k in theirs if not loss_invariant(k, spec.model)]
    ranked = sorted(compared, key=lambda k: -rel(final[k], theirs[k]))
    print(f"{spec.stage}: losses (original) {np.array2string(trajectory['loss'], precision=5)}", file=sys.stderr)
    for k in ranked[:3]:
        print(f"  {k}: rel {rel(final[k], theirs[k]):.3g}", file=sys.stderr)
    invariant = sorted(set(theirs) - set(compared))
    if invariant:
        drift = max(float(np.abs(final[k] - theirs[k]).max()) for k in invariant)
        print(f"  not compared, the loss does not depend on them: {len(invariant)} tensors "
              f"({', '.join(invariant[:3])}{', ...' if len(invariant) > 3 else ''}); largest difference {drift:.3g}",
              file=sys.stderr)
    return {"stage": spec.stage, "steps": spec.steps, "loss_max_rel": float(loss_rel.max()),
            "param_max_rel": rel(final[ranked[0]], theirs[ranked[0]]),
            "lr_max_abs": float(np.abs(lrs - trajectory["lr"]).max())}


def passed(line: dict[str, Any]) -> bool:
    return line["loss_max_rel"] <= TOLERANCE and line["param_max_rel"] <= TOLERANCE


def same_weights(a: Path, b: Path) -> bool:
    sys.path.insert(0, str(ROOT))
    from labram_jax.convert.pth import read_pth
    x, y = read_pth(a)["model"], read_pth(b)["model"]
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def record(spec: Spec, work: Path, into: Path) -> None:
    """The peer's run as a test vector: spec.json (with the batches' digest), its init weights and trajectory."""
    into.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "trajectory.npz", into / "trajectory.npz")
    init = Path(spec.init).resolve() if spec.init else None
    for name, source in (("init.pth", f"{spec.stage}.pth"), ("tokenizer.pth", "tokenizer.pth")):
        # A start that is a file of --init is named, not copied (the test vectors then stay small).
        if (work / name).exists() and not (init and same_weights(init / source, work / name)):
            shutil.copy(work / name, into / name)
    if init and init.is_relative_to(ROOT):
        spec = dataclasses.replace(spec, init=str(init.relative_to(ROOT)))
    (into / "spec.json").write_text(json.dumps(dataclasses.asdict(spec) | {"batches_sha256": batches_digest(spec)},
                                               indent=1) + "\n")


def replay(run: Path) -> tuple[Spec, dict[str, Any]]:
    """Our side of one run the original recorded (`--record`), from its weights on its batches: the spec and the
    comparison's JSON line. The batches must still be the recorded ones (numpy's generator makes them)."""
    raw = json.loads((run / "spec.json").read_text())
    digest = raw.pop("batches_sha256")
    spec = Spec(**raw)
    if batches_digest(spec) != digest:
        raise SystemExit(f"{run}: numpy's generator no longer makes the recorded batches")
    trajectory = dict(np.load(run / "trajectory.npz"))
    start = run / "init.pth" if (run / "init.pth").exists() else ROOT / spec.init / f"{spec.stage}.pth"
    tokenizer = None
    if spec.stage == "pretrain":
        tokenizer = run / "tokenizer.pth" if (run / "tokenizer.pth").exists() else ROOT / spec.init / "tokenizer.pth"
    return spec, compare(spec, trajectory, run_ours(spec, start, tokenizer, trajectory.get("masks")))


def replay_recorded(stages: list[str]) -> None:
    """--smoke without the original: each stage against its tiny_recipe recording; exit 1 when one misses."""
    failed = False
    for stage in stages:
        _, line = replay(ROOT / "tests" / "fixtures" / "train_trajectories" / "tiny_recipe" / stage)
        print(json.dumps(line), flush=True)
        failed |= not passed(line)
    sys.exit(1 if failed else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", help="a checkout of github 935963004/LaBraM (required but with --smoke)")
    parser.add_argument("--peer-python", default=sys.executable, help="the interpreter that runs the original")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--model", default="tiny", choices=("tiny", "base", "large"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--patches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int, default=1,
                        help="fine-tuning outputs: 1 = one logit with BCE, more = softmax with cross entropy and the "
                        "recipe's label smoothing")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=", ".join(KEYS))
    parser.add_argument("--init", default="", help="start from the original's checkpoints in this folder "
                        "(tokenizer.pth, pretrain.pth, finetune.pth, as a reference set), not from a fresh init")
    parser.add_argument("--record", type=Path, help="write each stage's original trajectory here (DIR/STAGE)")
    parser.add_argument("--smoke", action="store_true", help="a check of the script in seconds: 2 steps a stage; "
                        "without --reference, against the original's recorded runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the peer's side: a spec file
    args = parser.parse_args()
    if args.worker:
        spec = Spec(**json.loads(Path(args.worker).read_text()))
        return run_original(spec, args.reference, Path(args.worker).parent)
    if args.smoke:
        args.steps = 2
        if not args.reference:
            print("no --reference: the original's side is its recorded runs (tests/fixtures/train_trajectories)")
            return replay_recorded(args.stages.split(","))
    if not args.reference:
        parser.error("--reference is required (or --smoke)")
    if not 1 <= args.channels <= len(CHANNELS):
        raise SystemExit(f"--channels {args.channels}: 1 to {len(CHANNELS)}")
    if args.classes < 1:
        raise SystemExit(f"--classes {args.classes}: 1 (binary) or more")
    failed = False
    for stage in args.stages.split(","):
        if stage not in STAGES:
            raise SystemExit(f"--stages: {stage!r} is not one of {', '.join(STAGES)}")
        spec = Spec(stage, args.model, args.batch, args.channels, args.patches, args.steps, args.seed,
                    stage_settings(stage, args.classes, args.set), str(Path(args.init).resolve()) if args.init else "")
        work = Path(tempfile.mkdtemp(prefix=f"original_{stage}_"))
        try:
            (work / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
            run = subprocess.run([args.peer_python, __file__, "--reference", args.reference,
                                  "--worker", str(work / "spec.json")], capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if run.returncode:
                raise SystemExit(f"the original's {stage} run failed:\n{run.stderr[-4000:]}")
            trajectory = dict(np.load(work / "trajectory.npz"))
            tokenizer = work / "tokenizer.pth" if stage == "pretrain" else None
            ours = run_ours(spec, work / "init.pth", tokenizer, trajectory.get("masks"))
            line = compare(spec, trajectory, ours)
            print(json.dumps(line), flush=True)
            failed |= not passed(line)
            if args.record:
                record(spec, work, args.record / stage)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""Does pretraining help? LaBraM's central claim on PhysioNet EEGMAT (rest vs mental arithmetic), in one command.

    python experiments/pretraining_benefit.py --data DIR --workdir W [--test-subjects 32,33,34,35]
        [--val-subjects 28,29,30,31] [--seeds 0,1,2,3,4] [--model tiny|base] [--quick] [--set STAGE.KEY=VALUE ...]

1. The tokenizer, then masked pretraining, on the unlabelled EEG of every subject that is not a test subject
   (training and validation subjects; overlapping windows, as unlabelled EEG can be cut anywhere).
2. The finetune_eegmat recipe from the pretrained weights and from scratch, at the same budget, once per seed;
   each run keeps the checkpoint of its best validation AUROC and is scored on the test subjects with it.
3. WORKDIR/summary.json (the fields below), WORKDIR/pretraining_benefit.png (each arm's per-seed test metrics and
   validation curves), and one line per arm on stdout.

DIR holds the raw EDFs (SubjectNN_1.edf rest, SubjectNN_2.edf task); the default split is CBraMod's (train 00-27,
val 28-31, test 32-35), and subjects found in DIR that are in neither list train. `--set tokenizer.train.steps=20`
(stages: tokenizer, pretrain, finetune) changes one stage's experiment. A rerun resumes where it stopped: a stage
or a seed that finished is not run again, one that was stopped resumes from its checkpoint. SIGTERM or SIGINT
saves and exits 75, as `labram train`; a rerun with other flags than the first stops with exit 2.

summary.json: {"test_subjects", "val_subjects", "train_subjects", "seeds", "model", "quick",
"pretraining_hours" (EEG the pretraining saw), "wall_hours" (the stages' wall times summed, each as the run that
finished it measured it: a stage stopped and resumed counts its resumed part), "tokenizer": {"codebook_usage",
"codebook_perplexity"} (a pass of the pretraining windows), "pretraining": {"masked_accuracy"} (last logged),
"arms": {"pretrained"|"scratch": {"balanced_accuracy"|"roc_auc"|"pr_auc": {"mean", "std", "per_seed"}}},
"stage_hours": {...}}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from data_prep.builders.eegmat import FILE_NAME
from labram_jax import configs
from labram_jax.errors import UserError
from labram_jax.files import write_json
from labram_jax.recipes import finetune_eegmat, pretrain_base, train_tokenizer
from labram_jax.train.config import DataConfig, Experiment, override
from labram_jax.train.launch import parse_seeds
from labram_jax.train.metrics import mean_std

CBRAMOD_TEST, CBRAMOD_VAL = "32,33,34,35", "28,29,30,31"
SECONDS = 5
PRETRAIN_STRIDE = 1  # seconds between the starts of pretraining windows
LABELLED, UNLABELLED = Path("data", "labelled"), Path("data", "unlabelled")  # the builds, in the workdir
ARMS = ("pretrained", "scratch")
METRICS = ("balanced_accuracy", "roc_auc", "pr_auc")
STAGES = ("tokenizer", "pretrain", "finetune")
# The model sizes: the fine-tuning model, the tokenizer, the codebook. tiny is the demo's (2 blocks, 100 wide),
# which trains the whole study on 2 CPU cores; base is the paper's LaBraM-Base, for accelerators.
MODELS = {"tiny": (configs.tiny, configs.tokenizer_tiny, 256), "base": (configs.base, configs.tokenizer_base, 8192)}
BATCH = 64
# Steps of the tokenizer and of pretraining, and fine-tuning epochs, per budget. At batch 64 the tiny model's
# masked-token accuracy stays near 6% for the first 700 pretraining steps, then climbs (12% by 1,500): a quick study
# that stops before then compares scratch with a model that has not yet learnt. Fine-tuning from scratch picks
# its best validation AUROC late: 50 epochs against 30 lift its validation balanced accuracy (subjects 28-31 only;
# bench/RESULTS.md, "Does pretraining help?").
BUDGETS = {"default": (1000, 3000, 50), "quick": (300, 1500, 10)}


def experiments(model: str, quick: bool, workdir: Path) -> dict[str, Experiment]:
    """The study's three stages; fine-tuning is the finetune_eegmat recipe at the model's size and the budget's
    epochs, from scratch (`init` is set for the pretrained arm)."""
    transformer, tokenizer, codes = MODELS[model]
    labelled, unlabelled = workdir / LABELLED, workdir / UNLABELLED
    tokenizer_steps, pretrain_steps, epochs = BUDGETS["quick" if quick else "default"]
    shapes = dict(max_channels=20, max_patches=SECONDS)
    unlabelled_data = DataConfig(train=(str(unlabelled / "train"),), **shapes)
    recipe = finetune_eegmat.config()
    pretrain = pretrain_base.config(transformer())
    pretrain = pretrain.replace(model=pretrain.model.replace(vocab_size=codes))
    token = train_tokenizer.config()
    return {
        # dead_code_restart: without it the codebook collapses onto a few codes on a corpus this small
        # (bench/RESULTS.md, "Codebook usage"); the lr is the original's base lr at this batch, unscaled, as the demo.
        "tokenizer": token.replace(
            tokenizer=tokenizer(codebook_size=codes, dead_code_restart=10), data=unlabelled_data,
            train=dataclasses.replace(token.train, epochs=0.0, warmup_epochs=0.0, steps=tokenizer_steps,
                                      batch_size=BATCH, lr=5e-5, log_every=50, save_every=500)),
        # tiny: the demo's lr for a small model at batch 64 (1e-3); base: the recipe's 5e-4, which the original
        # does not scale with the batch.
        "pretrain": pretrain.replace(
            tokenizer=tokenizer(codebook_size=codes), tokenizer_checkpoint=str(workdir / "tokenizer" / "export"),
            data=unlabelled_data,
            train=dataclasses.replace(pretrain.train, epochs=0.0, warmup_epochs=0.0, steps=pretrain_steps,
                                      batch_size=BATCH, lr=1e-3 if model == "tiny" else pretrain.train.lr,
                                      log_every=50, save_every=500)),
        "finetune": recipe.replace(
            model=transformer(**{k: getattr(recipe.model, k) for k in ("num_classes", "drop_path_rate", "init_values",
                                                                        "qkv_bias")}),
            data=DataConfig(train=(str(labelled / "train"),), val=(str(labelled / "val"),),
                            test=(str(labelled / "test"),), **shapes),
            # no periodic checkpoint: a run lasts minutes, a kill loses at most it, and SIGTERM still saves
            train=dataclasses.replace(recipe.train, epochs=epochs, save_every=10**9)),
    }


def _subjects(text: str, flag: str) -> list[int]:
    try:
        return sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of subject numbers") from None


def _found_subjects(data: Path) -> list[int]:
    found = sorted({int(m[1]) for p in data.glob("*.edf") if (m := FILE_NAME.match(p.name))})
    if not found:
        raise UserError(f"--data {data}: no EEGMAT recordings (SubjectNN_1.edf, SubjectNN_2.edf)")
    return found


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, metavar="DIR", help="the raw EEGMAT EDFs (SubjectNN_1.edf, _2.edf)")
    p.add_argument("--workdir", required=True, metavar="DIR", help="everything the study writes; a rerun resumes")
    p.add_argument("--test-subjects", default=CBRAMOD_TEST, metavar="N,N,...",
                   help=f"never seen before the test (default: CBraMod's, {CBRAMOD_TEST})")
    p.add_argument("--val-subjects", default=CBRAMOD_VAL, metavar="N,N,...",
                   help=f"pick each fine-tuning run's checkpoint (default: CBraMod's, {CBRAMOD_VAL})")
    p.add_argument("--seeds", default="0,1,2,3,4", metavar="S,S,...", help="fine-tuning seeds (default: 0-4)")
    p.add_argument("--model", choices=tuple(MODELS), default="tiny",
                   help="tiny (2 blocks, 100 wide; CPUs) or base (LaBraM-Base; accelerators) (default: tiny)")
    p.add_argument("--quick", action="store_true", help=f"short budgets: tokenizer, pretraining steps and "
                                                        f"fine-tuning epochs {BUDGETS['quick']} instead of "
                                                        f"{BUDGETS['default']}")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one stage's experiment, e.g. pretrain.train.steps=100 finetune.train.lr=1e-3")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Study:
    workdir: Path
    data: Path
    train: list[int]
    val: list[int]
    test: list[int]
    seeds: list[int]
    stages: dict[str, Experiment]
    args: dict


def plan(args: argparse.Namespace) -> Study:
    """The study the flags ask for, every input checked; one line naming what is wrong."""
    data, workdir = Path(args.data), Path(args.workdir)
    if not data.is_dir():
        raise UserError(f"--data {data}: no such folder")
    test, val = _subjects(args.test_subjects, "--test-subjects"), _subjects(args.val_subjects, "--val-subjects")
    both = sorted(set(test) & set(val))
    if both:
        raise UserError(f"subjects {','.join(map(str, both))} are in both --test-subjects and --val-subjects")
    found = _found_subjects(data)
    for flag, subjects in (("--test-subjects", test), ("--val-subjects", val)):
        missing = sorted(set(subjects) - set(found))
        if missing or not subjects:
            raise UserError(f"{flag}: " + (f"subjects {','.join(map(str, missing))} have no recordings in {data}"
                                           if missing else "no subjects"))
    train = [s for s in found if s not in test and s not in val]
    if not train:
        raise UserError(f"no training subjects: every subject in {data} is a test or validation subject")
    seeds = parse_seeds(args.seeds)
    stages = experiments(args.model, args.quick, workdir)
    by_stage: dict[str, list[str]] = {}
    for assignment in args.set:
        stage, _, rest = assignment.partition(".")
        if stage not in STAGES or not rest:
            raise UserError(f"--set {assignment!r}: keys start with a stage, one of {', '.join(STAGES)}")
        by_stage.setdefault(stage, []).append(rest)
    stages = {name: override(exp, *by_stage.get(name, [])) for name, exp in stages.items()}
    for name, exp in stages.items():  # a tenth of the steps (fine-tuning: of the epochs) warm up, unless set
        t, keys = exp.train, {key.partition("=")[0] for key in by_stage.get(name, [])}
        if name == "finetune" and "train.warmup_epochs" not in keys:
            stages[name] = exp.replace(train=dataclasses.replace(t, warmup_epochs=t.epochs / 10))
        elif name != "finetune" and "train.warmup_steps" not in keys:
            stages[name] = exp.replace(train=dataclasses.replace(t, warmup_steps=t.steps // 10))
    study_args = {"data": str(data.resolve()), "test_subjects": test, "val_subjects": val, "seeds": seeds,
                  "model": args.model, "quick": args.quick, "set": args.set}
    return Study(workdir, data, train, val, test, seeds, stages, study_args)


def _check_rerun(study: Study) -> None:
    """A rerun resumes the same study; other flags would mix two studies in one workdir."""
    path = study.workdir / "study.json"
    if path.exists():
        first = json.loads(path.read_text())
        changed = sorted(k for k in set(first) | set(study.args) if first.get(k) != study.args.get(k))
        if changed:
            raise UserError(f"{path}: this workdir holds a study with other {', '.join(changed)} "
                            f"({', '.join(f'{k}={first.get(k)}' for k in changed)}); use another --workdir")
    else:
        study.workdir.mkdir(parents=True, exist_ok=True)
        _write(path, study.args)


def _done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _write(path: Path, record: dict) -> dict:
    write_json(path, record)
    return record


def build_data(study: Study) -> dict:
    """The labelled split and the pretraining corpus (training and validation subjects, test ones left out);
    returns the hours of EEG the pretraining corpus covers and the builds' wall time."""
    from data_prep.builders import build_eegmat

    record = _done(study.workdir / "data" / "done.json")
    if record is None:
        tic = time.perf_counter()
        build_eegmat(study.data, study.workdir / LABELLED, seconds=SECONDS,
                     splits={"train": study.train, "val": study.val, "test": study.test})
        report = build_eegmat(study.data, study.workdir / UNLABELLED, seconds=SECONDS, stride=PRETRAIN_STRIDE,
                              splits={"train": study.train + study.val})
        record = _write(study.workdir / "data" / "done.json",
                        {"pretraining_hours": report["totals"]["hours_written"],
                         "wall_s": time.perf_counter() - tic})
    return record


def run_stage(name: str, exp: Experiment, workdir: Path, progress: bool) -> dict:
    """One training run, or its record when it has finished before."""
    from labram_jax.plots import read_metrics
    from labram_jax.train.launch import resolve_epochs
    from labram_jax.train.trainer import Trainer

    record = _done(workdir / "result.json")
    if record is not None:
        return record
    tic = time.perf_counter()
    trainer = Trainer(resolve_epochs(exp), workdir)  # the recipe's epochs, counted in the built data
    summary = trainer.train(progress)
    logged = read_metrics(workdir)  # by step: a resumed run logs some steps twice
    record: dict = {"wall_s": time.perf_counter() - tic}
    if name == "tokenizer":  # the codes of every pretraining window, with the final tokenizer
        record |= {k: float(v) for k, v in trainer.train_pass().items()}
    elif name == "pretrain":
        record["masked_accuracy"] = float(logged["masked_accuracy"][1][-1])
    else:
        steps = logged["val/roc_auc"][0]
        record |= {"test": {k.split("/", 1)[1]: summary[k] for k in summary if k.startswith("best_test/")},
                   "val": [{"step": int(step), **{f"val/{m}": float(logged[f"val/{m}"][1][i]) for m in METRICS}}
                           for i, step in enumerate(steps)]}
    return _write(workdir / "result.json", record)


def run(study: Study, progress: bool = True) -> dict:
    from labram_jax import preemption

    with preemption.StopSignals("the study") as signals:
        def boundary(what: str) -> None:  # the study's own safe points, between its runs
            if signals.requested:
                raise preemption.Preempted(f"stopped before {what}; the same command resumes there")

        _check_rerun(study)
        data = build_data(study)
        records = {}
        for name in ("tokenizer", "pretrain"):
            boundary(name)
            print(f"{name}: {study.stages[name].train.steps} steps -> {study.workdir / name}", flush=True)
            records[name] = run_stage(name, study.stages[name], study.workdir / name, progress)
        runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        finetune = study.stages["finetune"]
        for seed in study.seeds:
            for arm in ARMS:
                boundary(f"fine-tuning {arm} seed {seed}")
                exp = finetune.replace(init=str(study.workdir / "pretrain" / "export") if arm == "pretrained" else "",
                                       train=dataclasses.replace(finetune.train, seed=seed))
                result = run_stage("finetune", exp, study.workdir / "finetune" / arm / f"seed_{seed}",
                                   progress)
                print(f"finetune {arm} seed {seed}: " + ", ".join(f"{m} {result['test'][m]:.3f}" for m in METRICS),
                      flush=True)
                runs[arm].append(result)
    stage_s = {"data": data["wall_s"], **{k: v["wall_s"] for k, v in records.items()},
               **{f"finetune_{arm}": sum(r["wall_s"] for r in runs[arm]) for arm in ARMS}}
    summary = {
        "test_subjects": study.test, "val_subjects": study.val, "train_subjects": study.train, "seeds": study.seeds,
        "model": study.args["model"], "quick": study.args["quick"],
        "pretraining_hours": data["pretraining_hours"], "wall_hours": sum(stage_s.values()) / 3600,
        "tokenizer": {k: records["tokenizer"][k] for k in ("codebook_usage", "codebook_perplexity")},
        "pretraining": {"masked_accuracy": records["pretrain"]["masked_accuracy"]},
        "arms": {arm: {m: {"mean": mean, "std": std, "per_seed": [r["test"][m] for r in runs[arm]]}
                       for m, (mean, std) in mean_std([{m: r["test"][m] for m in METRICS} for r in runs[arm]]).items()}
                 for arm in ARMS},
        "stage_hours": {k: v / 3600 for k, v in stage_s.items()},
    }
    _write(study.workdir / "summary.json", summary)
    plot(runs, summary, study.workdir / "pretraining_benefit.png")
    return summary


def plot(runs: dict[str, list[dict]], summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colours = {"pretrained": "tab:blue", "scratch": "tab:orange"}
    fig, axes = plt.subplots(1, 1 + len(METRICS), figsize=(5 * (1 + len(METRICS)), 4))
    for i, metric in enumerate(METRICS):
        ax = axes[i]
        for j, arm in enumerate(ARMS):
            values = summary["arms"][arm][metric]["per_seed"]
            ax.scatter(np.full(len(values), j) + np.linspace(-0.1, 0.1, len(values)), values, color=colours[arm])
            ax.errorbar(j + 0.25, summary["arms"][arm][metric]["mean"], summary["arms"][arm][metric]["std"],
                        fmt="s", color=colours[arm], capsize=4)
        if metric != "pr_auc":  # chance; PR-AUC's is the prevalence of the task class
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(len(ARMS)), ARMS)
        ax.set_title(f"test {metric} (per seed; mean ± std)")
    ax = axes[-1]
    for arm in ARMS:
        for k, run_ in enumerate(runs[arm]):
            ax.plot([v["step"] for v in run_["val"]], [v["val/roc_auc"] for v in run_["val"]], color=colours[arm],
                    alpha=0.6, label=arm if k == 0 else None)
    ax.set_xlabel("fine-tuning step")
    ax.set_title("validation AUROC (one line per seed)")
    ax.legend()
    fig.suptitle(f"Pretraining benefit on EEGMAT: {summary['model']} model, test subjects "
                 f"{','.join(map(str, summary['test_subjects']))}, {summary['pretraining_hours']:.2f} h of EEG "
                 f"pretrained on, {summary['wall_hours']:.2f} h wall")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        study = plan(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from labram_jax.train import launch

    if argv is None:
        launch.rerun_with_huge_pages()
    # One process runs every stage, so the device count must suit them all: every batch is a multiple of it.
    launch.use_cores(study.stages["finetune"])
    from labram_jax import compile_cache, preemption

    compile_cache.enable()  # the fine-tuning runs of every seed and arm share their programs

    try:
        summary = run(study, progress=not args.quiet)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except preemption.Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr)
        return preemption.EXIT_CODE
    for arm, scores in summary["arms"].items():
        print(f"{arm}: " + ", ".join(f"{m} {scores[m]['mean']:.3f} ± {scores[m]['std']:.3f}" for m in METRICS))
    print(f"summary: {Path(args.workdir) / 'summary.json'} ({summary['wall_hours']:.2f} h)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

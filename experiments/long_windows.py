"""Windows past the original's 16 s on EEGMAT: a 16-row pretrained model fine-tuned on 5-, 10- and 20-s windows.

    python experiments/long_windows.py --data DIR --workdir W --pretrained EXPORT [--windows 5,10,20]
        [--stride 5] [--seeds 0,1,2] [--epochs 10]

EXPORT is a pretraining export with the original's 16 time_embed rows (experiments/pretraining_benefit.py's
WORKDIR/pretrain/export: the tiny model, pretrained on 5-s windows of the training and validation subjects). For
each window length the labelled EEGMAT split (CBraMod's subjects: train 00-27, val 28-31, test 32-35) is built with
windows starting every --stride seconds, so each length has about as many training windows; then the
finetune_eegmat recipe, as the pretraining-benefit study runs it, fine-tunes EXPORT once per seed. A window of at
most 16 s runs on the plain model; a longer one once per way of extending the learned rows (train.extend_time:
linear, hold). Each run keeps its best-validation-AUROC checkpoint and is scored on the test subjects with it.

WORKDIR/summary.json: {"arms": {"<seconds> s <plain|linear|hold>": {"balanced_accuracy"|"roc_auc"|"pr_auc":
{"mean", "std", "per_seed"}, "step_s": the median logged step time, "train_windows", "tokens": channels x
seconds}}, "seeds", "stride_s", "epochs"}; one line per arm on stdout. A rerun resumes: a finished build or run is
not repeated.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretraining_benefit import CBRAMOD_TEST, CBRAMOD_VAL, METRICS, _done, _write, experiments, run_stage  # noqa: E402

from labram_jax.configs import MAX_PATCHES  # noqa: E402
from labram_jax.files import write_json  # noqa: E402
from labram_jax.train.config import DataConfig  # noqa: E402
from labram_jax.train.launch import parse_seeds  # noqa: E402
from labram_jax.train.metrics import mean_std  # noqa: E402


def build(data: Path, out: Path, seconds: int, stride: int) -> dict:
    """The labelled split of `seconds`-s windows every `stride` s, once; its manifest counts."""
    from data_prep.builders import build_eegmat

    if not (out / "done.json").exists():
        split = lambda text: [int(s) for s in text.split(",")]  # noqa: E731
        test, val = split(CBRAMOD_TEST), split(CBRAMOD_VAL)
        build_eegmat(data, out, seconds=seconds, stride=stride,
                     splits={"train": [s for s in range(36) if s not in test + val], "val": val, "test": test})
        manifest = json.loads((out / "train" / "manifest.json").read_text())
        _write(out / "done.json", {"windows": manifest["windows"],
                                   "channels": max(len(names.split()) for names in manifest["channel_sets"])})
    return _done(out / "done.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, type=Path, help="the EEGMAT EDFs (SubjectNN_1.edf, SubjectNN_2.edf)")
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--pretrained", required=True, help="a 16-row pretraining export")
    p.add_argument("--windows", default="5,10,20", help="window lengths in seconds (default 5,10,20)")
    p.add_argument("--stride", type=int, default=5, help="seconds between window starts (default 5)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=float, default=10, help="fine-tuning epochs (default 10, the study's --quick)")
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    recipe = experiments("tiny", True, args.workdir)["finetune"]
    summary: dict = {"seeds": seeds, "stride_s": args.stride, "epochs": args.epochs, "arms": {}}
    for seconds in (int(s) for s in args.windows.split(",")):
        labelled = args.workdir / "data" / f"{seconds}s"
        built = build(args.data, labelled, seconds, args.stride)
        data = DataConfig(train=(str(labelled / "train"),), val=(str(labelled / "val"),),
                          test=(str(labelled / "test"),), max_channels=built["channels"], max_patches=seconds)
        for way in ("plain",) if seconds <= MAX_PATCHES else ("linear", "hold"):
            arm = f"{seconds} s {way}"
            results = []
            for seed in seeds:
                train = dataclasses.replace(recipe.train, epochs=args.epochs, seed=seed,
                                            extend_time=recipe.train.extend_time if way == "plain" else way)
                workdir = args.workdir / "finetune" / f"{seconds}s_{way}" / f"seed_{seed}"
                result = run_stage("finetune", recipe.replace(data=data, train=train, init=args.pretrained),
                                   workdir, progress=False)
                if "step_s" not in result:
                    times = [r["step_time"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text()
                                                         .splitlines()) if "step_time" in r][1:]
                    result = _write(workdir / "result.json", result | {"step_s": statistics.median(times)})
                results.append(result)
            summary["arms"][arm] = {
                **{m: {"mean": mean, "std": std, "per_seed": [r["test"][m] for r in results]}
                   for m, (mean, std) in mean_std([{m: r["test"][m] for m in METRICS} for r in results]).items()},
                "step_s": statistics.median(r["step_s"] for r in results), "train_windows": built["windows"],
                "tokens": built["channels"] * seconds}
            row = summary["arms"][arm]
            print(f"{arm}: " + ", ".join(f"{m} {row[m]['mean']:.3f} ± {row[m]['std']:.3f}" for m in METRICS)
                  + f"; {row['step_s'] * 1000:.0f} ms a step, {built['windows']} training windows", flush=True)
            write_json(args.workdir / "summary.json", summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

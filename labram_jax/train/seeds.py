"""`--seeds 0,1,2,3,4`: one run per seed, then the mean and std of each test metric, as the paper reports."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from labram_jax.errors import UserError
from labram_jax.files import write_json
from labram_jax.train.config import Experiment
from labram_jax.train.metrics import mean_std
from labram_jax.train.trainer import Trainer


def run(seeds: list[int], exp: Experiment, workdir: Path, progress: bool = True) -> dict[str, tuple[float, float]]:
    if not exp.data.test:  # known now, not after every seed has trained
        raise UserError("--seeds needs a test split to report on (a test/ folder beside train/)")
    runs = []
    for seed in seeds:
        summary = Trainer(exp.replace(train=dataclasses.replace(exp.train, seed=seed)),
                          workdir / f"seed_{seed}").train(progress)
        # The paper reports the test metrics of the best validation checkpoint when there is one.
        prefix = "best_test/" if any(k.startswith("best_test/") for k in summary) else "test/"
        runs.append({k[len(prefix):]: v for k, v in summary.items() if k.startswith(prefix)})
    result = mean_std(runs)
    write_json(workdir / "seeds.json", {"seeds": seeds, "runs": runs, "mean_std": result})
    for name, (mean, std) in result.items():
        print(f"{name}: {mean:.4f} +- {std:.4f} over seeds {','.join(map(str, seeds))}")
    return result

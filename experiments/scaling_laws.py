"""Scaling-law runs: masked-code loss against model size and EEG hours, as a grid of pretraining runs, fitted.

    python experiments/scaling_laws.py run --config toy --workdir runs/scaling_toy          # 3 x 3 on the CPU
    python experiments/scaling_laws.py run --config pod --workdir W --data shards/ --list   # the points
    python experiments/scaling_laws.py run --config pod --workdir W --data shards/ --point 7
    python experiments/scaling_laws.py fit W/results.csv --out W/fit [--n-column non_embedding_params] [--budget C ...]

`run` without --point runs every unfinished point in turn (each resumes from its checkpoints, finished ones are
skipped), then writes results.csv and the fit; after a scheduler has run the points, the same command only collects
and fits. The grid and the fit are in labram_jax/scaling/.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

from labram_jax import demo
from labram_jax.errors import UserError
from labram_jax.recipes import pretrain_base, train_tokenizer
from labram_jax.scaling.grid import GridConfig
from labram_jax.train import launch
from labram_jax.train.config import MeshConfig, override


def toy() -> GridConfig:
    """3 sizes x 3 nested subsets of the bundled sample (3 training subjects, 0.2 h), with the demo's recipes."""
    stages = demo.experiments(Path(), Path(), steps=100)  # data and tokenizer paths are set by the grid
    return GridConfig(pretrain=stages["pretrain"], tokenizer=stages["tokenizer"], sizes=("0.1M", "0.25M", "0.5M"),
                      # The first subset is one 60-s recording, so the data axis spans 12x, wider than the sizes'
                      # 4.3x: every budget between them is reached by all three sizes (the iso-FLOP view needs it).
                      hours=(0.015, 0.1, 0.2), epochs=10, eval_tokens=32_000, source="eegmat", save_every=25)


def pod() -> GridConfig:
    """The LaBraM-Base recipe over the ladder from 0.5M to LaBraM-Huge's 369M and 30-2,500 h of EEG.

    Parameters and optimizer state sharded over 4 devices (4 divides every rung's width, 100 to 800; an axis that
    does not divide a width is an error), blocks recomputed in the backward pass (what the huge rung needs; the
    small rungs pay the same relative recompute, so FLOPs stay comparable across the grid).
    """
    exp = pretrain_base.config()
    exp = exp.replace(mesh=MeshConfig(data=-1, fsdp=4), runtime=dataclasses.replace(exp.runtime, remat="block"))
    return GridConfig(pretrain=exp, tokenizer=train_tokenizer.config(),
                      sizes=("0.5M", "1.5M", "5.8M", "20M", "46M", "120M", "369M"),
                      hours=(30.0, 100.0, 300.0, 1000.0, 2500.0), epochs=5, eval_tokens=50_000_000, eval_hours=10.0,
                      save_every=1000)


CONFIGS = {"toy": toy, "pod": pod}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the grid, one point of it, or list its points")
    run.add_argument("--config", choices=sorted(CONFIGS), required=True)
    run.add_argument("--workdir", required=True)
    run.add_argument("--data", action="append", default=[],
                     help="train/ and val/ shard folders (toy: a folder of EEGMAT EDFs, default the bundled sample)")
    run.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                     help="typed overrides of the grid config, e.g. epochs=2 pretrain.train.lr=3e-4")
    what = run.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="print the points and exit")
    what.add_argument("--point", type=int, help="run this point alone (for a job array)")
    run.add_argument("--coordinator", help="HOST:PORT of process 0, for a point run on several hosts")
    run.add_argument("--distributed", choices=("off", "auto"), default="off")
    run.add_argument("--num-processes", type=int)
    run.add_argument("--process-id", type=int)
    fit = sub.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to a results CSV")
    fit.add_argument("results")
    fit.add_argument("--out", required=True)
    fit.add_argument("--n-column", default="params", help="the column used as N (default params)")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    fit.add_argument("--budget", type=float, action="append", default=[], metavar="C",
                     help="a compute budget in FLOPs for fit.json's compute-optimal rows (repeatable; default: "
                          "every decade the runs' FLOPs span)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from labram_jax.scaling import grid as scaling

    try:
        if args.command == "fit":
            from labram_jax.scaling.fit import fit_results, summary

            if any(not c > 0 for c in args.budget):
                raise UserError(f"--budget {args.budget}: budgets are positive numbers of FLOPs")
            print(summary(fit_results(args.results, args.out, n_column=args.n_column, samples=args.bootstrap,
                                      budgets=args.budget), args.out))
            return 0
        grid = override(CONFIGS[args.config](), *args.set)
        if args.list:
            print("\n".join(scaling.describe(grid)))
            return 0
        args.simulate_devices = 0
        launch._initialize_distributed(args)
        # Points of one size share shapes: from the second on, evaluation and FLOP counting reuse compiled code
        # (on a cluster, every array task after the first of its size does), through the user's cache.
        from labram_jax import compile_cache, preemption

        compile_cache.enable()
        # From here a SIGTERM or SIGINT (during a build or a compilation too) is noted, and the trainer that runs
        # next stops at its first safe point, saves and exits 75, as `labram train`; the same command resumes.
        with preemption.StopSignals("the scaling grid"):
            if args.point is not None:
                scaling.run_point(grid, args.point, args.workdir, args.data)
            else:
                scaling.run_grid(grid, args.workdir, args.data)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as stop:  # noqa: BLE001 - only the preemption stop is handled; anything else re-raises
        from labram_jax import preemption

        if not isinstance(stop, preemption.Preempted):
            raise
        print(f"preempted: {stop}", file=sys.stderr)
        return preemption.EXIT_CODE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

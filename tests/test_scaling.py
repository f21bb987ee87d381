"""The scaling-law tool: nested data subsets, the grid's points and model ladder, the fit and its files, and a
killed grid that resumes."""
import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from labram_jax.data.records import Window
from labram_jax.data.shards import DatasetStats, write_manifest, write_shard
from labram_jax.scaling import fit as scaling_fit
from labram_jax.scaling.grid import LADDER, GridConfig, Prepared, parameter_counts, point_experiment, points
from labram_jax.scaling.subsets import Subset, nested_subsets
from test_train import child_env

ROOT = Path(__file__).resolve().parents[1]
TRUTH = scaling_fit.Law(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # Chinchilla's published fit


def _shards(folder: Path, seconds: dict[str, int]) -> None:
    """One 2-channel, 2-s window per 2 s of each recording, recordings interleaved across two shards."""
    folder.mkdir(parents=True)
    windows = [Window(signal=np.full((2, 2, 200), i, np.float32), channel_rows=np.array([1, 2], np.int16),
                      channel_names=("FP1", "FP2"), recording=name, start=2.0 * i, dataset="toy")
               for name, length in seconds.items() for i in range(length // 2)]
    windows = windows[::2] + windows[1::2]
    stats = DatasetStats()
    for w in windows:
        stats.add(w)
    write_shard(folder / "a.array_record", windows[:len(windows) // 2])
    write_shard(folder / "b.array_record", windows[len(windows) // 2:])
    write_manifest(folder, {"toy": stats}, {})


def test_nested_subsets_by_recording(tmp_path):
    from labram_jax.data.pipeline import window_source
    from labram_jax.data.records import decode

    seconds = {"r0": 3600, "r1": 1800, "r2": 7200, "r3": 900, "r4": 3600}
    _shards(tmp_path / "train", seconds)
    subsets = nested_subsets([str(tmp_path / "train")], [1.0, 2.0, 4.0], tmp_path / "subsets", seed=3)
    recordings = []
    for subset, target in zip(subsets, [1.0, 2.0, 4.0]):
        windows = [decode(r) for r in window_source(list(subset.folders))]
        names = {w.recording for w in windows}
        recordings.append(names)
        # whole recordings only, at least the target, and the counts are those of the windows read back
        assert all(sum(w.recording == name for w in windows) == seconds[name] // 2 for name in names)
        assert subset.hours >= target and subset.hours == sum(seconds[n] for n in names) / 3600
        assert (subset.windows, subset.recordings, subset.patches) == (len(windows), len(names), 4 * len(windows))
    assert recordings[0] < recordings[1] < recordings[2]  # nested, each strictly larger
    # the shortest prefix: dropping the last recording added would fall short of the target
    assert len(subsets[0].folders) == 1 and json.loads((tmp_path / "subsets" / "increment-00" /
                                                        "manifest.json").read_text())["recordings"] > 0
    # a rerun reuses the increments; another request in the same folder is refused
    stamp = (tmp_path / "subsets" / "increment-01").stat().st_mtime_ns
    assert nested_subsets([str(tmp_path / "train")], [1.0, 2.0, 4.0], tmp_path / "subsets", seed=3) == subsets
    assert (tmp_path / "subsets" / "increment-01").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="holds subsets of"):
        nested_subsets([str(tmp_path / "train")], [1.0, 3.0], tmp_path / "subsets", seed=3)
    with pytest.raises(ValueError, match="fewer than the 9 h"):
        nested_subsets([str(tmp_path / "train")], [9.0], tmp_path / "other")


def test_ladder_sizes():
    counted = [name for name in LADDER if float(name.rstrip("M")) <= 46]  # building the 120M/369M shapes is slow
    ladder = [parameter_counts(_model(name)) for name in counted]
    assert len(LADDER) >= 5 and [n for n, _ in ladder] == sorted(n for n, _ in ladder)
    widths = [LADDER[name].width * LADDER[name].width * LADDER[name].depth for name in LADDER]
    assert widths == sorted(widths)
    for name, (total, non_embedding) in zip(counted, ladder):
        nominal = float(name.rstrip("M")) * 1e6
        if nominal >= 1e6:  # the paper's sizes count the Transformer, which non-embedding is close to
            assert abs(non_embedding / nominal - 1) < 0.06, (name, non_embedding)
        assert total > non_embedding
    # LaBraM-Base, -Large and -Huge are rungs of the ladder with the paper's widths and depths
    assert (LADDER["5.8M"].width, LADDER["46M"].depth, LADDER["369M"].width) == (200, 24, 800)


def _model(size):
    from labram_jax import demo

    stages = demo.experiments(Path(), Path())
    from labram_jax.scaling.grid import model_config

    return model_config(GridConfig(pretrain=stages["pretrain"], tokenizer=stages["tokenizer"]), size)


def test_point_experiment_budget():
    from labram_jax import demo

    stages = demo.experiments(Path(), Path())
    grid = GridConfig(pretrain=stages["pretrain"], tokenizer=stages["tokenizer"], sizes=("0.1M", "5.8M"),
                      hours=(0.1, 0.2), epochs=3, eval_tokens=16_000, seed=7)
    subsets = (Subset(("a",), 0.1, 70, 2, 7000), Subset(("a", "b"), 0.2, 150, 4, 15000))
    grid_points = points(grid)
    assert [p.name for p in grid_points] == ["000-0.1M-0.1h", "001-0.1M-0.2h", "002-5.8M-0.1h", "003-5.8M-0.2h"]
    exp = point_experiment(grid, grid_points[3], Prepared(subsets, ("val",), "tok"))
    assert exp.train.steps == 29  # ceil(3 epochs x 150 windows / 16)
    assert (exp.train.eval_every, exp.train.warmup_steps, exp.train.seed) == (10, 2, 7)  # 16k tokens / 1600
    assert (exp.model.embed_dim, exp.model.depth, exp.model.vocab_size) == (200, 12, 256)
    assert (exp.data.train, exp.data.val, exp.tokenizer_checkpoint) == (("a", "b"), ("val",), "tok")
    with pytest.raises(ValueError, match="unknown sizes"):
        points(grid.replace(sizes=("7M",)))


def test_point_budget_counts_packed_rows(tmp_path):
    """With packing a batch row holds several windows: the budget's steps pass over the subset's windows `epochs`
    times, counted in the rows they pack into (two 100-token windows to a row of 256), not one window a row."""
    from labram_jax import demo

    names = " ".join(f"C{k}" for k in range(20))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "manifest.json").write_text(json.dumps(
            {"windows": 75, "channel_sets": {names: 75}, "preprocessing": {"window_s": 5}}))
    stages = demo.experiments(Path(), Path())
    pretrain = stages["pretrain"]
    grid = GridConfig(pretrain=pretrain.replace(data=dataclasses.replace(pretrain.data, pack_tokens=256,
                                                                         pack_windows=4)),
                      tokenizer=stages["tokenizer"], sizes=("0.1M",), hours=(0.2,), epochs=3, seed=7)
    subset = Subset((str(tmp_path / "a"), str(tmp_path / "b")), 0.2, 150, 4, 15000)
    exp = point_experiment(grid, points(grid)[0], Prepared((subset,), ("val",), "tok"))
    assert exp.train.steps == 15  # ceil(3 epochs x 75 rows / 16), not the 29 of one window a row


def _synthetic(seed=0):
    n, d = np.meshgrid(np.logspace(6, 9, 6), np.logspace(8, 11, 6), indexing="ij")  # 3 decades each
    n, d = n.ravel(), d.ravel()
    return n, d, TRUTH(n, d) * np.exp(np.random.default_rng(seed).normal(0, 0.01, n.shape))  # 1% noise


def test_fit_recovers_a_known_law():
    n, d, loss = _synthetic()
    law = scaling_fit.fit_law(n, d, loss)
    assert abs(law.alpha - TRUTH.alpha) < 0.05 and abs(law.beta - TRUTH.beta) < 0.05
    ci = scaling_fit.bootstrap(n, d, loss, law, samples=100)
    for key in scaling_fit.KEYS:
        low, high = ci[key]
        assert low <= getattr(TRUTH, key) <= high, (key, low, high, getattr(TRUTH, key))
        assert low <= getattr(law, key) <= high
    iso = scaling_fit.isoflop(n, d, loss)
    assert abs(iso.a - TRUTH.a) < 0.05 and abs(iso.b - TRUTH.b) < 0.05
    # at 6N a token, the compute-optimal allocation spends the budget and is Chinchilla's closed form
    rows = scaling_fit.optimal(law, scaling_fit.Cost(), [1e18, 1e21], n)
    n_opt, d_opt = np.array([r["params"] for r in rows]), np.array([r["tokens"] for r in rows])
    np.testing.assert_allclose(6 * n_opt * d_opt, [1e18, 1e21])
    g = (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
    np.testing.assert_allclose(n_opt, g * (np.array([1e18, 1e21]) / 6) ** law.a, rtol=1e-6)


def _cost_ratio(n):
    """FLOPs per token over 6N falling with size, as LaBraM's objective's: 3.57 at 0.5M parameters, 2.10 at 369M."""
    return 3.57 * (np.asarray(n) / 5e5) ** (np.log(2.10 / 3.57) / np.log(369e6 / 5e5))


def test_optimal_allocation_under_the_records_cost(tmp_path):
    """Runs whose FLOPs per token are not 6N: fit --budget writes compute-optimal rows that minimise the fitted
    law under the records' own cost, which a 6ND allocation would not."""
    n, d, loss = _synthetic(2)
    flops = 6 * n * _cost_ratio(n) * d
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["size", "params", "tokens", "loss", "flops"])
        writer.writerows(zip([f"{x:.0e}" for x in n], n, d, loss, flops))
    out = tmp_path / "fit"
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "scaling_laws.py"), "fit", str(path), "--out",
                          str(out), "--budget", "1e18", "--budget", "1e20", "--bootstrap", "20"],
                         capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    saved = json.loads((out / "fit.json").read_text())
    assert "compute-optimal at C = 1e+18 FLOPs (cost per token: records)" in run.stdout
    assert saved["cost"]["source"] == "records"
    np.testing.assert_allclose(saved["cost"]["per_token_over_6n"], _cost_ratio(np.unique(n)), rtol=1e-9)
    law = scaling_fit.Law(**{k: saved[k] for k in ("E", "A", "alpha", "B", "beta")})
    brute = np.geomspace(1e3, 1e12, 200001)
    six_nd = scaling_fit.optimal(law, scaling_fit.Cost(), [1e18, 1e20], n)
    for row, budget, plain in zip(saved["optimal"], (1e18, 1e20), six_nd):
        assert row["flops"] == budget and set(row) == {"flops", "params", "tokens", "loss", "ci"}
        # the budget is spent at the records' cost, and no other size does better under it
        np.testing.assert_allclose(row["tokens"] * 6 * row["params"] * _cost_ratio(row["params"]), budget, rtol=1e-6)
        best = brute[np.argmin(law(brute, budget / (6 * brute * _cost_ratio(brute))))]
        np.testing.assert_allclose(row["params"], best, rtol=1e-3)
        assert row["loss"] == pytest.approx(float(law(row["params"], row["tokens"])))
        for key in ("params", "tokens", "loss"):
            low, high = row["ci"][key]
            assert low <= row[key] <= high
        assert abs(np.log(row["params"] / plain["params"])) > 0.05  # 6ND would allocate otherwise
    # every run is placed at its recorded FLOPs in the iso-FLOP view
    assert min(saved["isoflop"]["levels"]) >= flops.min() and max(saved["isoflop"]["levels"]) <= flops.max()
    for name in ("loss_vs_tokens.png", "isoflop.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_isoflop_needs_three_sizes_by_three_budgets():
    n, d, loss = _synthetic()
    keep = n <= np.unique(n)[1]  # two sizes
    assert scaling_fit.isoflop(n[keep], d[keep], loss[keep]) is None


def test_fit_files(tmp_path):
    n, d, loss = _synthetic(1)
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["size", "params", "non_embedding_params", "tokens", "loss", "hours"])
        writer.writerows(zip([f"{x:.0e}" for x in n], n, n * 0.9, d, loss, d / 1e6))
    result = scaling_fit.fit_results(path, tmp_path / "fit", n_column="non_embedding_params", samples=20)
    saved = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert all(isinstance(saved[k], float) for k in scaling_fit.KEYS)
    assert set(saved["ci"]) == set(scaling_fit.KEYS) and all(len(saved["ci"][k]) == 2 for k in scaling_fit.KEYS)
    assert saved["n_column"] == "non_embedding_params" and saved["isoflop"]["a"] is not None
    assert saved["at_bound"] == []
    law = scaling_fit.Law(**{k: saved[k] for k in ("E", "A", "alpha", "B", "beta")})
    with open(tmp_path / "fit" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    got = np.array([[float(r[k]) for k in ("non_embedding_params", "tokens", "loss", "predicted")] for r in rows])
    np.testing.assert_allclose(got[:, :3], np.stack([n * 0.9, d, loss], 1))
    np.testing.assert_allclose(got[:, 3], law(got[:, 0], got[:, 1]))
    assert np.abs(np.log(got[:, 2] / got[:, 3])).max() < 0.05  # 1% noise: the fit is close to every run
    for name in ("loss_vs_tokens.png", "isoflop.png", "residuals.png"):
        assert (tmp_path / "fit" / name).read_bytes()[:4] == b"\x89PNG"


def test_fit_reports_bad_input(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("params,loss\n1,2\n")
    with pytest.raises(ValueError, match=r"r\.csv: no column 'tokens'"):
        scaling_fit.read_results(path)
    path.write_text("params,tokens,loss\n" + "1,2,3\n" * 3 + "1,2,oops\n" + "1,2,3\n" * 3)
    with pytest.raises(ValueError, match=r"r\.csv line 5: column 'loss' is 'oops'"):
        scaling_fit.read_results(path)


def _launch(workdir, *extra):
    command = [sys.executable, str(ROOT / "experiments" / "scaling_laws.py"), "run", "--config", "toy",
               "--workdir", str(workdir), "--set", "sizes=0.1M", "hours=0.1,0.2", "epochs=2", "save_every=10",
               "eval_tokens=16000", "tokenizer.train.steps=2", "tokenizer.train.warmup_steps=1", *extra]
    return subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_stopped_or_killed_grid_resumes(tmp_path):
    """A SIGTERM as the first point starts (its step compiling, before the trainer sets its own handlers) is kept:
    the trainer stops at its first safe point, saves, and the grid exits 75; the point's own command resumes it.
    Then the grid, killed while its second point trains, reruns: it skips the first and resumes the second. One
    model size on two data subsets: the points share their compiled programs."""
    first, second = (tmp_path / "points" / name for name in ("000-0.1M-0.1h", "001-0.1M-0.2h"))
    process = _launch(tmp_path)
    for line in process.stdout:
        if line.startswith("point 0 000-0.1M-0.1h: running"):
            process.send_signal(signal.SIGTERM)
            break
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 75, output
    assert "preempted: stopped at step" in output
    saved = sorted(int(p.name) for p in (first / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and not (first / "result.json").exists()
    rerun = _launch(tmp_path, "--point", "0")
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert f"resumed from step {saved[-1]}" in output and (first / "result.json").exists()

    process = _launch(tmp_path)
    deadline = time.time() + 240
    while not (second / "checkpoints").is_dir() or not any(p.name.isdigit() for p in
                                                          (second / "checkpoints").iterdir()):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "the second point never saved a checkpoint"
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (second / "result.json").exists()  # killed before it finished
    finished = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    rerun = _launch(tmp_path)
    output, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, output
    assert "point 0 000-0.1M-0.1h: finished, skipped" in output and "resumed from step" in output
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == finished  # not touched
    assert not (tmp_path / "xla_cache").exists()  # the session's JAX_COMPILATION_CACHE_DIR is kept
    assert len((second / "sessions.jsonl").read_text().splitlines()) == 2
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["point"] for r in rows] == ["0", "1"]
    # 2 epochs of the subset's 5-s windows in batches of 16 windows x 100 channel-patches: of all 144 windows, 18
    assert 0.1 <= float(rows[0]["hours"]) < 0.2 and float(rows[1]["hours"]) == pytest.approx(0.2)
    for row in rows:
        steps = math.ceil(2 * round(float(row["hours"]) * 720) / 16)
        assert (int(row["steps"]), int(row["examples"]), float(row["tokens"])) == (steps, 16 * steps, 1600 * steps)
        assert float(row["loss"]) >= float(row["best_loss"]) > 0
        assert 0.5 < float(row["flops_ratio"]) < 1.0 and float(row["wall_s"]) > 0
    assert int(rows[1]["steps"]) == 18 and int(rows[0]["steps"]) < 18
    log = [json.loads(line) for line in (second / "scaling.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "eval"] == [10, 18]  # every 16k tokens, and the end
    assert log[-1]["event"] == "result" and log[-1]["config"]["train"]["seed"] == 0

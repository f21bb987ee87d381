"""`labram plot`: the curves of real runs, and the ROC curve and confusion matrix of a fine-tuning evaluation.

The runs of the README's main job, `labram demo` from the installed wheel on the bundled EEGMAT recordings
(subjects 00-01 train, 02 validates, 03 tests): a tokenizer, a pretraining run against it and a fine-tuning run
with a best checkpoint, conftest's demo_run, run once for this module, test_install and test_train's learning
test (the tests that use them are marked slow). Every drawn series is read back from the figure and compared
with what the run wrote (metrics.jsonl, the per-window test outputs) or with scikit-learn.
"""
import json
import shutil
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from sklearn import metrics as skm

from labram_jax import plots
from labram_jax.cli import main
from labram_jax.train import metrics as paper_metrics
from labram_jax.train import outputs


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def logged(workdir: Path) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()):
        for key, value in record.items():
            if key not in ("step", "time"):
                series.setdefault(key, ([], []))[0].append(record["step"])
                series[key][1].append(value)
    return series


def lines(fig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {line.get_label(): (np.asarray(line.get_xdata()), np.asarray(line.get_ydata()))
            for ax in fig.axes for line in ax.get_lines() if not line.get_label().startswith("_")}


@pytest.mark.slow
@pytest.mark.xdist_group("demo-run")  # one worker runs the demo once
def test_curves_are_the_logged_series(demo_run):
    workdirs = [demo_run[s] for s in ("tokenizer", "pretrain", "finetune")]
    figures = dict(plots.figures(workdirs))
    series = {s: logged(demo_run[s]) for s in ("tokenizer", "pretrain", "finetune")}
    wanted = ["loss", "lr", "grad_norm", "codebook_usage", "codebook_perplexity", "batch_codebook_usage",
              "batch_codebook_perplexity", "masked_accuracy"]
    val = sorted({k for s in series.values() for k in s if k.startswith("val/")})
    assert {"val/loss", "val/balanced_accuracy", "val/roc_auc"} <= set(val)
    expected = [f"{k.replace('/', '_')}.png" for k in wanted + val]
    assert [n for n in figures if not n.startswith(("roc_", "confusion_"))] == expected
    for key in wanted + val:
        drawn = lines(figures[f"{key.replace('/', '_')}.png"])
        # Only the runs that logged the key have a curve: usage is the tokenizer's, masked accuracy pretraining's.
        assert set(drawn) == {s for s in series if key in series[s]}, key
        for stage, (steps, values) in drawn.items():
            np.testing.assert_array_equal(steps, series[stage][key][0], err_msg=f"{stage} {key}")
            np.testing.assert_allclose(values, series[stage][key][1], rtol=0, atol=0, err_msg=f"{stage} {key}")
    assert set(lines(figures["codebook_usage.png"])) == {"tokenizer"}
    assert set(lines(figures["masked_accuracy.png"])) == {"pretrain"}
    assert series["finetune"]["val/loss"][0] == [25, 50, 75, 100]  # the demo: eval_every=25 of 100 steps


@pytest.mark.slow
@pytest.mark.xdist_group("demo-run")  # one worker runs the demo once
@pytest.mark.parametrize("split", ["test", "best_test"])
def test_outputs_reproduce_the_test_metrics(demo_run, split):
    """The trainer's final test evaluation (and that of the best checkpoint) writes the per-window outputs its
    metrics came from."""
    out = outputs.load(demo_run["finetune"] / "outputs" / f"{split}.npz")
    manifest = json.loads((demo_run["data"] / "test" / "manifest.json").read_text())
    assert out["kind"] == "binary" and len(out["labels"]) == manifest["windows"] == 48
    assert out["logits"].shape in ((48,), (48, 1)) and set(np.unique(out["labels"])) == {0, 1}
    final = [r for r in map(json.loads, (demo_run["finetune"] / "metrics.jsonl").read_text().splitlines())
             if f"{split}/roc_auc" in r][-1]
    for key, value in paper_metrics.binary_metrics(out["labels"], out["logits"]).items():
        assert value == final[f"{split}/{key}"], key


@pytest.mark.slow
@pytest.mark.xdist_group("demo-run")  # one worker runs the demo once
def test_roc_and_confusion_of_one_or_several_runs(demo_run, tmp_path):
    again = tmp_path / "finetune_again"
    shutil.copytree(demo_run["finetune"], again)
    figures = dict(plots.figures([demo_run["finetune"], again]))
    for split in ("test", "best_test"):
        out = outputs.load(demo_run["finetune"] / "outputs" / f"{split}.npz")
        prob = 1 / (1 + np.exp(-out["logits"].reshape(-1).astype(np.float64)))
        fpr, tpr, _ = skm.roc_curve(out["labels"], prob)
        auc = skm.roc_auc_score(out["labels"], prob)
        drawn = lines(figures[f"roc_{split}.png"])
        assert len(drawn) == 2  # one curve per run, beside the unlabelled chance diagonal
        for label, (x, y) in drawn.items():
            assert label.endswith(f"(AUROC {auc:.3f})"), label
            np.testing.assert_allclose(x, fpr, rtol=0, atol=1e-12)
            np.testing.assert_allclose(y, tpr, rtol=0, atol=1e-12)
        counts = skm.confusion_matrix(out["labels"], (prob >= 0.5).astype(int), labels=[0, 1])
        panels = figures[f"confusion_{split}.png"].axes
        images = [ax.images[0].get_array() for ax in panels if ax.images]
        assert len(images) == 2
        for image in images:
            np.testing.assert_array_equal(np.asarray(image), counts)


def test_multiclass_roc_is_one_vs_rest(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 90)
    logits = rng.normal(size=(90, 3)) + 1.5 * np.eye(3)[labels]
    workdir = tmp_path / "tuev"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    outputs.save(workdir / "outputs" / "test.npz", "multiclass", labels, logits.astype(np.float32))
    figures = dict(plots.figures([workdir]))
    prob = np.exp(logits.astype(np.float32).astype(np.float64))
    prob /= prob.sum(axis=1, keepdims=True)
    drawn = lines(figures["roc_test.png"])
    assert len(drawn) == 3
    for k in range(3):
        fpr, tpr, _ = skm.roc_curve(labels == k, prob[:, k])
        (x, y), = [xy for label, xy in drawn.items() if f"class {k} " in label]
        np.testing.assert_allclose(x, fpr, atol=1e-12)
        np.testing.assert_allclose(y, tpr, atol=1e-12)
    image = figures["confusion_test.png"].axes[0].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(image), skm.confusion_matrix(labels, logits.argmax(1), labels=[0, 1, 2]))


@pytest.mark.slow
@pytest.mark.xdist_group("demo-run")  # one worker runs the demo once
def test_labram_plot_writes_the_pngs(demo_run, tmp_path, capsys):
    out = tmp_path / "plots"
    workdirs = [str(demo_run[s]) for s in ("tokenizer", "pretrain", "finetune")]
    assert main(["plot", *workdirs, "--out", str(out)]) == 0
    names = [name for name, _ in plots.figures([Path(w) for w in workdirs])]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0, name
    assert f"wrote {len(names)} plots to {out}" in capsys.readouterr().out

    assert main(["plot", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing" in err and "metrics.jsonl" in err


def test_metrics_of_a_resumed_or_running_run(tmp_path):
    """A resumed run logs again the steps after its last checkpoint (the last value counts), a non-finite value is
    a null, and a run still writing may end in half a line; anything else unreadable is an error naming the line."""
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": None, "grad_norm": None},
               {"step": 2, "loss": 2.5}, {"step": 3, "loss": 1.5, "val/loss": 1.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')
    series = plots.read_metrics(tmp_path)
    np.testing.assert_array_equal(series["loss"][0], [1, 2, 3])
    np.testing.assert_array_equal(series["loss"][1], [3.0, 2.5, 1.5])
    np.testing.assert_array_equal(series["val/loss"][0], [3])
    assert np.isnan(series["grad_norm"][1]).all()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"loss": 2.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        plots.read_metrics(tmp_path)

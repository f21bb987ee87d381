"""labram_jax.checkpoint: parameters-only Orbax exports of the three model kinds."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from labram_jax import configs
from labram_jax.checkpoint import export, is_export, load_model, save_model
from labram_jax.convert.state_dict import build, state_dict

KINDS = [(configs.tiny(num_classes=3), "classify"), (configs.tiny(), "pretrain"),
         (configs.tokenizer_tiny(), "tokenizer")]


def variables(model):
    """{path: (variable type, array)} of every variable of the model."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model), is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
    return {jax.tree_util.keystr(path): (type(var), np.asarray(var[...])) for path, var in leaves}


@pytest.mark.parametrize("cfg,task", KINDS, ids=[task for _, task in KINDS])
def test_round_trip(tmp_path, cfg, task):
    model = build(cfg, task, seed=7)  # load_model builds with seed 0, so equal values must come from the files
    save_model(model, tmp_path / "export")
    assert is_export(tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory left behind
    for torch_order in (True, False):  # built eagerly, or as shapes only (the trainer's loads)
        loaded = load_model(tmp_path / "export", torch_order=torch_order)
        assert type(loaded) is type(model) and loaded.cfg == model.cfg
        ours, theirs = variables(model), variables(loaded)
        assert list(ours) == list(theirs)
        for key, (kind, value) in ours.items():
            assert theirs[key][0] is kind, key
            assert theirs[key][1].dtype == value.dtype, key
            np.testing.assert_array_equal(theirs[key][1], value, err_msg=key)
        assert list(state_dict(loaded)) == list(state_dict(model)) if torch_order else sorted(state_dict(loaded)) \
            == sorted(state_dict(model))
    if task == "tokenizer":
        assert any(kind.__name__ == "Codebook" for kind, _ in ours.values())


def test_into_existing_directory(tmp_path):
    model = build(configs.tiny(num_classes=3), "classify")
    (tmp_path / "empty").mkdir()
    save_model(model, tmp_path / "empty")
    assert is_export(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        save_model(model, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_write_meta", fail)  # after Orbax has written the arrays
    with pytest.raises(KeyboardInterrupt):
        save_model(build(configs.tiny(num_classes=3), "classify"), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_not_an_export(tmp_path):
    (tmp_path / "state").mkdir()
    assert not is_export(tmp_path)
    with pytest.raises(ValueError, match=rf"^{tmp_path}: not a labram-jax export \(no labram.json\)$"):
        load_model(tmp_path)
    (tmp_path / "labram.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="is not a labram-jax/params export"):
        load_model(tmp_path)


def test_wrong_shape(tmp_path):
    save_model(build(configs.tiny(num_classes=3), "classify"), tmp_path / "export")
    meta_path = tmp_path / "export" / "labram.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["num_classes"] = 4
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'export'}: stored arrays do not match .*"
                                         r"wrong shape or dtype: head\.bias \(\(3,\), 'float32'\)"):
        load_model(tmp_path / "export")
    meta["config"]["depth"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unexpected: blocks\.1\."):
        load_model(tmp_path / "export")


# A model as a GPU run builds it: bf16 compute, cuDNN attention, rematerialised blocks.
GPU = {"dtype": "bfloat16", "attention": "cudnn", "remat": "block"}
CPU = {"dtype": "float32", "attention": None, "remat": "none"}


@pytest.mark.parametrize("cfg,kind", [(configs.tiny(num_classes=3, **GPU), "classify"),
                                      (configs.tokenizer_tiny(encoder=configs.tokenizer_tiny().encoder.replace(**GPU)),
                                       "tokenizer")], ids=["classify", "tokenizer"])
def test_export_holds_the_model_kind_and_its_architecture_only(tmp_path, cfg, kind):
    save_model(build(cfg, kind), tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "labram.json").read_text())
    assert meta["kind"] == kind and "task" not in meta
    transformers = [meta["config"]] if kind == "classify" else [meta["config"]["encoder"], meta["config"]["decoder"]]
    assert all(not set(GPU) & set(t) for t in transformers)  # how it ran is not what it is
    loaded = load_model(tmp_path / "export")
    assert loaded.cfg == configs.with_runtime(cfg, **CPU)


def test_an_export_of_version_1_still_loads(tmp_path):
    """Version 1 named the model kind "task" and kept the run's dtype, attention and remat in its config."""
    model = build(configs.tiny(num_classes=3), "classify", seed=7)
    save_model(model, tmp_path / "export")
    meta_path = tmp_path / "export" / "labram.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({"format": meta["format"], "version": 1, "task": "classify",
                                     "config": meta["config"] | GPU}))
    loaded = load_model(tmp_path / "export")
    assert loaded.cfg == configs.tiny(num_classes=3) and loaded.cfg.dtype == "float32"
    for key, (_, value) in variables(model).items():
        np.testing.assert_array_equal(variables(loaded)[key][1], value, err_msg=key)
    # A version-2 export is architecture only: a runtime field in it is an error, not silently applied.
    meta_path.write_text(json.dumps({"format": meta["format"], "version": 2, "kind": "classify",
                                     "config": meta["config"] | {"dtype": "bfloat16"}}))
    with pytest.raises(ValueError, match=r"labram.json: config field dtype is a runtime setting"):
        load_model(tmp_path / "export")


def test_a_run_sets_the_runtime_of_the_tokenizer_it_loads(tmp_path):
    """Pretraining runs the frozen tokenizer of its tokenizer_checkpoint as it runs its own model (the original
    computes the targets under the step's autocast), whatever the export was made with."""
    from labram_jax.train.config import DataConfig, Experiment, RuntimeConfig, TrainConfig
    from labram_jax.train.trainer import Trainer

    tokenizer = configs.tokenizer_tiny(codebook_size=64)
    save_model(build(tokenizer, "tokenizer"), tmp_path / "vqnsp")
    exp = Experiment("pretrain", model=configs.tiny(vocab_size=64), tokenizer=tokenizer,
                     data=DataConfig(max_channels=4, max_patches=2), tokenizer_checkpoint=str(tmp_path / "vqnsp"),
                     train=TrainConfig(batch_size=8), runtime=RuntimeConfig(precision="bfloat16", remat="block"))
    trainer = Trainer(exp, tmp_path / "run")
    frozen = nnx.merge(trainer.tokenizer_graphdef, trainer.state["frozen"])
    assert [(t.dtype, t.remat) for t in (frozen.cfg.encoder, frozen.cfg.decoder)] == [("bfloat16", "block")] * 2
    # On a CPU the trainer also runs it with the chunked attention, as its own model.
    assert frozen.cfg == configs.with_runtime(tokenizer, dtype="bfloat16", remat="block", attention="chunked")

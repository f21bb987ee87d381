"""labram_jax.checkpoint: parameters-only Orbax exports of the three model kinds."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from labram_jax import configs
from labram_jax.checkpoint import export, is_export, load_model, save_model
from labram_jax.convert.state_dict import build

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
    loaded = load_model(tmp_path / "export")
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    ours, theirs = variables(model), variables(loaded)
    assert list(ours) == list(theirs)
    for key, (kind, value) in ours.items():
        assert theirs[key][0] is kind, key
        assert theirs[key][1].dtype == value.dtype, key
        np.testing.assert_array_equal(theirs[key][1], value, err_msg=key)
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

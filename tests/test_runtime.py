"""How a model runs has one home, the experiment's runtime block: a setting made anywhere else stops with one line
naming it, and what the block says is what every model of the run gets, in its saved config and compiled step."""
import dataclasses

import jax
import pytest

from labram_jax import configs
from labram_jax.cli import main
from labram_jax.errors import UserError
from labram_jax.recipes import finetune_eegmat
from labram_jax.scaling.grid import GridConfig
from labram_jax.train.config import DataConfig, Experiment, RuntimeConfig, TrainConfig, override
from labram_jax.train.trainer import Trainer, resolve_runtime


@pytest.mark.parametrize("key,home", [
    ("model.remat", "runtime.remat"), ("model.dtype", "runtime.precision"),
    ("model.scan_blocks", "runtime.scan_blocks"),
    ("model.attention", "runtime.attention"), ("tokenizer.encoder.attention", "runtime.tokenizer_attention"),
    ("tokenizer.decoder.attention", "runtime.tokenizer_attention"), ("tokenizer.decoder.remat", "runtime.remat"),
    ("train.remat", "runtime.remat"), ("train.precision", "runtime.precision"),
    ("train.scan_blocks", "runtime.scan_blocks"), ("train.matmul_precision", "runtime.matmul_precision")])
def test_a_runtime_setting_elsewhere_names_its_home(key, home):
    with pytest.raises(UserError, match=rf"^{key}: how the models run is set in the runtime block: use {home}$"):
        override(finetune_eegmat.config(), f"{key}=block")
    grid = GridConfig(pretrain=finetune_eegmat.config(), tokenizer=finetune_eegmat.config())
    with pytest.raises(UserError, match=rf"use pretrain\.{home}$"):
        override(grid, f"pretrain.{key}=block")


def test_the_cli_stops_before_anything_runs(tmp_path, capsys):
    assert main(["train", "finetune_eegmat", "--workdir", str(tmp_path / "w"), "--data", str(tmp_path),
                 "--set", "model.remat=block"]) == 2
    assert capsys.readouterr().err == ("error: model.remat: how the models run is set in the runtime block: "
                                       "use runtime.remat\n")
    assert not (tmp_path / "w").exists()


def test_a_model_config_that_disagrees_with_the_block_is_refused():
    exp = Experiment(stage="finetune", model=configs.tiny(num_classes=1, remat="block"))
    with pytest.raises(UserError, match=r"model.remat is 'block', .* set runtime.remat"):
        resolve_runtime(exp)
    # a resolved experiment (a saved config.json read back) resolves to itself
    resolved = resolve_runtime(exp.replace(model=configs.tiny(num_classes=1), runtime=RuntimeConfig(remat="block")))
    assert resolve_runtime(resolved) == resolved


def test_the_block_reaches_every_model_the_saved_config_and_the_step(tmp_path):
    pretrain = Experiment(stage="pretrain", model=configs.tiny(vocab_size=64),
                          tokenizer=configs.tokenizer_tiny(codebook_size=64))
    for remat in ("none", "block", "dots"):
        resolved = resolve_runtime(override(pretrain, f"runtime.remat={remat}", "runtime.precision=bfloat16"))
        models = (resolved.model, resolved.tokenizer.encoder, resolved.tokenizer.decoder)
        assert [(m.remat, m.dtype) for m in models] == [(remat, "bfloat16")] * 3
    # what ran is what the saved config says, and the compiled step keeps fewer activations under remat
    exp = Experiment(stage="finetune", model=configs.tiny(num_classes=1, depth=4),
                     data=DataConfig(max_channels=16, max_patches=4), train=TrainConfig(batch_size=16))
    temporaries = {}
    for remat in ("none", "block"):
        trainer = Trainer(override(exp, f"runtime.remat={remat}"), tmp_path / remat, abstract=True)
        saved = dataclasses.asdict(trainer.exp)
        assert saved["runtime"]["remat"] == saved["model"]["remat"] == remat
        temporaries[remat] = trainer.compiled_step().memory_analysis().temp_size_in_bytes
    assert temporaries["block"] < temporaries["none"], temporaries


def test_remat_auto_picks_what_fits_and_a_set_remat_that_does_not_stops(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("labram_jax.host.resident_bytes", lambda: 0)  # the host figures below are all there is
    exp = Experiment(stage="finetune", model=configs.tiny(num_classes=1, depth=4),
                     data=DataConfig(max_channels=16, max_patches=4), train=TrainConfig(batch_size=16))
    planned = {remat: Trainer(override(exp, f"runtime.remat={remat}"), tmp_path / remat).planned_bytes()[0]
               for remat in ("none", "block")}
    assert planned["block"] < planned["none"]
    # a host whose memory (less the tenth kept back) lies between the two
    between = (planned["block"] + planned["none"]) // 2
    monkeypatch.setattr("labram_jax.host.memory_bytes", lambda: int(between / 0.95) + 1)
    trainer = Trainer(exp, tmp_path / "auto")
    assert trainer.exp.runtime.remat == "auto" and trainer.exp.model.remat == "none"
    trainer.fit_memory()
    assert trainer.exp.runtime.remat == trainer.exp.model.remat == "block"
    out = capsys.readouterr().out
    assert out.startswith("runtime.remat auto: remat none: ") and "running with remat block" in out
    with pytest.raises(UserError, match=r"^runtime.remat=none: the train step does not fit \(remat none: .* GiB "
                                        r"available, \d+ bytes\): set a smaller train.batch_size"):
        Trainer(override(exp, "runtime.remat=none"), tmp_path / "none-set").fit_memory()
    # where everything fits, auto is none, and the run's config says so
    monkeypatch.setattr("labram_jax.host.memory_bytes", lambda: 2 ** 40)
    trainer = Trainer(exp, tmp_path / "roomy")
    trainer.fit_memory()
    assert trainer.exp.runtime.remat == "none" and capsys.readouterr().out == ""
    # what the process holds besides its arrays (Python, XLA's code) is not the step's to use
    monkeypatch.setattr("labram_jax.host.memory_bytes", lambda: 10 * 2 ** 30)
    monkeypatch.setattr("labram_jax.host.resident_bytes", lambda: 2 ** 30 + sum(
        a.on_device_size_in_bytes() for a in jax.live_arrays()))
    assert trainer.planned_bytes()[1] == int(0.95 * 10 * 2 ** 30) - 2 ** 30


def test_remat_auto_splits_the_batch_into_micro_batches_when_no_remat_fits(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("labram_jax.host.resident_bytes", lambda: 0)
    # batch 16 on the session's 8 devices: 2 micro-batches of 8 at most
    exp = Experiment(stage="finetune", model=configs.tiny(num_classes=1),
                     data=DataConfig(max_channels=16, max_patches=4), train=TrainConfig(batch_size=16))
    planned = {accum: Trainer(override(exp, "runtime.remat=block", f"train.grad_accum={accum}"),
                              tmp_path / str(accum)).planned_bytes()[0] for accum in (1, 2)}
    assert planned[2] < planned[1]
    monkeypatch.setattr("labram_jax.host.memory_bytes", lambda: int((planned[1] + planned[2]) // 2 / 0.95) + 1)
    trainer = Trainer(exp, tmp_path / "auto")
    trainer.fit_memory()
    assert trainer.exp.train.grad_accum == 2 and trainer.exp.runtime.remat == trainer.exp.model.remat == "block"
    assert trainer.exp.train.batch_size == 16  # the same batch, the same update: only split
    out = capsys.readouterr().out
    assert out.startswith("runtime.remat auto: remat none: ") and "remat block: " in out
    assert out.rstrip().endswith(" GiB") and "running with remat block, train.grad_accum 2: " in out
    # the tokenizer's codebook EMA moves once per batch: it is never split behind the user's back
    tokenizer = Experiment(stage="tokenizer", tokenizer=configs.tokenizer_tiny(codebook_size=64),
                           data=DataConfig(max_channels=16, max_patches=4), train=TrainConfig(batch_size=16))
    monkeypatch.setattr("labram_jax.host.memory_bytes", lambda: 1)
    with pytest.raises(UserError, match=r"remat block: [\d.]+ GiB; 0.00 GiB available"):
        Trainer(tokenizer, tmp_path / "tokenizer").fit_memory()

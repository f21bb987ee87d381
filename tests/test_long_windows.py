"""Windows past the original's caps: more than 16 one-second patches (time_embed rows) and more than 256 tokens.

A 16-row checkpoint fine-tuned on 20-s windows (its rows extended, said in one line), the same refused when
extension is off, a tokenizer and a model trained from scratch on 20-s windows, a 1,024-token window (64 channels x
16 s) through packed pretraining, and `labram prep --window 20` on the bundled recordings.
"""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from labram_jax import configs
from labram_jax.checkpoint import load_model, save_model
from labram_jax.convert.state_dict import resize_time_embed
from labram_jax.data.records import Window
from labram_jax.errors import UserError
from labram_jax.models.labram import LaBraM
from labram_jax.models.vqnsp import VQNSP
from labram_jax.train.config import DataConfig, Experiment, TrainConfig
from labram_jax.train.trainer import Trainer
from test_train import write_split

ONE = jax.devices()[:1]


def windows(folder, count: int, channels: int, seconds: int, seed: int = 0):
    """Noise windows of `channels` x `seconds` patches, half of them (label 1) with a 10 Hz rhythm."""
    rng = np.random.default_rng(seed)
    t = np.arange(seconds * 200) / 200
    made = []
    for i in range(count):
        signal = rng.normal(0, 10, (channels, seconds * 200)) + (i % 2) * 30 * np.sin(2 * np.pi * 10 * t)
        made.append(Window(signal=signal.reshape(channels, seconds, 200).astype(np.float32),
                           channel_rows=np.arange(1, channels + 1, dtype=np.int16),
                           channel_names=tuple(f"C{k}" for k in range(channels)), recording=f"long/{i}", start=0.0,
                           dataset="long", subject=f"S{i % 4}", label=i % 2))
    return write_split(folder, made)


def run(stage: str, folder, **changes) -> Experiment:
    """A tiny run of `stage` on `folder`'s 2-channel, 20-s windows: 2 steps of 4 windows."""
    return Experiment(stage=stage, model=configs.tiny(num_classes=1, vocab_size=64),
                      tokenizer=configs.tokenizer_tiny(codebook_size=64),
                      data=DataConfig(train=(str(folder),), max_channels=2, max_patches=20),
                      train=TrainConfig(steps=2, batch_size=4, log_every=1, save_every=1000)).replace(**changes)


def test_resized_rows_keep_the_learned_ones_where_they_stand():
    table = np.random.default_rng(0).normal(size=(1, 16, 5)).astype(np.float32)
    linear = resize_time_embed(table, 31, "linear")  # row 2j sits on learned row j
    np.testing.assert_array_equal(linear[:, ::2], table)
    np.testing.assert_allclose(linear[:, 1::2], (table[:, :-1] + table[:, 1:]) / 2, rtol=1e-6)
    held = resize_time_embed(table, 20, "hold")
    np.testing.assert_array_equal(held[:, :16], table)
    np.testing.assert_array_equal(held[:, 16:], np.repeat(table[:, -1:], 4, axis=1))
    np.testing.assert_array_equal(resize_time_embed(table, 12, "truncate"), table[:, :12])


def test_a_16_row_checkpoint_fine_tunes_on_20_s_windows(tmp_path, capsys):
    data = windows(tmp_path / "train", 8, channels=2, seconds=20)
    source = LaBraM(configs.tiny(num_classes=1), rngs=nnx.Rngs(1))
    export = save_model(source, tmp_path / "sixteen")
    learned = np.asarray(source.time_embed[...])

    trainer = Trainer(run("finetune", data, init=str(export)), tmp_path / "linear", devices=ONE)
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [f"windows of 20 s are longer than the model's 16 time_embed rows: model.time_rows=20; init "
                    f"{export}'s 16 learned time_embed rows extended to 20 (linear) (train.extend_time=linear; off "
                    "stops instead)"]
    np.testing.assert_allclose(np.asarray(trainer.state["params"]["time_embed"][...]),
                               resize_time_embed(learned, 20, "linear"), rtol=1e-6)
    trainer.train(progress=False)
    tuned = load_model(trainer.workdir / "export")
    assert tuned.cfg.time_rows == 20 and tuned.time_embed.shape == (1, 20, 100)
    assert json.loads((trainer.workdir / "export" / "labram.json").read_text())["config"]["time_rows"] == 20

    # "hold": the learned rows stay, so a window of at most 16 s gets exactly the checkpoint's outputs.
    held = Trainer(run("finetune", data, init=str(export), train=TrainConfig(extend_time="hold")),
                   tmp_path / "hold", devices=ONE).model()
    x = np.random.default_rng(2).normal(size=(3, 2, 10, 200)).astype(np.float32)
    chans = np.arange(3)
    np.testing.assert_array_equal(np.asarray(held(x, chans)), np.asarray(source(x, chans)))

    with pytest.raises(UserError, match=r"windows of 20 patches \(data.max_patches\) are longer than the model's 16 "
                                        r"time_embed rows and train.extend_time is off: set model.time_rows=20"):
        Trainer(run("finetune", data, init=str(export), train=TrainConfig(extend_time="off")), tmp_path / "off",
                devices=ONE)


def test_a_tokenizer_and_pretraining_from_scratch_on_20_s_windows(tmp_path, capsys):
    data = windows(tmp_path / "train", 8, channels=2, seconds=20)
    tokenizer = Trainer(run("tokenizer", data), tmp_path / "tokenizer", devices=ONE)
    assert "tokenizer.encoder.time_rows and tokenizer.decoder.time_rows=20" in capsys.readouterr().err
    tokenizer.train(progress=False)
    export = load_model(tokenizer.workdir / "export")
    assert export.cfg.encoder.time_rows == export.cfg.decoder.time_rows == 20

    pretrain = Trainer(run("pretrain", data, tokenizer_checkpoint=str(tokenizer.workdir / "export")),
                       tmp_path / "pretrain", devices=ONE)
    assert "model.time_rows=20" in capsys.readouterr().err
    assert np.isfinite(pretrain.train(progress=False)["loss"])


def test_a_16_row_tokenizer_serves_pretraining_on_longer_windows(tmp_path, capsys):
    data = windows(tmp_path / "train", 4, channels=2, seconds=18)
    tokenizer = save_model(VQNSP(configs.tokenizer_tiny(codebook_size=64), rngs=nnx.Rngs(0)), tmp_path / "tok")
    trainer = Trainer(run("pretrain", data, tokenizer_checkpoint=str(tokenizer),
                          data=DataConfig(train=(str(data),), max_channels=2, max_patches=18)),
                      tmp_path / "pretrain", devices=ONE)
    assert f"tokenizer {tokenizer}'s 16 learned time_embed rows extended to 18 (linear)" in capsys.readouterr().err
    assert np.isfinite(trainer.train(progress=False)["loss"])


@pytest.mark.slow
def test_a_1024_token_window_through_packed_pretraining(tmp_path):
    """64 channels x 16 s, four times the original's 256 tokens, packed one window a row, with the chunked
    attention of a CPU run."""
    data = windows(tmp_path / "train", 4, channels=64, seconds=16)
    tokenizer = save_model(VQNSP(configs.tokenizer_tiny(codebook_size=64), rngs=nnx.Rngs(0)), tmp_path / "tok")
    exp = run("pretrain", data, tokenizer_checkpoint=str(tokenizer),
              data=DataConfig(train=(str(data),), max_channels=64, max_patches=16, pack_tokens=1024,
                              pack_windows=1, pack_buffer=4),
              train=TrainConfig(steps=2, batch_size=2, log_every=1, save_every=1000))
    trainer = Trainer(exp, tmp_path / "pretrain", devices=ONE)
    assert trainer.exp.model.attention == "chunked"
    batch = trainer.abstract_batch()
    assert batch["x"].shape[:2] == (2, 1024)
    summary = trainer.train(progress=False)
    assert np.isfinite(summary["loss"]) and 0 <= summary["masked_accuracy"] <= 1


def test_conversion_keeps_refuses_or_truncates_the_rows(tmp_path, capsys):
    """An export keeps its 20 rows, and braindecode's Labram takes them all (n_times 3800); the original's layout
    (.pth, .safetensors) is refused in one line, or cut to the original's 16 rows on request."""
    from labram_jax.cli import main
    from labram_jax.convert import from_pytorch, read_pth

    model = LaBraM(configs.tiny(num_classes=1, time_rows=20), rngs=nnx.Rngs(3))
    export = save_model(model, tmp_path / "export")
    assert main(["convert", str(export), str(tmp_path / "bd"), "--to", "braindecode"]) == 0
    assert "n_times=3800" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "bd"), str(tmp_path / "back")]) == 0
    np.testing.assert_array_equal(np.asarray(load_model(tmp_path / "back").time_embed[...]),
                                  np.asarray(model.time_embed[...]))

    assert main(["convert", str(export), str(tmp_path / "m.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the model has 20 time_embed rows" in err and "--truncate-time" in err
    assert not (tmp_path / "m.pth").exists()
    assert main(["convert", str(export), str(tmp_path / "m.pth"), "--truncate-time"]) == 0
    stored = read_pth(tmp_path / "m.pth")["model"]["time_embed"]
    np.testing.assert_array_equal(stored, np.asarray(model.time_embed[...])[:, :16])
    assert from_pytorch(tmp_path / "m.pth").cfg.time_rows == 16
    assert main(["convert", str(export), str(tmp_path / "e2"), "--to", "export", "--truncate-time"]) == 2
    assert "--truncate-time applies only to a .pth or .safetensors output" in capsys.readouterr().err

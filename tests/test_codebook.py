"""A codebook that stays alive (issue 33): usage over a whole pass of the training windows, and the opt-in
dead-code restart (tokenizer.dead_code_restart).

The quantizer tests run NormEMAVectorQuantizer alone under nnx.jit on random codes; the trainer tests run a
2-block, 16- or 64-code tokenizer on a handful of synthetic windows of 2 to 4 channels (so that batches hold
padded patches) on one device.
"""
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from labram_jax import configs
from labram_jax.checkpoint import load_model, save_model
from labram_jax.convert import from_pytorch, state_dict, to_pytorch
from labram_jax.data.records import Window
from labram_jax.errors import UserError
from labram_jax.models.vqnsp import VQNSP, NormEMAVectorQuantizer, l2norm
from labram_jax.train.config import DataConfig, Experiment, TrainConfig, override
from labram_jax.train.trainer import Trainer
from test_train import PATCHES, write_split

ONE = jax.devices()[:1]
MAX_CHANNELS = 4


# -- data and runs -----------------------------------------------------------------------------------------------
def windows(count: int, seed: int = 0) -> list[Window]:
    """Noise windows of 2, 3 or 4 channels: grid batches of 4 channels pad the smaller ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        channels = 2 + i % 3
        out.append(Window(signal=rng.normal(0, 10, (channels, PATCHES, 200)).astype(np.float32),
                          channel_rows=np.arange(1, channels + 1, dtype=np.int16),
                          channel_names=tuple(f"C{k}" for k in range(channels)), recording=f"syn/{i}",
                          start=0.0, dataset="syn", subject=f"S{i % 2}", label=i % 2))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("codebook")
    write_split(root / "train", windows(10))
    write_split(root / "val", windows(3, seed=1))
    return root


def experiment(data: Path, **tokenizer) -> Experiment:
    return Experiment(stage="tokenizer", tokenizer=configs.tokenizer_tiny(**{"codebook_size": 16, **tokenizer}),
                      data=DataConfig(train=(str(data / "train"),), val=(str(data / "val"),),
                                      max_channels=MAX_CHANNELS, max_patches=PATCHES, eval_batch_size=4),
                      train=TrainConfig(steps=4, batch_size=4, lr=1e-3, min_lr=1e-4, log_every=1, save_every=2,
                                        eval_every=2))


def records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def host(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


# -- usage over a pass of the training windows ---------------------------------------------------------------------
def test_train_pass_counts_every_real_patch_of_the_training_windows(data, tmp_path):
    """The pass's usage and perplexity equal a numpy count of the codes that each training window gets alone,
    unpadded: batches of 4 (the last one padded with empty rows) and padded channels change nothing."""
    trainer = Trainer(experiment(data, kmeans_init=False), tmp_path, devices=ONE)
    got = trainer.train_pass()
    model = trainer.model()
    counts = np.zeros(16, np.int64)
    for w in windows(10):
        chans = jnp.asarray(np.concatenate([[0], w.channel_rows]), jnp.int32)[None]
        tokens = np.asarray(model.tokenize(jnp.asarray(w.signal)[None] / 100, chans))
        assert tokens.size == w.signal.shape[0] * PATCHES
        counts += np.bincount(tokens.reshape(-1), minlength=16)
    p = counts[counts > 0] / counts.sum()
    assert counts.sum() == sum(2 + i % 3 for i in range(10)) * PATCHES
    assert got["codebook_usage"] == pytest.approx((counts > 0).mean())
    assert got["codebook_perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)


def test_tokenizer_validation_logs_the_train_pass(data, tmp_path):
    """Every validation of a tokenizer run logs the pass (codebook_usage, codebook_perplexity) beside val/loss;
    every logged step keeps the per-batch statistics (batch_codebook_usage, batch_codebook_perplexity)."""
    Trainer(experiment(data), tmp_path, devices=ONE).train(progress=False)
    rows = records(tmp_path)
    passes = [r["step"] for r in rows if "codebook_usage" in r]
    assert passes == [r["step"] for r in rows if "val/loss" in r] == [2, 4]
    assert all(0 < r["codebook_usage"] <= 1 and r["codebook_perplexity"] >= 1
               for r in rows if "codebook_usage" in r)
    assert sum("batch_codebook_usage" in r for r in rows) == 4


# -- the dead-code restart -----------------------------------------------------------------------------------------
def quantizer(**changes) -> NormEMAVectorQuantizer:
    with nnx.use_eager_sharding(False):
        return NormEMAVectorQuantizer(configs.tokenizer_tiny(**{"codebook_size": 64, "kmeans_init": False,
                                                                **changes}), nnx.Rngs(0))


@nnx.jit
def train_call(q: NormEMAVectorQuantizer, z: jax.Array, padding: jax.Array, rng: jax.Array):
    return q(z, padding=padding, train=True, rng=rng)


def clustered(rng: int, centres: jax.Array, n: int = 96) -> jax.Array:
    """n codes near a few centres: most of a random codebook is never the nearest."""
    k1, k2 = jax.random.split(jax.random.key(rng))
    pick = jax.random.randint(k1, (n,), 0, centres.shape[0])
    return (centres[pick] + 0.01 * jax.random.normal(k2, (n, centres.shape[1]))).reshape(4, n // 4, -1)


def test_restart_off_is_todays_quantizer():
    """dead_code_restart=0 adds no state (the original's five tensors), and a restart that never fires leaves the
    outputs and every EMA buffer exactly as they are without it."""
    off, never = quantizer(), quantizer(dead_code_restart=10 ** 6)
    assert {k for k, _ in nnx.to_flat_state(nnx.state(off))} == {
        ("cluster_size",), ("embedding", "weight"), ("embedding", "cluster_size"), ("embedding", "embed_avg"),
        ("embedding", "initted")}
    centres = l2norm(jax.random.normal(jax.random.key(9), (3, 64)))
    padding = jnp.ones((4, 24), bool).at[:, 20:].set(False)
    for step in range(3):
        z = clustered(step, centres)
        for a, b in zip(train_call(off, z, padding, jax.random.key(step)),
                        train_call(never, z, padding, jax.random.key(step))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for key, value in host(nnx.state(off)).items():
            np.testing.assert_array_equal(host(nnx.state(never))[key], value, err_msg=key)


@pytest.mark.parametrize("seeds", ["random", "farthest"])
def test_dead_codes_are_reseeded_from_real_patches_after_k_steps(seeds):
    """With K=3, codes no real patch picked for 3 updates take real patches of the batch (l2-normalised, never a
    padded one) at the third; before that they keep their vectors. Usage over the data then rises, and the same
    rng gives the same codebook."""
    q = quantizer(dead_code_restart=3, dead_code_seeds=seeds)
    centres = l2norm(jax.random.normal(jax.random.key(9), (3, 64)))
    padding = jnp.ones((4, 24), bool).at[:, 20:].set(False)
    zs = [clustered(step, centres).at[:, 20:].set(-centres[0]) for step in range(3)]  # padding: a marker

    def usage():
        ids = np.concatenate([np.asarray(q(z, padding=padding)[2])[np.asarray(padding)] for z in zs])
        return len(np.unique(ids)) / 64

    before, start = usage(), np.asarray(q.embedding.weight[...])
    train_call(q, zs[0], padding, jax.random.key(0))
    used = np.asarray(q.unused_steps[...]) == 0
    assert 0 < used.sum() <= 6
    train_call(q, zs[1], padding, jax.random.key(1))
    dead = np.asarray(q.unused_steps[...]) == 2
    np.testing.assert_allclose(np.asarray(q.embedding.weight[...])[dead], start[dead], atol=1e-6)  # only renormalised
    train_call(q, zs[2], padding, jax.random.key(2))
    weight = np.asarray(q.embedding.weight[...])
    patches = np.asarray(l2norm(zs[2][:, :20])).reshape(-1, 64)
    for code in np.flatnonzero(dead):
        assert np.abs(patches - weight[code]).max(1).min() < 1e-6, code  # a real patch of the last batch
    assert np.abs(weight - np.asarray(l2norm(-centres[0]))).max(1).min() > 0.1  # no padded patch
    assert (np.asarray(q.unused_steps[...])[dead] == 0).all()
    np.testing.assert_array_equal(np.asarray(q.embedding.cluster_size[...])[dead], 1.0)
    np.testing.assert_array_equal(np.asarray(q.embedding.embed_avg[...])[dead], weight[dead])
    after = usage()
    assert after > 2 * before, (before, after)
    again = quantizer(dead_code_restart=3, dead_code_seeds=seeds)
    for step in range(3):
        train_call(again, zs[step], padding, jax.random.key(step))
    np.testing.assert_array_equal(np.asarray(again.embedding.weight[...]), weight)


def test_farthest_seeds_take_the_worst_quantised_patches_first():
    q = quantizer(dead_code_restart=1, dead_code_seeds="farthest")
    centres = l2norm(jax.random.normal(jax.random.key(9), (3, 64)))
    z, padding = clustered(0, centres), jnp.ones((4, 24), bool)
    codebook = np.asarray(q.embedding.weight[...])
    _, _, ids = train_call(q, z, padding, jax.random.key(0))
    flat = np.asarray(l2norm(z)).reshape(-1, 64)
    error = 1 - (flat * codebook[np.asarray(ids).reshape(-1)]).sum(1)
    dead = np.flatnonzero(np.bincount(np.asarray(ids).reshape(-1), minlength=64) == 0)
    expected = flat[np.argsort(-error, kind="stable")][:len(dead)]
    np.testing.assert_allclose(np.asarray(q.embedding.weight[...])[dead], expected, atol=1e-6)


def test_a_bad_restart_setting_names_its_key():
    with pytest.raises(UserError, match="tokenizer.dead_code_restart"):
        override(Experiment("tokenizer"), "tokenizer.dead_code_restart=-1")
    with pytest.raises(UserError, match="random, farthest"):
        override(Experiment("tokenizer"), "tokenizer.dead_code_seeds=nearest")


# -- the counter in checkpoints, exports and .pth files ------------------------------------------------------------
def test_a_run_with_restarts_resumes_bit_exactly(data, tmp_path):
    """A restarting run killed after its step-2 checkpoint and rerun ends with the state, counter included, of
    the same run uninterrupted; the restarts did fire."""
    exp = experiment(data, dead_code_restart=1)
    whole = Trainer(exp, tmp_path, devices=ONE)
    whole.train(progress=False)
    expected = host(whole.state)
    assert "['rest']['quantize']['unused_steps']" in " ".join(expected)
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    again = Trainer(exp, tmp_path, devices=ONE)
    again.train(progress=False)
    got = host(again.state)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_the_counter_stays_out_of_the_pth_and_in_the_export(tmp_path):
    """A .pth holds the original's keys only, and loads back (as a tokenizer without restarts); an export keeps
    the counter and the setting."""
    model = VQNSP(configs.tokenizer_tiny(codebook_size=16, dead_code_restart=5), rngs=nnx.Rngs(0))
    model.quantize.unused_steps[...] = jnp.arange(16, dtype=jnp.int32)
    plain = VQNSP(configs.tokenizer_tiny(codebook_size=16), rngs=nnx.Rngs(0))
    assert list(state_dict(model)) == list(state_dict(plain))
    to_pytorch(model, tmp_path / "vqnsp.pth")
    back = from_pytorch(tmp_path / "vqnsp.pth", "tokenizer")
    assert back.cfg.dead_code_restart == 0
    for key, value in state_dict(model).items():
        np.testing.assert_array_equal(state_dict(back)[key], value, err_msg=key)
    loaded = load_model(save_model(model, tmp_path / "export"))
    assert loaded.cfg.dead_code_restart == 5
    np.testing.assert_array_equal(np.asarray(loaded.quantize.unused_steps[...]), np.arange(16))

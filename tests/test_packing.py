"""Packing: windows of different montages and lengths share a row of tokens and come out as they do alone.

Rows hold windows cut from the parity fixture's real recordings (23, 12 and 6 channels x 4, 3 and 3 patches, with
their own channel rows), trailing padding and an empty window slot; the models run on the original's weights.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from labram_jax import configs, from_pytorch, mem_loss
from labram_jax.data.pipeline import (LoaderConfig, first_fit_decreasing, make_dataset, restore_state,
                                      save_state)
from labram_jax.data.records import Window
from labram_jax.data.shards import DatasetStats, write_manifest, write_shard
from labram_jax.models.layers import attention_with_dropout, fused_attention, softmax_attention
from labram_jax.models.packing import Packing
from labram_jax.train.config import DataConfig, Experiment, TrainConfig
from labram_jax.train.stages import random_mask
from labram_jax.train.trainer import Trainer

FIXTURES = Path(__file__).parent / "fixtures" / "reference_tiny"
T, W = 160, 4  # tokens and window slots per row


@pytest.fixture(scope="module")
def windows() -> list[tuple[np.ndarray, np.ndarray]]:
    """Three windows of different montages and lengths: (signal [n, a, 200], input_chans [n+1])."""
    inputs = np.load(FIXTURES / "inputs.npz")
    x, chans = inputs["x"], inputs["input_chans"].astype(np.int32)
    return [(x[0], chans),
            (x[1, 4:16, :3], np.concatenate([[0], chans[5:17]]).astype(np.int32)),
            (x[0, 17:, 1:], np.concatenate([[0], chans[18:]]).astype(np.int32))]


# Row 0 holds all three windows (146 tokens, 14 padding, one empty slot); row 1 two of them in another order.
LAYOUT = [[0, 1, 2], [2, 0]]


def pack(windows, layout=LAYOUT) -> tuple[jax.Array, Packing, list[list[slice]]]:
    """Packed rows x [B, T, 200] with their Packing, and where each window's tokens lie in its row."""
    x = np.zeros((len(layout), T, 200), np.float32)
    segments = np.full((len(layout), T), -1, np.int32)
    channels, times = np.zeros_like(segments), np.zeros_like(segments)
    spans = []
    for r, row in enumerate(layout):
        start, spans_r = 0, []
        for slot, i in enumerate(row):
            signal, chans = windows[i]
            n, a = signal.shape[:2]
            span = slice(start, start + n * a)
            x[r, span] = signal.reshape(n * a, 200)
            segments[r, span] = slot
            channels[r, span] = np.repeat(chans[1:], a)
            times[r, span] = np.tile(np.arange(a), n)
            spans_r.append(span)
            start = span.stop
        spans.append(spans_r)
    packing = Packing(jnp.asarray(segments), jnp.asarray(channels), jnp.asarray(times), W)
    return jnp.asarray(x), packing, spans


def alone(windows, i):
    signal, chans = windows[i]
    return jnp.asarray(signal[None]), jnp.asarray(chans)


@pytest.fixture(scope="module")
def models():
    return {kind: from_pytorch(FIXTURES / f"{name}.pth", kind=kind)
            for kind, name in (("classify", "finetune"), ("tokenizer", "tokenizer"), ("pretrain", "pretrain"))}


# Jitted: an eager call of these models costs more than its compilation.
@nnx.jit
def classify(model, x, chans, packing=None):
    return model(x, chans, packing=packing), model.patch_features(x, chans, packing=packing)


@nnx.jit
def tokenizer_terms(model, x, chans, packing=None):
    return model(x, chans, packing=packing)


@nnx.jit
def mem_terms(model, x, chans, mask, tokens, packing=None):
    rec, rec_sym = model(x, chans, mask, packing=packing)
    return rec, rec_sym, mem_loss(rec, rec_sym, tokens, mask, packing=packing)


@pytest.fixture(scope="module")
def tokenized(models, windows):
    """The tokenizer's outputs for each window alone and for the packed rows."""
    x, packing, _ = pack(windows)
    return ([tokenizer_terms(models["tokenizer"], *alone(windows, i)) for i in range(len(windows))],
            tokenizer_terms(models["tokenizer"], x, None, packing))


def test_classifier_packed_equals_alone(models, windows):
    x, packing, spans = pack(windows)
    logits, features = classify(models["classify"], x, None, packing)
    assert logits.shape == (2, W, 6)
    single = [classify(models["classify"], *alone(windows, i)) for i in range(len(windows))]
    for r, row in enumerate(LAYOUT):
        for slot, i in enumerate(row):
            np.testing.assert_allclose(logits[r, slot], single[i][0][0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(features[r, spans[r][slot]], single[i][1][0], rtol=1e-5, atol=1e-5)


def test_tokenizer_packed_equals_alone(windows, tokenized):
    _, packing, spans = pack(windows)
    single, packed = tokenized
    for r, row in enumerate(LAYOUT):
        for slot, i in enumerate(row):
            np.testing.assert_array_equal(packed["tokens"][r, spans[r][slot]], single[i]["tokens"][0])
            np.testing.assert_allclose(packed["rec"][r, spans[r][slot]], single[i]["rec"][0], rtol=1e-5,
                                       atol=1e-5)
            for term in ("emb_loss", "rec_loss", "rec_angle_loss", "loss"):
                np.testing.assert_allclose(packed[term][r, slot], single[i][term], rtol=1e-5, err_msg=term)
    # The empty slot of row 0 and the two of row 1 score nothing; the batch's loss is the mean over windows.
    assert np.asarray(packing.windows()).tolist() == [[True, True, True, False], [True, True, False, False]]
    np.testing.assert_allclose(packing.average(packed["loss"]),
                               np.mean([single[i]["loss"] for row in LAYOUT for i in row]), rtol=1e-5)


def test_pretraining_packed_equals_alone(models, windows, tokenized):
    x, packing, spans = pack(windows)
    single_tokens, packed_tokens = tokenized
    masks = [random_mask(jax.random.key(i), jnp.ones((1,) + windows[i][0].shape[:2], bool), 0.5)
             for i in range(len(windows))]
    single = [mem_terms(models["pretrain"], *alone(windows, i), masks[i], single_tokens[i]["tokens"])
              for i in range(len(windows))]
    mask = np.zeros((2, T), bool)
    for r, row in enumerate(LAYOUT):
        for slot, i in enumerate(row):
            mask[r, spans[r][slot]] = np.asarray(masks[i][0])
    logits, same, losses = mem_terms(models["pretrain"], x, None, jnp.asarray(mask), packed_tokens["tokens"],
                                     packing)
    assert logits.shape == (2, T, 512)
    np.testing.assert_array_equal(logits, same)
    for r, row in enumerate(LAYOUT):
        for slot, i in enumerate(row):
            rec, rec_sym, single_loss = single[i]
            got, chosen = logits[r, spans[r][slot]], np.asarray(masks[i][0])
            np.testing.assert_allclose(got[chosen], rec[0], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got[~chosen], rec_sym[0], rtol=1e-5, atol=1e-5)
            for term in ("loss_rec", "loss_rec_sym", "loss"):
                np.testing.assert_allclose(losses[term][r, slot], single_loss[term], rtol=1e-5, err_msg=term)


def test_random_mask_masks_each_window_as_alone():
    # Windows of 92, 36, 7 and 1 patches in one row of 160, and a row of one 50-patch window.
    sizes = [[92, 36, 7, 1], [50]]
    segments = np.full((2, T), -1, np.int32)
    for r, row in enumerate(sizes):
        segments[r, :sum(row)] = np.repeat(np.arange(len(row)), row)
    for ratio in (0.5, 0.3):
        masked = np.asarray(jax.jit(random_mask, static_argnums=2)(jax.random.key(1), jnp.asarray(segments), ratio))
        assert not masked[segments < 0].any()
        for r, row in enumerate(sizes):
            for slot, size in enumerate(row):
                assert masked[r][segments[r] == slot].sum() == size - int(size * (1 - ratio))
    # A padded grid batch is one window per row, masked as before packing existed: the real patches with the
    # largest noise of the same draw.
    padding = jnp.asarray(segments >= 0).reshape(2, 10, 16)
    grid = np.asarray(random_mask(jax.random.key(2), padding, 0.5))
    real = np.asarray(padding).reshape(2, -1)
    noise = np.where(real, np.asarray(jax.random.uniform(jax.random.key(2), real.shape)), np.inf)
    rank = np.argsort(np.argsort(noise, axis=1, kind="stable"), axis=1, kind="stable")
    np.testing.assert_array_equal(grid, real & (rank >= np.floor(real.sum(1, keepdims=True) * 0.5)))


def test_block_diagonal_attention_in_every_path(windows):
    _, packing, _ = pack(windows)
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, T + W, 5, 8))
    mask = packing.attention_mask()
    paths = {"softmax": lambda q, k, v: softmax_attention(q, k, v, mask),
             # plain autodiff of the explicit softmax (dropout rate 0): the reference
             "reference": lambda q, k, v: attention_with_dropout(q, k, v, 0.0, jax.random.key(1), mask),
             # the fused path (cuDNN on GPUs) takes the same mask; here XLA's implementation, head dim padded
             "fused": lambda q, k, v: fused_attention(q, k, v, "xla", head_multiple=16, mask=mask)}
    outputs = {name: jax.jit(f)(q, k, v) for name, f in paths.items()}
    for name in ("softmax", "fused"):
        np.testing.assert_allclose(outputs[name], outputs["reference"], rtol=1e-5, atol=1e-6, err_msg=name)
    # Nothing crosses windows: changing every other token leaves window 0 (and its cls) as it was.
    window0 = np.concatenate([[True, False, False, False], np.asarray(packing.segments[0] == 0)])
    shifted = paths["softmax"](q, k.at[0, ~window0].add(1.0), v.at[0, ~window0].add(1.0))
    np.testing.assert_allclose(shifted[0, window0], outputs["softmax"][0, window0], rtol=1e-5, atol=1e-6)
    grads = [jax.jit(jax.grad(lambda *a: (f(*a) ** 2).sum(), argnums=(0, 1, 2)))(q, k, v)
             for f in (paths["softmax"], paths["reference"])]
    for ours, ref in zip(*grads):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_drop_path_draws_per_window_in_a_packed_row(scan):
    """Stochastic depth drops a window, not a packed row: within a window every token is kept or dropped
    together, and the windows of one row are drawn independently, at the block's rate."""
    from labram_jax.models.labram import LaBraM

    rows, rate = 64, 0.5
    layout = [[0, 1, 2]] * rows  # three windows of 40 tokens, then padding
    segments = np.full((rows, T), -1, np.int32)
    for slot in range(3):
        segments[:, 40 * slot:40 * (slot + 1)] = slot
    packing = Packing(jnp.asarray(segments), jnp.zeros((rows, T), jnp.int32), jnp.zeros((rows, T), jnp.int32), W)
    # depth 2: the first block's drop-path rate is 0 (torch.linspace), the second's is the model's rate
    model = LaBraM(configs.tiny(depth=2, drop_path_rate=rate, scan_blocks=scan), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (rows, W + T, model.cfg.embed_dim))
    first = model.blocks[0](x, packing.attention_mask())
    out = model.run_blocks(x, None, jax.random.key(2), packing=packing)
    # both branches of the second block dropped: its output is its input, token for token
    unchanged = np.asarray(jnp.abs(out - first).max(-1) < 1e-4)  # [B, W+T]; a kept branch moves it by 2e-3 or more
    sequence = np.asarray(packing.sequence())
    dropped = np.zeros((rows, len(layout[0])), bool)
    for slot in range(3):
        tokens = unchanged[sequence == slot].reshape(rows, -1)
        assert (tokens == tokens[:, :1]).all(), f"window {slot}: tokens of one window dropped apart"
        dropped[:, slot] = tokens[:, 0]
    # P(both branches dropped) = rate^2 = 0.25 per window, drawn per window: rows whose windows disagree
    assert 0.1 < dropped.mean() < 0.4, dropped.mean()
    assert (dropped.any(axis=1) & ~dropped.all(axis=1)).mean() > 0.2, "the windows of a row drop together"


# -- the loader ---------------------------------------------------------------------------------------------------
# Montages cut from the fixture's real 23-channel recordings: (channels, patches), cycled over the windows.
MONTAGES = [(23, 4), (12, 3), (6, 2), (19, 4), (4, 4), (23, 1)]


def real_window(i: int, dataset: str) -> Window:
    """Window i of a montage from MONTAGES, its label i (so a batch tells which window each slot holds)."""
    inputs = np.load(FIXTURES / "inputs.npz")
    n, a = MONTAGES[i % len(MONTAGES)]
    rows = inputs["input_chans"][1:].astype(np.int16)
    offset = i % (24 - n)
    signal = np.roll(inputs["x"][i % 2] * 100, i, axis=-1)[offset:offset + n, :a]  # µV, as in a shard
    return Window(signal=signal.astype(np.float32), channel_rows=rows[offset:offset + n],
                  channel_names=tuple(map(str, inputs["ch_names"][offset:offset + n])), recording=f"{dataset}/{i}",
                  start=0.0, dataset=dataset, label=i)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> dict[str, list[Path]]:
    """Two sources of 20 real windows each (ids 0-19 and 100-119) in shards of 7."""
    root = tmp_path_factory.mktemp("mixture")
    sources = {}
    for name, first in (("a", 0), ("b", 100)):
        folder = root / name
        folder.mkdir()
        ids = list(range(first, first + 20))
        for s in range(0, 20, 7):
            write_shard(folder / f"{name}-{s:03d}.array_record", [real_window(i, name) for i in ids[s:s + 7]])
        sources[name] = [folder]
    return sources


def loader(**kwargs) -> LoaderConfig:
    return LoaderConfig(**{"batch_size": 4, "max_channels": 23, "max_patches": 4, "seed": 5, "pack_tokens": 96,
                           "pack_windows": 3, "pack_buffer": 7, **kwargs})


ONE = {"process_index": 0, "process_count": 1}


def slots(batch) -> list[int]:
    """The window id of every filled slot of a batch, row by row."""
    return batch["label"][batch["valid"]].tolist()


def test_packed_rows_hold_whole_windows(mixture):
    batches = list(itertools.islice(iter(make_dataset(mixture, loader(), **ONE)), 6))
    for batch in batches:
        assert batch["x"].shape == (4, 96, 200) and batch["valid"].shape == (4, 3)
        for r in range(4):
            segments = batch["segments"][r]
            used = int(batch["valid"][r].sum())
            assert batch["valid"][r].tolist() == [True] * used + [False] * (3 - used)
            # Windows lie one after another in slot order, padding only at the end.
            assert np.all(np.diff(segments[segments >= 0]) >= 0) and np.all(segments[(segments >= 0).sum():] < 0)
            np.testing.assert_array_equal(batch["mask"][r], segments >= 0)
            for slot in range(used):
                i = int(batch["label"][r, slot])
                w = real_window(i, "a" if i < 100 else "b")
                n, a = w.signal.shape[:2]
                mine = segments == slot
                np.testing.assert_allclose(batch["x"][r][mine], w.signal.reshape(n * a, 200) / 100, rtol=1e-6)
                np.testing.assert_array_equal(batch["token_channels"][r][mine], np.repeat(w.channel_rows, a))
                np.testing.assert_array_equal(batch["token_times"][r][mine], np.tile(np.arange(a), n))
                assert batch["dataset"][r, slot] == (i >= 100)


def test_packing_takes_every_window_once_and_splits_processes(mixture):
    # One chunk of the whole epoch (40 windows): its rows hold each window exactly once.
    seen = []
    for batch in make_dataset(mixture, loader(pack_buffer=40), **ONE):
        seen += slots(batch)
        if len(seen) >= 40:
            break
    assert sorted(seen[:40]) == list(range(20)) + list(range(100, 120))
    # Two processes: each packs its own 20 windows, together all 40.
    shares = []
    for index in range(2):
        share = []
        for batch in make_dataset(mixture, loader(batch_size=4, pack_buffer=20), process_index=index,
                                  process_count=2):
            assert batch["x"].shape[0] == 2
            share += slots(batch)
            if len(share) >= 20:
                break
        shares.append(set(share[:20]))
        assert len(shares[-1]) == 20
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == 40


def test_packing_is_seeded_and_resumes_exactly(mixture):
    def ids(iterator, count):
        return [slots(b) for b in itertools.islice(iterator, count)]

    assert ids(iter(make_dataset(mixture, loader(), **ONE)), 5) == ids(iter(make_dataset(mixture, loader(), **ONE)), 5)
    assert ids(iter(make_dataset(mixture, loader(), **ONE)), 5) != ids(
        iter(make_dataset(mixture, loader(seed=6), **ONE)), 5)
    first = iter(make_dataset(mixture, loader(), **ONE))
    ids(first, 3)  # chunks of 7 windows end inside batches
    state = save_state(first)
    later = list(itertools.islice(first, 4))
    resumed = iter(make_dataset(mixture, loader(), **ONE))
    restore_state(resumed, state)
    for a, b in zip(later, itertools.islice(resumed, 4)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_packed_padding_share_is_small(mixture):
    # The grid pads every window to 23 x 4 = 92 tokens; packing fills rows of 96 far better.
    batches = list(itertools.islice(iter(make_dataset(mixture, loader(pack_buffer=40), **ONE)), 4))
    real = sum(int(b["mask"].sum()) for b in batches)
    assert 1 - real / sum(b["mask"].size for b in batches) < 0.15


def test_packing_errors_name_the_window_and_the_setting(mixture):
    with pytest.raises(ValueError, match=r"'a/\d+' at 0 s has 23 channels x 4 patches, more than the loader's "
                                         r"pack_tokens=50"):
        next(iter(make_dataset(mixture, loader(pack_tokens=50), **ONE)))
    with pytest.raises(ValueError, match=r"pack_tokens needs an endless stream \(num_epochs=None\)"):
        make_dataset(mixture, loader(num_epochs=1), **ONE)
    with pytest.raises(ValueError, match="pack_windows >= 1"):
        loader(pack_windows=0)


def test_first_fit_decreasing():
    assert first_fit_decreasing([5, 9, 3, 4, 1, 8], 10, 2) == [[1, 4], [5], [0, 3], [2]]
    assert first_fit_decreasing([5, 9, 3, 4, 1, 8], 10, 3) == [[1, 4], [5], [0, 3], [2]]
    assert first_fit_decreasing([2, 2, 2, 2], 10, 3) == [[0, 1, 2], [3]]


# -- training -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "tokenizer"])
def test_packed_training_on_a_mixture(mixture, stage, tmp_path):
    exp = Experiment(
        stage=stage, model=configs.tiny(vocab_size=512), tokenizer=configs.tokenizer_tiny(),
        data=DataConfig(train=tuple(str(p[0]) for p in mixture.values()), max_channels=23, max_patches=4,
                        pack_tokens=96, pack_windows=3, pack_buffer=16),
        train=TrainConfig(steps=3, batch_size=4, lr=1e-3, min_lr=1e-4, log_every=1, save_every=1000),
        tokenizer_checkpoint=str(FIXTURES / "tokenizer.pth") if stage == "pretrain" else "")
    trainer = Trainer(exp, tmp_path, devices=jax.devices()[:1])
    before = jax.device_get(trainer.state["params"])
    abstract = trainer.abstract_batch()
    batch = next(iter(make_dataset({str(p): [p] for p in exp.data.train}, trainer.loader_config(4))))
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), before,
                         jax.device_get(trainer.state["params"]))
    assert max(jax.tree.leaves(moved)) > 0


def shaped_window(i: int, channels: int, patches: int, dataset: str) -> Window:
    """Window i of the fixture's real recordings cut to `channels` x `patches`."""
    inputs = np.load(FIXTURES / "inputs.npz")
    signal = np.roll(inputs["x"][i % 2] * 100, i, axis=-1)[:channels, :patches]
    return Window(signal=signal.astype(np.float32), channel_rows=inputs["input_chans"][1:channels + 1].astype(np.int16),
                  channel_names=tuple(map(str, inputs["ch_names"][:channels])), recording=f"{dataset}/{i}",
                  start=0.0, dataset=dataset, label=i)


@pytest.fixture(scope="module")
def built_mixture(tmp_path_factory) -> tuple[Path, Path]:
    """Two built folders with manifests, as `labram prep` leaves them: 20 windows of 23 channels x 4 s (92 tokens:
    one to a row of 96) and 20 of 6 channels x 2 s (12 tokens: three to a row)."""
    root = tmp_path_factory.mktemp("built-mixture")
    folders = []
    for name, channels, patches in (("long", 23, 4), ("short", 6, 2)):
        windows = [shaped_window(i, channels, patches, name) for i in range(20)]
        stats = DatasetStats()
        for window in windows:
            stats.add(window)
        (root / name).mkdir()
        write_shard(root / name / f"{name}-00000.array_record", windows)
        write_manifest(root / name, {name: stats}, {"sfreq": 200.0, "window_s": patches})
        folders.append(root / name)
    return tuple(folders)


def test_packed_epoch_sees_every_window_once(built_mixture, tmp_path):
    """train.epochs=1 with packing: the budget counts the rows the windows pack into, not one window a row, and
    the run logs the real windows and patch tokens it has seen (cumulative, padding left out)."""
    from labram_jax.train.launch import resolve_epochs

    exp = Experiment(
        stage="tokenizer", tokenizer=configs.tokenizer_tiny(),
        data=DataConfig(train=tuple(map(str, built_mixture)), max_channels=23, max_patches=4, pack_tokens=96,
                        pack_windows=3, pack_buffer=16),
        train=TrainConfig(epochs=1.0, batch_size=4, lr=1e-3, min_lr=1e-4, log_every=1, save_every=1000))
    exp = resolve_epochs(exp)
    Trainer(exp, tmp_path, devices=jax.devices()[:1]).train(progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    seen = [(r["windows_seen"], r["tokens_seen"]) for r in records if "loss" in r]
    assert len(seen) == exp.train.steps
    windows, tokens = seen[-1]
    # 40 windows in about 27 rows: 6 steps of 4 rows; within one batch (4 rows of at most 3 windows)
    assert abs(windows - 40) <= 4 * 3, (exp.train.steps, windows)
    # every window seen is a whole window of 92 or 12 real tokens
    assert any(tokens == 92 * k + 12 * (windows - k) for k in range(windows + 1)), (windows, tokens)
    assert all(b > a for (a, _), (b, _) in zip(seen, seen[1:]))


def test_a_window_over_pack_tokens_stops_before_the_first_step(built_mixture, tmp_path):
    """A mixed corpus whose long windows (92 tokens) exceed pack_tokens=64: one line naming the folder, the
    window's shape and the setting, before any step, wherever the shuffle would first have met one."""
    from labram_jax.errors import UserError

    exp = Experiment(
        stage="tokenizer", tokenizer=configs.tokenizer_tiny(),
        data=DataConfig(train=tuple(map(str, built_mixture)), max_channels=23, max_patches=4, pack_tokens=64),
        train=TrainConfig(steps=3, batch_size=4, log_every=1, save_every=1000))
    with pytest.raises(UserError, match=rf"^data.train: {built_mixture[0]} holds windows of 23 channels x 4 "
                                        r"patches \(92 tokens\), more than data.pack_tokens=64$"):
        Trainer(exp, tmp_path, devices=jax.devices()[:1]).train(progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()

"""The grain loader: padded fixed-shape batches, exact resume, per-process sharding, mixtures, full evaluation."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from labram_jax.data.pipeline import LoaderConfig, eval_dataset, make_dataset, restore_state, save_state, window_source
from labram_jax.data.records import Window
from labram_jax.data.shards import write_shard
from labram_jax.errors import UserError
from conftest import FAST_COMPILE

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(2, 1), (3, 2), (5, 3), (4, 3)]  # (channels, patches), cycled over the windows


def window(i: int, dataset: str = "a", shape: tuple[int, int] | None = None, dtype=np.float32, label="auto") -> Window:
    """Window i: signal[n, a, :] = 1000 i + 10 n + a, so any batch row tells which record and where it came from."""
    i = int(i)
    n, a = shape or SHAPES[i % len(SHAPES)]
    signal = (1000 * i + 10 * np.arange(n)[:, None, None] + np.arange(a)[None, :, None]) * np.ones(200)
    labels = [i % 3, float(i) / 2, None]
    return Window(signal=signal.astype(dtype), channel_rows=(np.arange(n) * 7 + i % 5 + 1).astype(np.int16),
                  channel_names=tuple(f"C{k}" for k in range(n)), recording=f"{dataset}/rec{i}", start=float(i),
                  dataset=dataset, label=labels[i % 3] if label == "auto" else label)


def write(folder: Path, ids, dataset="a", per_shard=7, **kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ids = list(ids)
    for s in range(0, len(ids), per_shard):
        write_shard(folder / f"{dataset}-{s // per_shard:03d}.array_record",
                    [window(i, dataset, **kwargs) for i in ids[s:s + per_shard]])
    return folder


def ids_of(batch) -> np.ndarray:
    """Record id of each valid row (the value of its first sample)."""
    return (np.rint(batch["x"][:, 0, 0, 0] * 100) // 1000).astype(int)[batch["valid"]]


def take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


def cfg(**kwargs) -> LoaderConfig:
    return LoaderConfig(**{"batch_size": 4, "max_channels": 6, "max_patches": 4, "seed": 3, **kwargs})


ONE = {"process_index": 0, "process_count": 1}


def test_window_source_accepts_files_and_folders(tmp_path):
    folder = write(tmp_path / "a", range(15))
    files = sorted(folder.glob("*.array_record"))
    assert len(window_source(folder)) == len(window_source(files)) == len(window_source([files[0], folder])) - 7 == 15
    (tmp_path / "empty").mkdir()
    for missing in ("empty", "nowhere"):
        with pytest.raises(UserError, match=missing):
            window_source(tmp_path / missing)


def test_batch_fields_padding_and_scaling(tmp_path):
    folder = write(tmp_path / "a", range(10))
    seen = set()
    for batch in eval_dataset([folder], cfg(), **ONE):
        assert batch["x"].shape == (4, 6, 4, 200) and batch["x"].dtype == np.float32
        assert batch["input_chans"].shape == (4, 7) and batch["input_chans"].dtype == np.int32
        assert batch["mask"].shape == (4, 6, 4) and batch["mask"].dtype == bool
        for key in ("token_channels", "token_times"):
            assert batch[key].shape == (4, 24) and batch[key].dtype == np.int32
        for key, dtype in [("label", np.int32), ("target", np.float32), ("dataset", np.int32), ("valid", bool)]:
            assert batch[key].shape == (4,) and batch[key].dtype == dtype
        for row, i in enumerate(ids_of(batch)):
            w, (n, a) = window(i), SHAPES[i % len(SHAPES)]
            seen.add(i)
            np.testing.assert_array_equal(batch["x"][row, :n, :a], w.signal / np.float32(100))
            assert not batch["x"][row][~batch["mask"][row]].any()
            expected_mask = np.zeros((6, 4), bool)
            expected_mask[:n, :a] = True
            np.testing.assert_array_equal(batch["mask"][row], expected_mask)
            tokens_c, tokens_t = batch["token_channels"][row].reshape(6, 4), batch["token_times"][row].reshape(6, 4)
            rows = np.r_[w.channel_rows, np.zeros(6 - n)]
            np.testing.assert_array_equal(batch["input_chans"][row], np.r_[0, rows])
            np.testing.assert_array_equal(tokens_c, np.where(expected_mask, rows[:, None], 0))
            np.testing.assert_array_equal(tokens_t, np.where(expected_mask, np.arange(4)[None, :], 0))
            if w.label is None:
                assert batch["label"][row] == -1 and np.isnan(batch["target"][row])
            else:
                assert batch["target"][row] == np.float32(w.label)
                assert batch["label"][row] == (w.label if isinstance(w.label, int) else -1)
            assert batch["dataset"][row] == 0
    assert seen == set(range(10))


def test_float16_records_decode_to_float32(tmp_path):
    folder = write(tmp_path / "h", range(2), dtype=np.float16)
    batch = next(iter(eval_dataset([folder], cfg(batch_size=2), **ONE)))
    assert batch["x"].dtype == np.float32
    for row, i in enumerate(ids_of(batch)):
        n, a = SHAPES[i % len(SHAPES)]
        np.testing.assert_array_equal(batch["x"][row, :n, :a],
                                      window(i, dtype=np.float16).signal.astype(np.float32) / np.float32(100))


def test_each_epoch_is_a_new_permutation(tmp_path):
    folder = write(tmp_path / "a", range(12))
    ids = np.concatenate([ids_of(b) for b in take(iter(make_dataset([folder], cfg(), **ONE)), 9)])
    epochs = ids.reshape(3, 12)
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3
    unshuffled = np.concatenate([ids_of(b) for b in take(iter(make_dataset([folder], cfg(shuffle=False), **ONE)), 6)])
    assert unshuffled.tolist() == list(range(12)) * 2


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_across_epochs(tmp_path, workers):
    folder = write(tmp_path / "a", range(22))  # 5.5 batches per epoch: the resumed part crosses two epoch ends
    config = cfg(workers=workers)
    first = iter(make_dataset([folder], config, **ONE))
    take(first, 3)
    state = save_state(first)
    json.dumps(state)
    expected = take(first, 9)
    resumed = iter(make_dataset([folder], config, **ONE))
    restore_state(resumed, state)
    for want, got in zip(expected, take(resumed, 9)):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key], err_msg=key)
    if workers:
        first.close()
        resumed.close()


def test_resume_with_another_worker_count_is_refused(tmp_path):
    folder = write(tmp_path / "a", range(8))
    it = iter(make_dataset([folder], cfg(), **ONE))
    next(it)
    other = iter(make_dataset([folder], cfg(workers=2), **ONE))
    with pytest.raises(ValueError, match="saved with 0 workers but this pipeline has 2"):
        restore_state(other, save_state(it))


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_processes_split_each_epoch(tmp_path, drop_remainder):
    folder = write(tmp_path / "a", range(23))
    config = cfg(num_epochs=1, drop_remainder=drop_remainder)
    parts = [[ids_of(b) for b in make_dataset([folder], config, process_index=i, process_count=2)] for i in (0, 1)]
    assert len(parts[0]) == len(parts[1])  # a collective step needs the same number of batches everywhere
    assert all(len(b) <= 2 for part in parts for b in part)  # 4 global = 2 per process
    ids = [set(np.concatenate(p).tolist()) for p in parts]
    assert not ids[0] & ids[1]
    total = len(ids[0]) + len(ids[1])
    assert (ids[0] | ids[1]) == set(range(23)) if not drop_remainder else total == 20
    with pytest.raises(ValueError, match="not divisible"):
        make_dataset([folder], cfg(batch_size=5), process_index=0, process_count=2)


WORKER = """
import json, sys
import jax
port, pid, folder, out = sys.argv[1:]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
from labram_jax.data.pipeline import LoaderConfig, make_dataset
cfg = LoaderConfig(batch_size=4, max_channels=6, max_patches=4, seed=3, num_epochs=1, drop_remainder=False)
ids = []
for batch in make_dataset([folder], cfg):
    ids += ((batch["x"][:, 0, 0, 0] * 100).round() // 1000).astype(int)[batch["valid"]].tolist()
json.dump({"process": jax.process_index(), "count": jax.process_count(), "ids": ids}, open(out, "w"))
jax.distributed.shutdown()
"""


def test_two_jax_processes_split_the_epoch(tmp_path):
    folder = write(tmp_path / "a", range(23))
    (tmp_path / "worker.py").write_text(textwrap.dedent(WORKER))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # One CPU device per process, not the 8 simulated devices this test session sets up.
    env = os.environ | {"XLA_FLAGS": FAST_COMPILE}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(port), str(i), str(folder),
                               str(tmp_path / f"ids{i}.json")], env=env, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"ids{i}.json").read_text()) for i in (0, 1)]
    assert [(r["process"], r["count"]) for r in results] == [(0, 2), (1, 2)]
    a, b = (set(r["ids"]) for r in results)
    assert len(a) == len(results[0]["ids"]) and len(b) == len(results[1]["ids"])
    assert not a & b and a | b == set(range(23))


def test_mixture_follows_the_weights(tmp_path):
    sources = {"a": [write(tmp_path / "a", range(30))], "b": [write(tmp_path / "b", range(500, 510), dataset="b")]}
    batches = take(iter(make_dataset(sources, cfg(batch_size=10, weights={"a": 0.8, "b": 0.2}), **ONE)), 50)
    source = np.concatenate([b["dataset"] for b in batches])
    ids = np.concatenate([ids_of(b) for b in batches])
    assert abs((source == 0).mean() - 0.8) < 0.02
    np.testing.assert_array_equal(ids >= 500, source == 1)  # the field names the right source
    # b, the smaller source, is repeated in ever new orders to keep its share
    b_ids = ids[source == 1].reshape(-1, 10)
    assert all(sorted(e) == list(range(500, 510)) for e in b_ids) and len({tuple(e) for e in b_ids}) > 1
    with pytest.raises(ValueError, match="weights are given for"):
        make_dataset(sources, cfg(weights={"a": 1.0}), **ONE)


def test_sources_without_weights_are_concatenated(tmp_path):
    sources = {"a": [write(tmp_path / "a", range(6))], "b": [write(tmp_path / "b", range(500, 503), dataset="b")]}
    batches = list(make_dataset(sources, cfg(num_epochs=1, batch_size=3), **ONE))
    ids = np.concatenate([ids_of(b) for b in batches])
    assert sorted(ids) == [*range(6), *range(500, 503)]
    np.testing.assert_array_equal(np.concatenate([b["dataset"] for b in batches]), (ids >= 500).astype(int))


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_window_once(tmp_path, process_count):
    folder = write(tmp_path / "a", range(23))
    ids, valid = [], []
    for index in range(process_count):
        for batch in eval_dataset([folder], cfg(batch_size=8, workers=0), process_index=index,
                                  process_count=process_count):
            ids += ids_of(batch).tolist()
            valid += batch["valid"].tolist()
            assert not batch["mask"][~batch["valid"]].any() and not batch["x"][~batch["valid"]].any()
    assert sorted(ids) == list(range(23))
    assert len(valid) == 24 and sum(valid) == 23  # 3 global batches of 8, one padding row
    train = next(iter(make_dataset([folder], cfg(), **ONE)))
    assert train["valid"].all()


def test_loader_workers_leave_stopping_to_the_job(tmp_path):
    """SIGTERM and SIGINT reach a job's whole process group (SLURM, Ctrl-C): the loader's workers ignore them and
    the pass goes on, for the job to stop at its next safe point. A worker that died of the signal failed an
    evaluation with grain's "worker process was terminated" instead of the job's save."""
    import multiprocessing
    import signal

    folder = write(tmp_path / "a", range(400), per_shard=100)  # more batches than the workers' buffers hold
    iterator = iter(eval_dataset([folder], cfg(batch_size=2, workers=2), **ONE))
    ids = [i for batch in take(iterator, 2) for i in ids_of(batch).tolist()]  # a batch from each worker: started
    workers = multiprocessing.active_children()
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGINT)
    ids += [i for batch in iterator for i in ids_of(batch).tolist()]
    assert sorted(ids) == list(range(400))


def test_a_signal_during_the_workers_start_up_leaves_them_running(tmp_path):
    """A group signal can come while a pass's workers are still starting, before their initializer ignores it:
    the workers start with SIGTERM and SIGINT held, so the signal waits and is then dropped, and the pass goes on."""
    import multiprocessing
    import signal
    import threading
    import time

    folder = write(tmp_path / "a", range(40), per_shard=10)
    iterator = iter(eval_dataset([folder], cfg(batch_size=2, workers=2), **ONE))
    ids, failed = [], []

    def read() -> None:
        try:
            ids.extend(i for batch in iterator for i in ids_of(batch).tolist())
        except Exception as error:  # noqa: BLE001 - reported below
            failed.append(error)

    reader = threading.Thread(target=read)  # the pass starts its workers; this thread signals each at once
    reader.start()
    signalled: set[int] = set()
    deadline = time.monotonic() + 60
    while len(signalled) < 2 and time.monotonic() < deadline:
        for worker in multiprocessing.active_children():
            if worker.pid not in signalled:
                os.kill(worker.pid, signal.SIGTERM)
                os.kill(worker.pid, signal.SIGINT)
                signalled.add(worker.pid)
        time.sleep(0.001)
    reader.join(timeout=120)
    assert len(signalled) == 2 and not failed, failed
    assert sorted(ids) == list(range(40))


@pytest.mark.parametrize("shape", [(7, 2), (3, 5)])
def test_oversized_window_names_its_recording(tmp_path, shape):
    folder = tmp_path / "big"
    folder.mkdir()
    write_shard(folder / "x.array_record", [window(0), window(1, shape=shape)])
    with pytest.raises(ValueError, match=r"a/rec1.*max_channels=6, max_patches=4"):
        list(eval_dataset([folder], cfg(batch_size=2), **ONE))


def test_unlabelled_and_regression_targets(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    write_shard(folder / "x.array_record", [window(0, label=None), window(1, label=2.5), window(2, label=4)])
    batch = next(iter(eval_dataset([folder], dataclasses.replace(cfg(), batch_size=3), **ONE)))
    assert batch["label"].tolist() == [-1, -1, 4]
    np.testing.assert_array_equal(batch["target"], np.array([np.nan, 2.5, 4.0], np.float32))


def test_config_rejects_windows_past_ten_minutes():
    cfg(max_patches=17)  # past the original's 16 time_embed rows: the model decides (model.time_rows)
    with pytest.raises(ValueError, match="max_patches <= 600"):
        cfg(max_patches=601)

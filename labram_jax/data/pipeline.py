"""grain pipelines that turn window shards into fixed-shape batches for a jitted step: padded or packed.

Every batch has the same shapes whatever windows it holds (channels padded to `max_channels`, patches to
`max_patches`), so the train step compiles once. The whole pipeline stays a random-access `MapDataset` up to the
batch, which is what makes the global shuffle, per-process sharding and exact resumption cheap: an iterator's state
is little more than the index of the next batch.

Batch fields (B = global batch size / process count):
  x               float32 [B, N, A, 200]  signal in µV / 100, zero where `mask` is False
  input_chans     int32   [B, N+1]        0 (cls), then the pos_embed row of each channel; 0 for padded channels
  mask            bool    [B, N, A]       True for a real patch
  token_channels  int32   [B, N*A]        pos_embed row of each token, channel-major (n*A + a); 0 for padding
  token_times     int32   [B, N*A]        patch index of each token; 0 for padding
  label           int32   [B]             integer label, -1 when the label is missing or not an integer
  target          float32 [B]             the label as a float, NaN when missing
  dataset         int32   [B]             index of the source (order of the `sources` dict)
  valid           bool    [B]             False for the rows that pad the last batch of a finite pass
A caller's batch may add `bool_masked_pos` bool [B, N*A] (True = masked, channel-major): the pretraining step then
uses that mask instead of drawing one (bench/train_vs_pytorch.py passes the original engine's masks so).

Packing (`pack_tokens` > 0, for pretraining and tokenizer training on mixtures): instead of padding every window
to the grid, windows are packed into rows of `pack_tokens` patch tokens with up to `pack_windows` windows each
(first-fit decreasing over `pack_buffer` consecutive windows of the shuffled stream), and a batch is
`batch_size / process_count` such rows. labram_jax.models.packing describes how the models read them:
  x               float32 [B, T, 200]     the windows' patches one after another, each window channel-major
  segments        int32   [B, T]          window slot of each token (0 .. W-1), -1 for padding
  mask            bool    [B, T]          True for a real patch
  token_channels  int32   [B, T]          pos_embed row of each token; 0 for padding
  token_times     int32   [B, T]          patch index of each token within its window; 0 for padding
  label, target, dataset, valid           [B, W], per window slot as above; valid is False for an empty slot
Each process packs its own share of the windows, so rows hold different numbers of windows on different
processes; the stream is endless (num_epochs=None), so every process always has a next batch. With `workers`,
each worker packs its own slice of the process's stream, so packed batches depend on the worker count.

Resuming: `state = save_state(it)` is plain JSON; `restore_state(iter(same_pipeline), state)` continues with exactly
the batches the first iterator would have produced. grain ties the state to the number of worker processes, so
`workers` must be the same when resuming.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np
from absl import flags

from labram_jax.configs import MAX_WINDOW_S, NUM_CHANNEL_ROWS
from labram_jax.data.records import decode
from labram_jax.data.shards import SHARD_SUFFIX, shard_paths
from labram_jax.errors import UserError, one_line
from labram_jax.files import check_regular
from labram_jax.preemption import held, ignore_in_worker

PATCH = 200
PathLike = str | os.PathLike
Sources = Mapping[str, Sequence[PathLike]] | Sequence[PathLike]


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    batch_size: int  # global, over all processes
    max_channels: int
    max_patches: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None repeats forever
    drop_remainder: bool = True  # False pads the last batch with rows whose `valid` is False
    workers: int = 0  # grain worker processes; 0 reads in this process
    read_threads: int = 4
    prefetch: int = 8  # batches buffered per reader
    weights: Mapping[str, float] | None = None  # mixture proportions per source; None concatenates
    pack_tokens: int = 0  # > 0: pack windows into rows of this many patch tokens; batch_size then counts rows
    pack_windows: int = 4  # window slots (cls tokens) per packed row
    pack_buffer: int = 256  # windows packed together: first-fit decreasing looks this far ahead

    def __post_init__(self) -> None:
        if self.batch_size < 1 or not 1 <= self.max_channels <= NUM_CHANNEL_ROWS \
                or not 1 <= self.max_patches <= MAX_WINDOW_S:
            raise UserError(f"need batch_size >= 1, 1 <= max_channels <= {NUM_CHANNEL_ROWS} (the model's channel "
                            f"rows) and 1 <= max_patches <= {MAX_WINDOW_S}, got {self}")
        if self.pack_tokens < 0 or (self.pack_tokens and (self.pack_windows < 1 or self.pack_buffer < 1)):
            raise UserError(f"need pack_tokens >= 0 and, when packing, pack_windows >= 1 and pack_buffer >= 1; "
                             f"got pack_tokens={self.pack_tokens}, pack_windows={self.pack_windows}, "
                             f"pack_buffer={self.pack_buffer}")


def window_source(paths_or_dirs: PathLike | Sequence[PathLike]) -> grain.sources.ArrayRecordDataSource:
    """Random-access source over shard files and/or folders of `*.array_record` shards."""
    items = [paths_or_dirs] if isinstance(paths_or_dirs, (str, os.PathLike)) else list(paths_or_dirs)
    paths: list[Path] = []
    for item in map(Path, items):
        if not item.exists():
            raise UserError(f"no shard or folder {item}")
        paths.extend(shard_paths(item) if item.is_dir() else [item])
    for path in paths:  # the reader would block on a FIFO named like a shard
        check_regular(path)
    if not paths:
        raise UserError(f"no {SHARD_SUFFIX} shards in {[str(i) for i in items]}")
    try:
        return grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    except RuntimeError:  # ArrayRecord's reader names neither the file nor, always, the fault: find the file
        for path in paths:
            try:
                grain.sources.ArrayRecordDataSource([str(path)])
            except RuntimeError as error:
                raise UserError(f"{path}: not a readable ArrayRecord shard ({one_line(error)})") from None
        raise


@dataclasses.dataclass(frozen=True)
class _Tag:
    """Pairs a record with its source's index (a class, not a lambda, so worker processes can unpickle it)."""

    index: int

    def __call__(self, record: bytes) -> tuple[int, bytes]:
        return self.index, record


# Source index -1 marks the rows that pad a last batch. Not None: grain treats None as a filtered-out element.
_FILLER = (-1, b"")


@dataclasses.dataclass(frozen=True)
class _Example:
    """Decodes one tagged record into padded fixed-shape arrays; _FILLER becomes an empty, invalid row."""

    max_channels: int
    max_patches: int

    def __call__(self, item: tuple[int, bytes]) -> dict[str, np.ndarray]:
        n_max, a_max = self.max_channels, self.max_patches
        x = np.zeros((n_max, a_max, PATCH), np.float32)
        rows = np.zeros(n_max, np.int32)
        mask = np.zeros((n_max, a_max), bool)
        label, target = -1, np.nan
        source, record = item
        if source >= 0:
            window = decode(record)
            n, a, _ = window.signal.shape
            if n > n_max or a > a_max:
                raise UserError(f"window of {window.recording!r} at {window.start:g} s has {n} channels x {a} "
                                f"patches, more than the loader's max_channels={n_max}, max_patches={a_max}")
            x[:n, :a] = window.signal / np.float32(100)  # the model's input unit is 100 µV
            rows[:n] = window.channel_rows
            mask[:n, :a] = True
            label, target = _labels(window)
        return {"x": x, "input_chans": np.concatenate([[0], rows]).astype(np.int32), "mask": mask,
                "token_channels": np.where(mask, rows[:, None], 0).reshape(-1),
                "token_times": np.where(mask, np.arange(a_max, dtype=np.int32), 0).reshape(-1),
                "label": np.int32(label), "target": np.float32(target), "dataset": np.int32(max(source, 0)),
                "valid": np.bool_(source >= 0)}


def _labels(window: Any) -> tuple[int, float]:
    """(integer label or -1, the label as a float or NaN)."""
    if window.label is None:
        return -1, np.nan
    return (window.label if isinstance(window.label, int) else -1), float(window.label)


@dataclasses.dataclass(frozen=True)
class _Tokens:
    """Decodes one tagged record into its patch tokens, unpadded, for packing."""

    pack_tokens: int
    max_patches: int  # the model's time_embed rows

    def __call__(self, item: tuple[int, bytes]) -> dict[str, Any]:
        source, record = item
        window = decode(record)
        n, a, _ = window.signal.shape
        if n * a > self.pack_tokens or a > self.max_patches:
            raise UserError(f"window of {window.recording!r} at {window.start:g} s has {n} channels x {a} patches, "
                             f"more than the loader's pack_tokens={self.pack_tokens} tokens or "
                             f"max_patches={self.max_patches}")
        label, target = _labels(window)
        return {"x": (window.signal / np.float32(100)).reshape(n * a, PATCH).astype(np.float32),
                "token_channels": np.repeat(window.channel_rows.astype(np.int32), a),
                "token_times": np.tile(np.arange(a, dtype=np.int32), n),
                "label": label, "target": target, "dataset": source}


def first_fit_decreasing(sizes: Sequence[int], capacity: int, max_items: int) -> list[list[int]]:
    """Bins of item indices: items by decreasing size (ties in stream order), each into the first bin with room
    for it and fewer than max_items items."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        target = next((b for b, free in enumerate(room) if free >= sizes[i] and len(bins[b]) < max_items), None)
        if target is None:
            bins.append([])
            room.append(capacity)
            target = len(bins) - 1
        bins[target].append(i)
        room[target] -= sizes[i]
    return bins


def packed_rows(sizes: Sequence[int], cfg: LoaderConfig) -> int:
    """About how many rows one pass over windows of these token counts packs into: the packer's rule (first-fit
    decreasing over chunks of pack_buffer windows) on a seeded shuffle of them. The stream's own order gives
    chunks of other compositions, so the count can differ by a few rows; a row count per chunk composition is
    computed once (a corpus of one window shape has one)."""
    order = np.random.default_rng(cfg.seed).permutation(len(sizes))
    shuffled = np.asarray(sizes, np.int64)[order]
    rows, known = 0, {}
    for start in range(0, len(shuffled), cfg.pack_buffer):
        chunk = tuple(sorted(shuffled[start:start + cfg.pack_buffer].tolist(), reverse=True))
        if chunk not in known:
            known[chunk] = len(first_fit_decreasing(chunk, cfg.pack_tokens, cfg.pack_windows))
        rows += known[chunk]
    return rows


def _packed_row(windows: Sequence[dict[str, Any]], tokens: int, slots: int) -> dict[str, np.ndarray]:
    x = np.zeros((tokens, PATCH), np.float32)
    segments = np.full(tokens, -1, np.int32)
    channels, times = np.zeros(tokens, np.int32), np.zeros(tokens, np.int32)
    label, target = np.full(slots, -1, np.int32), np.full(slots, np.nan, np.float32)
    dataset, valid = np.zeros(slots, np.int32), np.zeros(slots, bool)
    start = 0
    for slot, window in enumerate(windows):
        span = slice(start, start + len(window["x"]))
        x[span], segments[span] = window["x"], slot
        channels[span], times[span] = window["token_channels"], window["token_times"]
        label[slot], target[slot], dataset[slot], valid[slot] = (window["label"], window["target"],
                                                                 window["dataset"], True)
        start = span.stop
    return {"x": x, "segments": segments, "mask": segments >= 0, "token_channels": channels, "token_times": times,
            "label": label, "target": target, "dataset": dataset, "valid": valid}


class _PackIterator(grain.DatasetIterator):
    """Rows of packed windows. Its state is the parent's position at the start of the current chunk of
    pack_buffer windows, the chunk's number and the next row: a restore re-reads and re-packs that chunk."""

    def __init__(self, parent: grain.DatasetIterator, cfg: LoaderConfig):
        super().__init__(parent)
        self._cfg = cfg
        self._start, self._chunk, self._next = parent.get_state(), 0, 0
        self._rows: list[dict[str, np.ndarray]] | None = None

    def _pack(self) -> list[dict[str, np.ndarray]]:
        cfg = self._cfg
        windows = []
        for window in self._parent:
            windows.append(window)
            if len(windows) == cfg.pack_buffer:
                break
        if not windows:
            raise StopIteration
        bins = first_fit_decreasing([len(w["x"]) for w in windows], cfg.pack_tokens, cfg.pack_windows)
        # Decreasing sizes fill the first bins with the largest windows: shuffle the rows so batches mix sizes.
        order = np.random.default_rng([cfg.seed, self._chunk]).permutation(len(bins))
        return [_packed_row([windows[i] for i in bins[b]], cfg.pack_tokens, cfg.pack_windows) for b in order]

    def __next__(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            self._rows = self._pack()
        while self._next == len(self._rows):
            self._start, self._chunk, self._next = self._parent.get_state(), self._chunk + 1, 0
            self._rows = self._pack()
        self._next += 1
        return self._rows[self._next - 1]

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._start, "chunk": self._chunk, "row": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._start, self._chunk, self._next = state["parent"], state["chunk"], state["row"]
        self._rows = None


class _Packed(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, cfg: LoaderConfig):
        super().__init__(parent)
        self._cfg = cfg

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._cfg)


def _records(sources: Sources, cfg: LoaderConfig) -> grain.MapDataset:
    """All sources' records, tagged with their source index, shuffled and repeated or mixed as configured."""
    named = dict(sources) if isinstance(sources, Mapping) else {"": sources}
    parts = [grain.MapDataset.source(window_source(paths)).map(_Tag(i)) for i, paths in enumerate(named.values())]
    if cfg.weights is None:
        ds = grain.MapDataset.concatenate(parts) if len(parts) > 1 else parts[0]
        # The shuffle maps an index of epoch e through a permutation seeded with seed + e, so the order changes
        # every epoch; it must come before repeat, which passes the epoch-carrying index through.
        ds = ds.seed(cfg.seed).shuffle() if cfg.shuffle else ds
        return ds.repeat(cfg.num_epochs)
    if set(cfg.weights) != set(named):
        raise UserError(f"weights are given for {sorted(cfg.weights)} but the sources are {sorted(named)}")
    # Each source is shuffled and repeated on its own, so each keeps its proportion however long the run.
    parts = [(p.seed(cfg.seed + i).shuffle() if cfg.shuffle else p).repeat(cfg.num_epochs) for i, p in enumerate(parts)]
    return grain.MapDataset.mix(parts, [cfg.weights[name] for name in named])


def make_dataset(sources: Sources, cfg: LoaderConfig, *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """This process's stream of padded batches of `cfg.batch_size // process_count` windows.

    `sources` is a list of shard files/folders, or a dict name -> list whose order gives the `dataset` field.
    Process i takes records i, i+P, i+2P, ... of the shared shuffled stream, so the processes' batches together
    form the global batch and each epoch is split disjointly between them.
    """
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    if cfg.batch_size % process_count:
        raise UserError(f"batch_size {cfg.batch_size} is not divisible by the {process_count} processes")
    ds = _records(sources, cfg)
    if cfg.pack_tokens and len(ds) < sys.maxsize:
        raise UserError(f"pack_tokens needs an endless stream (num_epochs=None), got num_epochs={cfg.num_epochs}: "
                         "packed processes hold different numbers of rows, so a finite pass could not end together")
    if len(ds) < sys.maxsize:
        # Every process must produce the same number of batches or a collective step would hang: cut a finite pass
        # to whole global batches, or pad it with empty (valid=False) rows.
        whole, rest = divmod(len(ds), cfg.batch_size)
        if cfg.drop_remainder:
            ds = ds[:whole * cfg.batch_size]
        elif rest:
            ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([_FILLER] * (cfg.batch_size - rest))])
    ds = ds[process_index::process_count]
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
    if cfg.pack_tokens:
        it = _Packed(ds.map(_Tokens(cfg.pack_tokens, cfg.max_patches)).to_iter_dataset(read), cfg)
        it = it.batch(cfg.batch_size // process_count, drop_remainder=True)
    else:
        # Batching before to_iter_dataset keeps a batch's content independent of the number of workers.
        ds = ds.map(_Example(cfg.max_channels, cfg.max_patches)).batch(cfg.batch_size // process_count,
                                                                       drop_remainder=True)
        it = ds.to_iter_dataset(read)
    if cfg.workers:
        # grain's workers read an absl flag, which raises outside absl.app.run unless the flags count as parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # A worker that died of a group signal (SLURM, Ctrl-C) failed the run with grain's "worker terminated"
        # error instead of its save: the workers ignore the signals from their start (_SignalsHeld), the job
        # decides; grain ends its workers when their iterator closes.
        it = _SignalsHeld(it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers),
                                         worker_init_fn=ignore_in_worker))
    return it


class _SignalsHeld(grain.IterDataset):
    """The workers' stream, its calls made with SIGTERM and SIGINT held (preemption.held): grain starts the
    workers in the first `next` (and a restore may start them again), from this thread or from threads it
    starts, and a group signal during a worker's start-up, before ignore_in_worker ran, killed the worker."""

    def __iter__(self) -> _HeldIterator:
        with held():
            return _HeldIterator(self._parent.__iter__())


class _HeldIterator(grain.DatasetIterator):
    def __next__(self) -> dict[str, np.ndarray]:
        with held():
            return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        with held():
            self._parent.set_state(state)


def eval_dataset(sources: Sources, cfg: LoaderConfig, *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """One pass in storage order over every window exactly once; the last batch is padded with valid=False rows."""
    cfg = dataclasses.replace(cfg, shuffle=False, num_epochs=1, drop_remainder=False, weights=None, pack_tokens=0)
    return make_dataset(sources, cfg, process_index=process_index, process_count=process_count)


def save_state(iterator: Any) -> dict[str, Any]:
    """The iterator's position as plain JSON data (a checkpoint can store it as-is)."""
    return json.loads(json.dumps(iterator.get_state()))


def restore_state(iterator: Any, state: Mapping[str, Any]) -> None:
    """Move a fresh iterator of the same pipeline (same sources, config and worker count) to a saved position."""
    # grain silently misreads a state saved with another worker count (2 -> 3 workers yields wrong batches).
    saved, current = _worker_count(state), _worker_count(iterator.get_state())
    if saved != current:
        raise UserError(f"the loader state was saved with {saved} workers but this pipeline has {current}; "
                        "resume with the same `workers`")
    iterator.set_state(dict(state))


def _worker_count(state: Mapping[str, Any]) -> int:
    return len(state.get("iterators_in_use_states", ()))

"""Windows per second that `make_dataset` delivers with 0, 1 and 2 worker processes, measured in one run.

    python bench/loader_throughput.py                      # synthetic 23-channel x 10 s float32 windows
    python bench/loader_throughput.py --shards DIR         # an existing folder of shards (e.g. `labram prep` output)
    python bench/loader_throughput.py --smoke              # seconds: 64 windows in a scratch folder, 0.5 s each

The synthetic shards are written once to --cache (default: a folder in the system temp dir) and reused.
Throughput is counted after the first batch, so worker start-up (about a second) is reported separately.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labram_jax.data.pipeline import LoaderConfig, make_dataset, window_source  # noqa: E402
from labram_jax.data.records import Window, decode  # noqa: E402
from labram_jax.data.shards import shard_paths, write_shard  # noqa: E402


def synthetic_shards(directory: Path, windows: int = 3000, channels: int = 23, seconds: int = 10,
                     per_shard: int = 250) -> Path:
    """EEG-sized random windows (float32, ~180 KB each), written unless the folder already holds them."""
    directory.mkdir(parents=True, exist_ok=True)
    if sum(len(window_source(p)) for p in shard_paths(directory)) == windows:
        return directory
    rng = np.random.default_rng(0)
    for start in range(0, windows, per_shard):
        batch = [Window(signal=rng.normal(0, 20, (channels, seconds, 200)).astype(np.float32),
                        channel_rows=np.arange(1, channels + 1, dtype=np.int16),
                        channel_names=tuple(f"C{k}" for k in range(channels)), recording=f"synthetic/{i // 30}",
                        start=float(i % 30 * seconds), dataset="synthetic", label=i % 2)
                 for i in range(start, min(start + per_shard, windows))]
        write_shard(directory / f"synthetic-{start // per_shard:04d}.array_record", batch)
    return directory


def _largest_window(shard_dir: Path) -> tuple[int, int]:
    source = window_source(shard_dir)
    shapes = [decode(source[i]).signal.shape for i in range(len(source))]
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


def measure_loader(shard_dir: str | os.PathLike, batch_size: int, workers: int, seconds: float) -> float:
    """Steady-state windows/second of a shuffled, repeating training pipeline over the shards in `shard_dir`."""
    max_channels, max_patches = _largest_window(Path(shard_dir))
    cfg = LoaderConfig(batch_size=batch_size, max_channels=max_channels, max_patches=max_patches, workers=workers)
    it = iter(make_dataset([shard_dir], cfg, process_index=0, process_count=1))
    started = time.perf_counter()
    next(it)
    print(f"  workers={workers}: first batch after {time.perf_counter() - started:.2f} s", flush=True)
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        count += len(next(it)["valid"])
    if workers:
        it.close()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="existing folder of shards (default: synthetic windows)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "labram_jax_loader_bench")
    parser.add_argument("--windows", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="a check of the script in seconds: 64 synthetic "
                        "windows in a scratch folder, 0.5 s with 0 and 1 workers")
    args = parser.parse_args()
    if args.smoke:
        scratch = tempfile.TemporaryDirectory()
        args.cache, args.windows, args.batch_size, args.seconds, args.workers = (
            Path(scratch.name), 64, 8, 0.5, [0, 1])

    shard_dir = args.shards or synthetic_shards(args.cache, args.windows)
    n, a = _largest_window(shard_dir)
    print(f"{len(window_source(shard_dir))} windows in {shard_dir}, padded to {n} channels x {a} patches, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs", flush=True)
    rates = {w: measure_loader(shard_dir, args.batch_size, w, args.seconds) for w in args.workers}
    base = rates.get(0)
    for workers, rate in rates.items():
        ratio = f"  x{rate / base:.2f} vs workers=0" if base else ""
        print(f"workers={workers}: {rate:8.0f} windows/s{ratio}")


if __name__ == "__main__":
    main()

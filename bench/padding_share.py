"""The padded share of the tokens a step computes on a realistic mixture of montages: grid batches vs packed rows.

Windows of 19, 23, 32, 62 and 64 channels (equal numbers of each) are written to ArrayRecord shards and read back
through the training loader, once padded to the grid (max_channels x max_patches) and once packed into rows of
--pack-tokens tokens. Window lengths: data_prep's default (the longest with channels x seconds <= 256, as the
original chose for pretraining) or, with --lengths uniform, anywhere from 4 s up to that. The padded share counts
patch tokens; "with cls" counts every sequence position the Transformer runs, one cls per window slot.

    python bench/padding_share.py
    python bench/padding_share.py --lengths uniform
    python bench/padding_share.py --smoke    # seconds: 8 windows a montage, 4 batches of 4
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.plan import default_window  # noqa: E402
from labram_jax.data.pipeline import LoaderConfig, make_dataset  # noqa: E402
from labram_jax.data.records import Window  # noqa: E402
from labram_jax.data.shards import write_shard  # noqa: E402

MONTAGES = (19, 23, 32, 62, 64)


def mixture(folder: Path, per_montage: int, lengths: str, seed: int) -> list[tuple[int, int]]:
    """Write the windows (zeros: only their shapes matter here); returns their (channels, patches)."""
    rng = np.random.default_rng(seed)
    shapes = []
    for n in MONTAGES:
        longest = default_window(n)
        seconds = [longest] * per_montage if lengths == "default" else rng.integers(4, longest + 1, per_montage)
        windows = [Window(signal=np.zeros((n, int(a), 200), np.float16), channel_rows=np.arange(1, n + 1,
                                                                                              dtype=np.int16),
                          channel_names=tuple(f"C{c}" for c in range(n)), recording=f"m{n}/{i}", start=0.0,
                          dataset=f"m{n}") for i, a in enumerate(seconds)]
        write_shard(folder / f"m{n:02d}.array_record", windows)
        shapes += [(n, int(a)) for a in seconds]
    return shapes


def padded_share(batches: int, cfg: LoaderConfig, folder: Path) -> tuple[float, float, int]:
    """(padded share of patch tokens, of all sequence positions with cls, windows seen) over `batches` batches."""
    real = total = windows = slots = 0
    for batch in itertools.islice(make_dataset([folder], cfg, process_index=0, process_count=1), batches):
        real += int(batch["mask"].sum())
        total += batch["mask"].size
        windows += int(batch["valid"].sum())
        slots += batch["valid"].size
    return 1 - real / total, 1 - (real + windows) / (total + slots), windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", choices=("default", "uniform"), default="default")
    parser.add_argument("--per-montage", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--pack-tokens", type=int, default=256)
    parser.add_argument("--pack-windows", type=int, default=4)
    parser.add_argument("--pack-buffer", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a check of the script in seconds: 8 windows a "
                        "montage, 4 batches of 4 rows")
    args = parser.parse_args()
    if args.smoke:
        args.per_montage, args.batch_size, args.batches, args.pack_buffer = 8, 4, 4, 16
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shapes = mixture(folder, args.per_montage, args.lengths, args.seed)
        print(f"mixture: {len(shapes)} windows, channels x patches "
              f"{sorted(set(shapes), key=lambda s: (s[0], s[1]))[:12]}{' ...' if len(set(shapes)) > 12 else ''}; "
              f"mean {np.mean([n * a for n, a in shapes]):.0f} tokens per window")
        grids = [(max(n for n, _ in shapes), max(a for _, a in shapes)), (64, 16)]
        for n, a in grids:
            cfg = LoaderConfig(batch_size=args.batch_size, max_channels=n, max_patches=a, seed=args.seed)
            share, with_cls, windows = padded_share(args.batches, cfg, folder)
            print(f"grid {n} x {a}: padded share {share:.1%} of patch tokens ({with_cls:.1%} with cls), "
                  f"{windows / args.batches:.1f} windows per batch of {args.batch_size} rows")
        # packed rows keep max_patches as the model's time_embed rows a window may use: the data's longest
        cfg = LoaderConfig(batch_size=args.batch_size, max_channels=grids[0][0], max_patches=grids[0][1],
                           seed=args.seed, pack_tokens=args.pack_tokens, pack_windows=args.pack_windows,
                           pack_buffer=args.pack_buffer)
        share, with_cls, windows = padded_share(args.batches, cfg, folder)
        print(f"packed {args.pack_tokens} tokens, <= {args.pack_windows} windows per row: padded share "
              f"{share:.1%} of patch tokens ({with_cls:.1%} with cls), {windows / args.batches:.1f} windows per "
              f"batch of {args.batch_size} rows")


if __name__ == "__main__":
    main()

"""Preprocess throughput on the real HAM10000 sample against a plain PIL loop's limit.

The limit is a single-process PIL decode + resize loop over the same files, times the number of
cores; the figure is the whole preprocess stage (metadata, splits, encoder, parallel decoding,
writing the arrays) in images per second. Target: at least 0.8 of the limit.

    .venv/bin/python benchmarks/preprocess_throughput.py [--data ../shared/data/ham10000-200px]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from tasks.ingest import import_dataset
from tasks.params import PreprocessParams
from tasks.preprocess import format_counts, preprocess
from tasks.schema import RAW_IMAGES_DIR

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000-200px"


def plain_pil_rate(paths: list[Path], size: int) -> float:
    """Images per second of the simplest decode + resize loop, on one core."""
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs of each")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no data at {args.data}: pass --data with a HAM10000 download")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as scratch:
        raw = Path(scratch) / "raw"
        import_dataset(args.data, raw, progress=False)
        paths = sorted((raw / RAW_IMAGES_DIR).glob("*.jpg"))
        plain_pil_rate(paths[:200], args.size)  # warm the page cache
        single = max(plain_pil_rate(paths, args.size) for _ in range(args.repeats))
        limit = single * cores
        stage_rates = []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            summary = preprocess(raw, Path(scratch) / f"processed{repeat}", PreprocessParams(image_size=args.size))
            stage_rates.append(summary.n_images / (time.perf_counter() - started))
        stage = max(stage_rates)
    print(f"images: {len(paths)} ({args.data.name}), output {args.size}x{args.size}, cores: {cores}")
    print(f"plain PIL decode+resize, one core:   {single:8.1f} images/s")
    print(f"limit (one core x {cores}):              {limit:8.1f} images/s")
    print(f"preprocess stage (whole, best of {args.repeats}): {stage:8.1f} images/s")
    print(f"ratio to the limit:                  {stage / limit:8.2f}  (target >= 0.80)")
    print(format_counts(summary))


if __name__ == "__main__":
    main()

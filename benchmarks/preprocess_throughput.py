"""Preprocess throughput on the real HAM10000 sample against a plain PIL loop's limit.

The limit is a single-process PIL decode + resize loop over the same files, times the number of
cores; the figure is the whole preprocess stage (metadata, splits, encoder, parallel decoding,
writing the arrays) in images per second. Target: at least 0.8 of the limit. For context it also
prints the stage's own per-image work on one core (``tasks.decoding.resized_pixels``: the same
pixels as the loop's, plus extracting them) and the loop in as many processes as cores (how far
this machine's cores scale at all).

    .venv/bin/python benchmarks/preprocess_throughput.py [--data ../shared/data/ham10000-200px]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000-200px"


def plain_pil_rate(paths: list[Path], size: int) -> float:
    """Images per second of the simplest decode + resize loop, on one core."""
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return len(paths) / (time.perf_counter() - started)


def stage_decoding_rate(paths: list[Path], size: int) -> float:
    """Images per second of the stage's per-image work (decode, resize, pixels as bytes), one core."""
    from tasks.decoding import resized_pixels

    started = time.perf_counter()
    for path in paths:
        resized_pixels(path, size)
    return len(paths) / (time.perf_counter() - started)


def _loop_seconds(paths: list[Path], size: int) -> float:
    started = time.perf_counter()
    plain_pil_rate(paths, size)
    return time.perf_counter() - started


def parallel_plain_rate(paths: list[Path], size: int, cores: int) -> float:
    """Images per second of the same loop split over ``cores`` processes (started beforehand):
    how far this machine's cores scale on the decoding alone, with nothing written."""
    shares = [paths[i::cores] for i in range(cores)]
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_loop_seconds, [share[:20] for share in shares], [size] * cores))  # start them
        started = time.perf_counter()
        list(pool.map(_loop_seconds, shares, [size] * cores))
        return len(paths) / (time.perf_counter() - started)


def main() -> None:
    # Imported here, not at the top: the decoding workers are spawned processes that re-import
    # this script, and should pay for what the `skinrisk` command's workers pay, no more.
    from tasks.ingest import import_dataset
    from tasks.params import PreprocessParams
    from tasks.schema import RAW_IMAGES_DIR
    from tasks.stages.preprocess import format_counts, preprocess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs of each")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no data at {args.data}: pass --data with a HAM10000 download")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as scratch:
        raw = Path(scratch) / "raw"
        import_dataset(args.data, raw, progress=False)
        paths = sorted((raw / RAW_IMAGES_DIR).glob("*.jpg"))
        plain_pil_rate(paths[:200], args.size)  # warm the page cache
        # Alternate the two, so that a change in the machine's speed (a shared host) hits both.
        singles, parallels, stage_rates, decoding_rates = [], [], [], []
        for repeat in range(args.repeats):
            singles.append(plain_pil_rate(paths, args.size))
            decoding_rates.append(stage_decoding_rate(paths, args.size))
            parallels.append(parallel_plain_rate(paths, args.size, cores))
            started = time.perf_counter()
            summary = preprocess(raw, Path(scratch) / f"processed{repeat}", PreprocessParams(image_size=args.size))
            stage_rates.append(summary.n_images / (time.perf_counter() - started))
            shutil.rmtree(Path(scratch) / f"processed{repeat}")
        single, parallel, stage = max(singles), max(parallels), max(stage_rates)
        limit = single * cores
        pair_ratios = sorted(rate / (one * cores) for rate, one in zip(stage_rates, singles, strict=True))
    print(f"images: {len(paths)} ({args.data.name}), output {args.size}x{args.size}, cores: {cores}")
    print(f"plain PIL decode+resize, one core:   {single:8.1f} images/s")
    print(f"limit (one core x {cores}):              {limit:8.1f} images/s")
    decoding = max(decoding_rates)
    print(f"the stage's decode+resize, one core: {decoding:8.1f} images/s  (x{decoding / single:.2f} the loop)")
    print(f"the same loop in {cores} processes:      {parallel:8.1f} images/s  (x{parallel / single:.2f})")
    print(f"preprocess stage (whole, best of {args.repeats}): {stage:8.1f} images/s")
    print(f"ratio to the limit:                  {stage / limit:8.2f}  (target >= 0.80)")
    print(f"ratio per alternating pair, median:  {pair_ratios[len(pair_ratios) // 2]:8.2f}")
    print(f"ratio to the {cores}-process loop:         {stage / parallel:8.2f}")
    print(format_counts(summary))


if __name__ == "__main__":
    main()

"""The preprocess stage: risk labels, lesion-grouped splits, clinical encoding, decoded images.

Reads the canonical raw layout (``skinrisk data import``) and writes ``processed_dir``:

- ``train.npz``, ``val.npz``, ``test.npz``: ``images`` (uint8, N x S x S x 3), ``clinical``
  (float32 features), ``risk`` and ``dx`` (int class indices), ``image_id``;
- ``cases.csv``: one row per kept image with its split and risk level;
- ``encoder.json``: the clinical encoder fitted on the training split;
- ``preprocess.json``: classes, risk mapping, image size and counts per split and level.

Everything is staged and moved in at once, so a failure leaves the previous output intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from tasks.atomic import atomic_directory, write_json
from tasks.clinical import ClinicalEncoder, parse_age
from tasks.decoding import decode_shard
from tasks.errors import DataError
from tasks.images import load_image
from tasks.ingest import read_raw_metadata
from tasks.metadata import require_columns
from tasks.params import PreprocessParams
from tasks.schema import DIAGNOSES, RAW_METADATA_FILE, RISK_LEVELS, raw_image_path
from tasks.shards import Executor, map_shards

SPLITS: tuple[str, ...] = ("train", "val", "test")
ENCODER_FILE = "encoder.json"
CASES_FILE = "cases.csv"
SUMMARY_FILE = "preprocess.json"


@dataclass(frozen=True)
class PreprocessSummary:
    n_images: int
    n_dropped: int
    counts: dict[str, dict[str, int]]  # split -> risk level -> images
    lesions: dict[str, int]  # split -> lesions
    image_size: int
    seconds_decoding: float


def clinical_frame(raw: pd.DataFrame, source: Path) -> pd.DataFrame:
    """Typed clinical columns from the raw string table, with errors naming the row."""
    require_columns(raw, source)
    frame = raw.copy()
    ages = []
    for line, (image_id, value) in enumerate(zip(frame["image_id"], frame["age"], strict=True), 2):
        ages.append(parse_age(value, where=f"{source} line {line} (image_id {image_id})"))
    frame["age"] = ages
    unknown = frame.loc[~frame["dx"].isin(DIAGNOSES)]
    if not unknown.empty:
        first = unknown.index[0]
        raise DataError(
            f"{source} line {first + 2} (image_id {unknown.at[first, 'image_id']}): unknown dx "
            f"{unknown.at[first, 'dx']!r} ({len(unknown)} row(s) in all); accepted: {list(DIAGNOSES)}. "
            "Run `skinrisk validate` for the full list."
        )
    return frame


def assign_risk_levels(frame: pd.DataFrame, params: PreprocessParams) -> pd.DataFrame:
    """Add ``risk_level`` from the diagnosis through ``params.risk_map``."""
    return frame.assign(risk_level=frame["dx"].map(params.level_of()))


def split_by_lesion(frame: pd.DataFrame, params: PreprocessParams) -> pd.Series:
    """Train/val/test labels, grouped by ``lesion_id`` and stratified by risk level, seeded.

    Every image of a lesion lands in the same split, so no lesion is seen in training and
    scored in evaluation.
    """
    labels = pd.Series("train", index=frame.index, dtype=object)
    groups = frame["lesion_id"].to_numpy()
    strata = frame["risk_level"].to_numpy()

    def first_fold(index: pd.Index, fraction: float, seed: int) -> pd.Index:
        n_splits = max(2, round(1 / fraction))
        n_groups = frame.loc[index, "lesion_id"].nunique()
        if n_groups < n_splits:
            raise DataError(f"only {n_groups} lesions: too few for a {fraction:.0%} split; import more data")
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        position = frame.index.get_indexer(index)
        _, held_out = next(folds.split(position, strata[position], groups[position]))
        return index[held_out]

    test_index = first_fold(frame.index, params.test_fraction, params.seed)
    labels[test_index] = "test"
    remaining = frame.index.difference(test_index)
    val_fraction = params.val_fraction / (1 - params.test_fraction)
    labels[first_fold(remaining, val_fraction, params.seed + 1)] = "val"
    return labels


def decode_images(
    paths: list[Path],
    size: int,
    workers: int = 0,
    executor: Executor = "processes",
    dask_address: str = "",
) -> np.ndarray:
    """Decode and resize ``paths`` into one uint8 array, in parallel shards.

    The shards run in local processes (``workers``; 0: one per core, 1: here) or, with
    ``executor="dask"``, on a Dask cluster (``dask_address``, or a local one of ``workers``
    processes); the array is the same byte for byte either way (see ``tasks.shards``).
    """
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    if not paths:
        return out
    n_workers = workers or os.cpu_count() or 1
    if executor == "processes" and n_workers == 1:
        for i, path in enumerate(paths):
            out[i] = load_image(path, size)
        return out
    chunk = max(16, min(256, len(paths) // (n_workers * 4) or 1))
    starts = range(0, len(paths), chunk)
    chunks = [[str(p) for p in paths[s : s + chunk]] for s in starts]
    blocks = map_shards(
        partial(decode_shard, size=size), chunks, executor=executor, workers=workers, dask_address=dask_address
    )
    for start, block in zip(starts, blocks, strict=True):
        out[start : start + len(block)] = block
    return out


def preprocess(
    raw_dir: Path, processed_dir: Path, params: PreprocessParams, *, reports_dir: Path | None = None
) -> PreprocessSummary:
    """Run the preprocess stage from ``raw_dir`` into ``processed_dir`` (see module docstring)."""
    import time

    raw_dir, processed_dir = Path(raw_dir), Path(processed_dir)
    source = raw_dir / RAW_METADATA_FILE
    frame = clinical_frame(read_raw_metadata(raw_dir), source)
    frame = assign_risk_levels(frame, params)

    n_before = len(frame)
    if params.missing_clinical == "drop":
        frame = frame.loc[frame["age"].notna()]
    frame = frame.reset_index(drop=True)
    n_dropped = n_before - len(frame)
    frame["split"] = split_by_lesion(frame, params)

    train_rows = frame.loc[frame["split"] == "train"]
    encoder = ClinicalEncoder.fit(train_rows, params.missing_clinical)
    clinical = encoder.transform(frame)

    paths = [raw_image_path(raw_dir, image_id) for image_id in frame["image_id"]]
    started = time.perf_counter()
    images = decode_images(
        paths, params.image_size, params.workers, executor=params.executor, dask_address=params.dask_address
    )
    seconds_decoding = time.perf_counter() - started

    risk_index = {level: i for i, level in enumerate(RISK_LEVELS)}
    dx_index = {dx: i for i, dx in enumerate(DIAGNOSES)}
    counts = {
        split: {level: int(((frame["split"] == split) & (frame["risk_level"] == level)).sum()) for level in RISK_LEVELS}
        for split in SPLITS
    }
    lesions = {split: int(frame.loc[frame["split"] == split, "lesion_id"].nunique()) for split in SPLITS}
    summary = PreprocessSummary(
        n_images=len(frame),
        n_dropped=n_dropped,
        counts=counts,
        lesions=lesions,
        image_size=params.image_size,
        seconds_decoding=round(seconds_decoding, 3),
    )
    with atomic_directory(processed_dir) as staging:
        for split in SPLITS:
            rows = (frame["split"] == split).to_numpy()
            np.savez(
                staging / f"{split}.npz",
                images=images[rows],
                clinical=clinical[rows],
                risk=frame.loc[rows, "risk_level"].map(risk_index).to_numpy(np.int64),
                dx=frame.loc[rows, "dx"].map(dx_index).to_numpy(np.int64),
                image_id=frame.loc[rows, "image_id"].to_numpy(str),
            )
        frame.to_csv(staging / CASES_FILE, index=False)
        encoder.save(staging / ENCODER_FILE)
        write_json(
            staging / SUMMARY_FILE,
            {
                "image_size": params.image_size,
                "risk_levels": list(RISK_LEVELS),
                "diagnoses": list(DIAGNOSES),
                "risk_map": params.risk_map,
                "missing_clinical": params.missing_clinical,
                "n_images": summary.n_images,
                "n_dropped": n_dropped,
                "counts": counts,
                "lesions": lesions,
            },
        )
    if reports_dir is not None:
        write_json(
            Path(reports_dir) / "preprocess.json",
            {
                "counts": counts,
                "lesions": lesions,
                "n_images": summary.n_images,
                "n_dropped": n_dropped,
            },
        )
    return summary


def read_preprocess_summary(processed_dir: Path) -> dict:
    """``preprocess.json`` of a processed directory (classes, risk map, image size, counts)."""
    path = Path(processed_dir) / SUMMARY_FILE
    if not path.exists():
        raise DataError(f"{path} not found: run `skinrisk preprocess` first")
    return json.loads(path.read_text(encoding="utf-8"))


def format_counts(summary: PreprocessSummary) -> str:
    """Images per split and risk level as a console table."""
    header = f"{'split':<6}" + "".join(f"{level:>10}" for level in RISK_LEVELS) + f"{'total':>10}{'lesions':>10}"
    lines = [header]
    for split in SPLITS:
        row = summary.counts[split]
        lines.append(
            f"{split:<6}"
            + "".join(f"{row[level]:>10}" for level in RISK_LEVELS)
            + f"{sum(row.values()):>10}{summary.lesions[split]:>10}"
        )
    if summary.n_dropped:
        lines.append(f"dropped {summary.n_dropped} image(s) without an age (preprocess.missing_clinical=drop)")
    return "\n".join(lines)

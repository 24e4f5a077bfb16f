"""The preprocess stage: risk labels, lesion-grouped splits, clinical encoding, decoded images.

Reads the canonical raw layout (``skinrisk data import``) and writes ``processed_dir``:

- ``images.npy``: every kept image decoded and resized (uint8, N x S x S x 3), one row per row
  of ``cases.csv``; memory-mappable, written in place by the decoding workers;
- ``train.npz``, ``val.npz``, ``test.npz``: ``image_rows`` (the split's rows of ``images.npy``),
  ``clinical`` (float32 features), ``risk`` and ``dx`` (int class indices), ``image_id``
  (read them with :func:`tasks.dataset.load_split`);
- ``cases.csv``: one row per kept image with its split and risk level;
- ``encoder.json``: the clinical encoder fitted on the training split;
- ``preprocess.json``: classes, risk mapping, image size and counts per split and level.

Everything is staged and moved in at once, so a failure leaves the previous output intact.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.atomic import atomic_directory, write_json
from tasks.clinical import ClinicalEncoder, parse_age
from tasks.dataset import IMAGES_FILE
from tasks.decoding import decode_shard, decode_shard_into
from tasks.errors import DataError
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


def first_group_fold(strata: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Mask of the rows in the first fold of scikit-learn's ``StratifiedGroupKFold(n_splits,
    shuffle=True, random_state=seed)``: the same greedy assignment, the same folds.

    Groups (lesions) are shuffled with the seed, ordered by how uneven their class counts are,
    and each is put in the fold that keeps the per-class fold shares closest (mean standard
    deviation; ties to the smaller fold). scikit-learn scores the candidate folds one by one in
    Python for every group: 2.8 s on HAM10000, a quarter of the preprocess stage. Here all
    candidates of a group are scored in one array operation, with the same arithmetic.
    """
    _, y_inv, y_cnt = np.unique(strata, return_inverse=True, return_counts=True)
    _, groups_inv, groups_cnt = np.unique(groups, return_inverse=True, return_counts=True)
    n_groups, n_classes = len(groups_cnt), len(y_cnt)
    counts = np.zeros((n_groups, n_classes))
    np.add.at(counts, (groups_inv, y_inv), 1)
    perm = np.arange(n_groups)
    np.random.RandomState(seed).shuffle(perm)
    counts = counts[perm]
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(n_groups)
    groups_inv = inverse[groups_inv]

    per_fold = np.zeros((n_splits, n_classes))
    placed = np.eye(n_splits)[:, :, None]  # candidate i: the group added to fold i only
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    for group in np.argsort(-np.std(counts, axis=1), kind="stable"):
        candidates = (per_fold + placed * counts[group]) / y_cnt
        scores = np.std(candidates, axis=1).mean(axis=1).tolist()
        sizes = per_fold.sum(axis=1).tolist()
        best, best_score, best_size = 0, scores[0], sizes[0]
        for fold in range(1, n_splits):
            score, size = scores[fold], sizes[fold]
            # np.isclose(score, best_score) with its default tolerances, as scikit-learn decides
            tie = abs(score - best_score) <= 1e-8 + 1e-5 * abs(best_score)
            if score < best_score or (tie and size < best_size):
                best, best_score, best_size = fold, score, size
        per_fold[best] += counts[group]
        fold_of_group[group] = best
    return fold_of_group[groups_inv] == 0


def split_by_lesion(frame: pd.DataFrame, params: PreprocessParams) -> pd.Series:
    """Train/val/test labels, grouped by ``lesion_id`` and stratified by risk level, seeded.

    Every image of a lesion lands in the same split, so no lesion is seen in training and
    scored in evaluation.
    """
    labels = np.full(len(frame), "train", dtype=object)
    groups = frame["lesion_id"].to_numpy()
    strata = frame["risk_level"].to_numpy()

    def held_out(rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
        n_splits = max(2, round(1 / fraction))
        n_groups = len(np.unique(groups[rows]))
        if n_groups < n_splits:
            raise DataError(f"only {n_groups} lesions: too few for a {fraction:.0%} split; import more data")
        return rows[first_group_fold(strata[rows], groups[rows], n_splits, seed)]

    everything = np.arange(len(frame))
    test = held_out(everything, params.test_fraction, params.seed)
    labels[test] = "test"
    remaining = np.setdiff1d(everything, test)
    val_fraction = params.val_fraction / (1 - params.test_fraction)
    labels[held_out(remaining, val_fraction, params.seed + 1)] = "val"
    return pd.Series(labels, index=frame.index, dtype=object)


def decode_images(
    paths: list[Path],
    size: int,
    workers: int = 0,
    executor: Executor = "processes",
    dask_address: str = "",
    *,
    out: Path | None = None,
) -> np.ndarray:
    """Decode and resize ``paths`` into one uint8 array (N x size x size x 3), in parallel shards.

    The shards run in local processes (``workers``; 0: one per core, 1: here) or, with
    ``executor="dask"``, on a Dask cluster (``dask_address``, or a local one of ``workers``
    processes); the array is the same byte for byte either way (see ``tasks.shards``).

    With ``out`` the array is the ``.npy`` file there, returned memory-mapped read-only: local
    worker processes write their rows into it directly instead of sending them back through a
    pipe (see :func:`tasks.decoding.decode_shard_into`).
    """
    shape = (len(paths), size, size, 3)
    n_workers = workers or os.cpu_count() or 1
    # Small shards: the last ones finish close together (256-image shards left a worker idle ~0.2 s)
    chunk = max(16, min(128, len(paths) // (n_workers * 8) or 1))
    starts = range(0, len(paths), chunk)
    chunks = [[str(p) for p in paths[s : s + chunk]] for s in starts]
    if out is not None and paths and executor == "processes":
        created = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=shape)
        offset = created.offset
        del created  # unmapped: the workers write through the file
        fill = partial(decode_shard_into, size=size, out=str(out), offset=offset)
        map_shards(fill, list(zip(starts, chunks, strict=True)), workers=workers)
        return np.load(out, mmap_mode="r")
    images = np.empty(shape, dtype=np.uint8)
    if paths:
        blocks = map_shards(
            partial(decode_shard, size=size), chunks, executor=executor, workers=workers, dask_address=dask_address
        )
        for start, block in zip(starts, blocks, strict=True):
            images[start : start + len(block)] = block
    if out is not None:
        np.save(out, images)
    return images


def _timed(fn, *args, **kwargs) -> float:
    """Seconds that ``fn(*args, **kwargs)`` took."""
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def preprocess(
    raw_dir: Path, processed_dir: Path, params: PreprocessParams, *, reports_dir: Path | None = None
) -> PreprocessSummary:
    """Run the preprocess stage from ``raw_dir`` into ``processed_dir`` (see module docstring).

    The images are decoded in the background (worker processes) while the splits and the
    clinical encoding are computed here: the stage takes little longer than the decoding.
    """
    raw_dir, processed_dir = Path(raw_dir), Path(processed_dir)
    source = raw_dir / RAW_METADATA_FILE
    frame = clinical_frame(read_raw_metadata(raw_dir), source)
    frame = assign_risk_levels(frame, params)

    n_before = len(frame)
    if params.missing_clinical == "drop":
        frame = frame.loc[frame["age"].notna()]
    frame = frame.reset_index(drop=True)
    n_dropped = n_before - len(frame)
    paths = [raw_image_path(raw_dir, image_id) for image_id in frame["image_id"]]

    # The executor is left (waiting for the decoding) before the staging folder is moved in or
    # removed, so no worker is ever writing into a folder that a failure is deleting.
    with atomic_directory(processed_dir) as staging, ThreadPoolExecutor(1, thread_name_prefix="decode") as background:
        decoding = background.submit(
            _timed,
            decode_images,
            paths,
            params.image_size,
            params.workers,
            params.executor,
            params.dask_address,
            out=staging / IMAGES_FILE,
        )
        frame["split"] = split_by_lesion(frame, params)
        encoder = ClinicalEncoder.fit(frame.loc[frame["split"] == "train"], params.missing_clinical)
        clinical = encoder.transform(frame)
        risk_index = {level: i for i, level in enumerate(RISK_LEVELS)}
        dx_index = {dx: i for i, dx in enumerate(DIAGNOSES)}
        for split in SPLITS:
            rows = (frame["split"] == split).to_numpy()
            np.savez(
                staging / f"{split}.npz",
                image_rows=np.flatnonzero(rows),
                clinical=clinical[rows],
                risk=frame.loc[rows, "risk_level"].map(risk_index).to_numpy(np.int64),
                dx=frame.loc[rows, "dx"].map(dx_index).to_numpy(np.int64),
                image_id=frame.loc[rows, "image_id"].to_numpy(str),
            )
        frame.to_csv(staging / CASES_FILE, index=False)
        encoder.save(staging / ENCODER_FILE)
        counts = {
            split: {
                level: int(((frame["split"] == split) & (frame["risk_level"] == level)).sum()) for level in RISK_LEVELS
            }
            for split in SPLITS
        }
        lesions = {split: int(frame.loc[frame["split"] == split, "lesion_id"].nunique()) for split in SPLITS}
        write_json(
            staging / SUMMARY_FILE,
            {
                "image_size": params.image_size,
                "risk_levels": list(RISK_LEVELS),
                "diagnoses": list(DIAGNOSES),
                "risk_map": params.risk_map,
                "missing_clinical": params.missing_clinical,
                "n_images": len(frame),
                "n_dropped": n_dropped,
                "counts": counts,
                "lesions": lesions,
            },
        )
        seconds_decoding = decoding.result()
    summary = PreprocessSummary(
        n_images=len(frame),
        n_dropped=n_dropped,
        counts=counts,
        lesions=lesions,
        image_size=params.image_size,
        seconds_decoding=round(seconds_decoding, 3),
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

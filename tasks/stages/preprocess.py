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

from pathlib import Path

import numpy as np
import pandas as pd

from tasks.atomic import atomic_directory, write_json
from tasks.clinical import ClinicalEncoder, clinical_frame
from tasks.dataset import IMAGES_FILE
from tasks.duplicates import split_groups
from tasks.errors import DataError
from tasks.images import ImageDecoding
from tasks.ingest import read_raw_metadata
from tasks.params import PreprocessParams
from tasks.schema import (
    CASES_FILE,
    DIAGNOSES,
    ENCODER_FILE,
    PROCESSED_SUMMARY_FILE,
    RAW_METADATA_FILE,
    RISK_LEVELS,
    SPLITS,
    PreprocessSummary,
    raw_image_paths,
)


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
    sizes = [0.0] * n_splits  # per_fold.sum(axis=1), kept as it changes
    placed = np.eye(n_splits)[:, :, None]  # candidate i: the group added to fold i only
    # np.std(candidates, axis=1).mean(axis=1) spelled out as the ufuncs numpy's _var and _mean
    # call, into buffers made once: the same arithmetic, a fifth less time (no wrappers)
    candidates = np.empty((n_splits, n_splits, n_classes))
    fold_mean = np.empty((n_splits, 1, n_classes))
    class_std = np.empty((n_splits, n_classes))
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    for group in np.argsort(-np.std(counts, axis=1), kind="stable"):
        np.multiply(placed, counts[group], out=candidates)
        np.add(per_fold, candidates, out=candidates)
        np.true_divide(candidates, y_cnt, out=candidates)
        np.add.reduce(candidates, axis=1, keepdims=True, out=fold_mean)
        np.true_divide(fold_mean, n_splits, out=fold_mean)
        np.subtract(candidates, fold_mean, out=candidates)
        np.square(candidates, out=candidates)
        np.add.reduce(candidates, axis=1, out=class_std)
        np.true_divide(class_std, n_splits, out=class_std)
        np.sqrt(class_std, out=class_std)
        scores = (np.add.reduce(class_std, axis=1) / n_classes).tolist()
        best, best_score, best_size = 0, scores[0], sizes[0]
        for fold in range(1, n_splits):
            score, size = scores[fold], sizes[fold]
            # np.isclose(score, best_score) with its default tolerances, as scikit-learn decides
            tie = abs(score - best_score) <= 1e-8 + 1e-5 * abs(best_score)
            if score < best_score or (tie and size < best_size):
                best, best_score, best_size = fold, score, size
        per_fold[best] += counts[group]
        sizes[best] += float(counts[group].sum())
        fold_of_group[group] = best
    return fold_of_group[groups_inv] == 0


def split_by_lesion(frame: pd.DataFrame, params: PreprocessParams) -> pd.Series:
    """Train/val/test labels, grouped by ``lesion_id`` and stratified by risk level, seeded.

    Every image of a lesion lands in the same split, so no lesion is seen in training and
    scored in evaluation.
    """
    labels = np.full(len(frame), "train", dtype=object)
    # lesions joined by near-duplicate images (tasks.duplicates) share a group
    groups = frame["split_group" if "split_group" in frame else "lesion_id"].to_numpy()
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


def preprocess(
    raw_dir: Path, processed_dir: Path, params: PreprocessParams, *, reports_dir: Path | None = None
) -> PreprocessSummary:
    """Run the preprocess stage from ``raw_dir`` into ``processed_dir`` (see module docstring).

    Worker processes and this thread decode the images together (:class:`ImageDecoding`) before
    the split: the duplicate search needs every image's pixels.
    """
    raw_dir, processed_dir = Path(raw_dir), Path(processed_dir)
    source = raw_dir / RAW_METADATA_FILE
    raw = read_raw_metadata(raw_dir)  # a missing or unreadable table fails here, before any worker starts

    # The decoding is left (waiting for every worker) before the staging folder is moved in or
    # removed, so no worker is ever writing into a folder that a failure is deleting.
    with (
        atomic_directory(processed_dir) as staging,
        ImageDecoding(
            params.image_size,
            staging / IMAGES_FILE,
            workers=params.workers,
            executor=params.executor,
            dask_address=params.dask_address,
        ) as decoding,
    ):
        frame = clinical_frame(raw, source)
        frame["risk_level"] = frame["dx"].map(params.level_of())
        n_before = len(frame)
        if params.missing_clinical == "drop":
            frame = frame.loc[frame["age"].notna()]
        frame = frame.reset_index(drop=True)
        n_dropped = n_before - len(frame)
        decoding.start(raw_image_paths(raw_dir, frame["image_id"]))
        seconds_decoding = decoding.finish()
        images = np.load(staging / IMAGES_FILE, mmap_mode="r")
        duplicates = split_groups(frame["lesion_id"], frame["image_id"], images, params.duplicate_max_distance)
        frame["split_group"] = duplicates.groups
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
        counts = pd.crosstab(frame["split"], frame["risk_level"]).reindex(SPLITS, columns=RISK_LEVELS, fill_value=0)
        lesions = frame.groupby("split")["lesion_id"].nunique().reindex(SPLITS, fill_value=0)
        summary = PreprocessSummary(
            image_size=params.image_size,
            risk_map=params.risk_map,
            counts=counts.to_dict("index"),
            lesions=lesions.to_dict(),
            n_images=len(frame),
            n_dropped=n_dropped,
            missing_clinical=params.missing_clinical,
            duplicates=duplicates.summary(),
            seconds_decoding=round(seconds_decoding, 3),
        )
        write_json(staging / PROCESSED_SUMMARY_FILE, summary.to_json())
    if reports_dir is not None:
        write_json(
            Path(reports_dir) / "preprocess.json",
            {key: summary.to_json()[key] for key in ("counts", "lesions", "n_images", "n_dropped", "duplicates")},
        )
    return summary


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
    if summary.duplicates and summary.duplicates["merged_groups"]:
        lines.append(
            f"near-duplicate images joined {summary.duplicates['merged_lesions']} lesion_ids into "
            f"{summary.duplicates['merged_groups']} split group(s) (preprocess.duplicate_max_distance)"
        )
    return "\n".join(lines)

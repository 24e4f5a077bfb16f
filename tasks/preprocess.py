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
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.atomic import atomic_directory, write_json
from tasks.clinical import ClinicalEncoder, parse_age
from tasks.dataset import IMAGES_FILE
from tasks.decoding import decode_claimed_shards, decode_shard_into, share_shard_counter
from tasks.duplicates import split_groups
from tasks.errors import DataError
from tasks.images import decode_shard
from tasks.ingest import read_raw_metadata
from tasks.metadata import require_columns
from tasks.params import PreprocessParams
from tasks.schema import DIAGNOSES, LOCALIZATIONS, RAW_METADATA_FILE, RISK_LEVELS, SEXES, raw_image_paths
from tasks.shards import Executor, map_shards, require_executor

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
    duplicates: dict | None = None  # tasks.duplicates.SplitGroups.summary()


def clinical_frame(raw: pd.DataFrame, source: Path) -> pd.DataFrame:
    """Typed clinical columns from the raw string table, with errors naming the row."""
    require_columns(raw, source)
    frame = raw.copy()
    ages = []
    for line, (image_id, value) in enumerate(zip(frame["image_id"], frame["age"], strict=True), 2):
        ages.append(parse_age(value, where=f"{source} line {line} (image_id {image_id})"))
    frame["age"] = ages
    for column, accepted in (("dx", DIAGNOSES), ("sex", SEXES), ("localization", LOCALIZATIONS)):
        unknown = frame.loc[~frame[column].isin(accepted)]
        if not unknown.empty:
            first = unknown.index[0]
            raise DataError(
                f"{source} line {first + 2} (image_id {unknown.at[first, 'image_id']}): unknown {column} "
                f"{unknown.at[first, column]!r} ({len(unknown)} row(s) in all); accepted: {list(accepted)}. "
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


def _shards(paths: Sequence[str | Path], workers: int) -> list[tuple[int, list[str]]]:
    """``paths`` cut into ``(first_row, paths)`` shards for ``workers`` workers (0: one per core)."""
    n_workers = workers or os.cpu_count() or 1
    # Small shards: the last ones finish close together (256-image shards left a worker idle ~0.2 s)
    chunk = max(16, min(128, len(paths) // (n_workers * 8) or 1))
    return [(start, [str(p) for p in paths[start : start + chunk]]) for start in range(0, len(paths), chunk)]


def _create_images_file(out: Path, n_images: int, size: int) -> int:
    """Create the ``.npy`` file ``out`` for ``n_images`` images (its data not yet written: a sparse
    file) and return the offset of the data, where the workers write."""
    created = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(n_images, size, size, 3))
    offset = created.offset
    del created  # unmapped: the workers write through the file
    return offset


def _decode_in_memory(
    paths: Sequence[str | Path], size: int, workers: int, executor: Executor, dask_address: str
) -> np.ndarray:
    """The decoded images as one array, the shards run by :func:`tasks.shards.map_shards`."""
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    shards = _shards(paths, workers)
    if shards:
        decode = partial(decode_shard, size=size)
        blocks = map_shards(
            decode,
            [rows for _, rows in shards],
            executor=executor,
            workers=workers,
            dask_address=dask_address,
            desc="decode images",
        )
        for (start, _), block in zip(shards, blocks, strict=True):
            images[start : start + len(block)] = block
    return images


def _decode_into_file(
    paths: Sequence[str | Path], size: int, out: Path, workers: int, executor: Executor, dask_address: str
) -> None:
    """The decoded images written to the ``.npy`` file ``out``: by local workers straight into it,
    or gathered from Dask and saved."""
    if not paths or executor == "dask":
        np.save(out, _decode_in_memory(paths, size, workers, executor, dask_address))
        return
    fill = partial(decode_shard_into, size=size, out=str(out), offset=_create_images_file(out, len(paths), size))
    map_shards(fill, _shards(paths, workers), executor=executor, workers=workers, desc="decode images")


class ImageDecoding:
    """Decoding images into the ``.npy`` file ``out`` while the caller does other work.

    ``with ImageDecoding(size, out, ...) as decoding:`` gets the workers ready (spawned worker
    processes take 0.1 s to start: they start now, while the caller reads its metadata);
    :meth:`start` gives them the paths; :meth:`finish` waits for the decoding and returns the
    seconds since :meth:`start`. With local processes (the default) there is one worker process
    per core beyond the first, and :meth:`finish` makes the calling thread the last worker: it
    claims shards from the same counter once its own work is done, so it never competes with that
    work for the GIL or for a core. Otherwise (threads, Dask, one worker) the decoding runs from a
    background thread. The array is the same byte for byte whichever worker decoded which shard.

    Leaving the block waits for every worker, and after an exception no further shard is started:
    nothing writes into ``out`` once the block is left.
    """

    def __init__(
        self, size: int, out: Path, *, workers: int = 0, executor: Executor = "processes", dask_address: str = ""
    ) -> None:
        require_executor(executor)
        self.size, self.out = size, Path(out)
        self.workers, self.executor, self.dask_address = workers, executor, dask_address
        self._counter = None
        self._n_processes = 0
        self._decode: Callable[..., int] | None = None
        self._pending: list[Future] = []

    def __enter__(self) -> ImageDecoding:
        n_processes = (self.workers or os.cpu_count() or 1) - 1
        if self.executor == "processes" and n_processes > 0:
            self._n_processes = n_processes
            # spawn, not fork: the caller may already have TensorFlow (and its threads) loaded
            context = multiprocessing.get_context("spawn")
            self._counter = context.Value("q", 0)
            self._pool = ProcessPoolExecutor(
                n_processes, mp_context=context, initializer=share_shard_counter, initargs=(self._counter,)
            )
            for _ in range(n_processes):  # a process is spawned per task submitted: start them all now
                self._pool.submit(os.getpid)
        else:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="decode")
        return self

    def start(self, paths: Sequence[str | Path]) -> None:
        """Begin decoding ``paths`` (row ``i`` of ``out`` is ``paths[i]``)."""
        self._started = time.perf_counter()
        if self._counter is None:
            decode = partial(
                _decode_into_file, paths, self.size, self.out, self.workers, self.executor, self.dask_address
            )
            self._pending = [self._pool.submit(decode)]
            return
        if not paths:
            np.save(self.out, np.empty((0, self.size, self.size, 3), dtype=np.uint8))
            return
        offset = _create_images_file(self.out, len(paths), self.size)
        self._decode = partial(decode_claimed_shards, _shards(paths, self.workers), self.size, str(self.out), offset)
        self._pending = [self._pool.submit(self._decode) for _ in range(self._n_processes)]

    def finish(self) -> float:
        """Decode alongside the workers (local processes) and wait for all of them; the seconds
        since :meth:`start`. A worker's error is raised here."""
        if self._decode is not None:
            self._decode(counter=self._counter)
        for future in self._pending:
            future.result()
        return time.perf_counter() - self._started

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None and self._counter is not None:
            with self._counter.get_lock():
                self._counter.value = 1 << 62  # every shard claimed: the workers stop after their current one
        self._pool.shutdown(wait=True, cancel_futures=True)


def decode_images(
    paths: Sequence[str | Path],
    size: int,
    workers: int = 0,
    executor: Executor = "processes",
    dask_address: str = "",
    *,
    out: Path | None = None,
) -> np.ndarray:
    """Decode and resize ``paths`` into one uint8 array (N x size x size x 3), in parallel shards.

    The shards run in local processes or threads (``workers``; 0: one per core, 1: here) or, with
    ``executor="dask"``, on a Dask cluster (``dask_address``, or a local one of ``workers``
    processes); the array is the same byte for byte either way (see ``tasks.shards``).

    With ``out`` the array is the ``.npy`` file there, returned memory-mapped read-only: local
    workers write their rows into it directly instead of sending them back (see
    :func:`tasks.decoding.decode_shard_into` and :class:`ImageDecoding`).
    """
    if out is None:
        return _decode_in_memory(paths, size, workers, executor, dask_address)
    with ImageDecoding(size, out, workers=workers, executor=executor, dask_address=dask_address) as decoding:
        decoding.start(paths)
        decoding.finish()
    return np.load(out, mmap_mode="r")


def preprocess(
    raw_dir: Path, processed_dir: Path, params: PreprocessParams, *, reports_dir: Path | None = None
) -> PreprocessSummary:
    """Run the preprocess stage from ``raw_dir`` into ``processed_dir`` (see module docstring).

    The images are decoded by worker processes while the splits and the clinical encoding are
    computed here; then this thread decodes too (see :class:`ImageDecoding`): the stage takes
    little longer than the decoding.
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
        frame = assign_risk_levels(clinical_frame(raw, source), params)
        n_before = len(frame)
        if params.missing_clinical == "drop":
            frame = frame.loc[frame["age"].notna()]
        frame = frame.reset_index(drop=True)
        n_dropped = n_before - len(frame)
        decoding.start(raw_image_paths(raw_dir, frame["image_id"]))
        # The duplicate search needs every image's pixels before the split: this thread decodes too
        seconds_decoding = decoding.finish()
        duplicates = split_groups(
            frame["lesion_id"],
            frame["image_id"],
            np.load(staging / IMAGES_FILE, mmap_mode="r"),
            params.duplicate_max_distance,
        )
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
                "duplicates": duplicates.summary(),
            },
        )
    summary = PreprocessSummary(
        n_images=len(frame),
        n_dropped=n_dropped,
        counts=counts,
        lesions=lesions,
        image_size=params.image_size,
        seconds_decoding=round(seconds_decoding, 3),
        duplicates=duplicates.summary(),
    )
    if reports_dir is not None:
        write_json(
            Path(reports_dir) / "preprocess.json",
            {
                "counts": counts,
                "lesions": lesions,
                "n_images": summary.n_images,
                "n_dropped": n_dropped,
                "duplicates": duplicates.summary(),
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
    if summary.duplicates and summary.duplicates["merged_groups"]:
        lines.append(
            f"near-duplicate images joined {summary.duplicates['merged_lesions']} lesion_ids into "
            f"{summary.duplicates['merged_groups']} split group(s) (preprocess.duplicate_max_distance)"
        )
    return "\n".join(lines)

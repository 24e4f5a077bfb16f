"""Triage scoring: a batch of new cases becomes a queue ranked by risk, with a recommended action.

Every row is checked on its own (image readable, clinical fields valid); invalid rows are
reported with their reasons and do not stop the others.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.atomic import atomic_path
from tasks.clinical import ClinicalEncoder, is_blank
from tasks.errors import DataError, SkinriskError
from tasks.images import load_image
from tasks.schema import RISK_LEVELS
from tasks.shards import Executor, map_shards

REQUIRED_COLUMNS = ("image", "age", "sex", "localization")
ACTIONS = {
    "refer": "refer urgently (suspected melanoma)",
    "moderate": "dermatology review within weeks",
    "low": "routine monitoring",
}


@dataclass(frozen=True)
class TriageSummary:
    n_cases: int
    n_scored: int
    n_invalid: int
    n_referred: int
    queue_path: str
    invalid_path: str | None
    seconds_scoring: float


def action_for(risk_level: str, refer: bool) -> str:
    """The recommended action: the triage threshold decides referral, the level the rest."""
    if refer:
        return ACTIONS["refer"]
    return ACTIONS["moderate"] if risk_level in ("moderate", "high") else ACTIONS["low"]


def _check_row(row: Mapping, images_dir: Path, image_size: int, encoder: ClinicalEncoder) -> tuple[np.ndarray, float]:
    """The decoded image and parsed age of one case; raises DataError naming the field."""
    if is_blank(row["image"]):
        raise DataError("image: empty")
    age = encoder.check(row["age"], row["sex"], row["localization"])
    root = Path(images_dir).resolve()
    path = (root / str(row["image"])).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"image: {row['image']} is outside the images folder {images_dir}; give a path inside it")
    if not path.is_file():
        raise DataError(f"image: {path} not found")
    return load_image(path, image_size), age


def _check_rows(
    rows: list[tuple[int, dict]], images_dir: str, image_size: int, encoder: ClinicalEncoder
) -> list[tuple[int, np.ndarray | None, float | None, str | None]]:
    """One shard of cases: (index, image, age, None) for a valid row, (index, None, None, reason) else."""
    checked = []
    for index, row in rows:
        try:
            checked.append((index, *_check_row(row, Path(images_dir), image_size, encoder), None))
        except DataError as exc:
            checked.append((index, None, None, str(exc)))
    return checked


def triage(
    bundle,
    cases_csv: Path,
    images_dir: Path,
    out_csv: Path,
    *,
    executor: Executor = "processes",
    workers: int = 1,
    dask_address: str = "",
    shard_size: int = 64,
) -> TriageSummary:
    """Score ``cases_csv`` (columns image, age, sex, localization; others kept) into a ranked queue.

    Writes ``out_csv`` (valid cases, highest P(high) first, with p_low/p_moderate/p_high, the
    risk level, whether the triage threshold refers it, and the action) and, when any row is
    invalid, ``<out>.invalid.csv`` with each row's reasons. Both are written atomically.

    Checking and decoding the rows is split into shards of ``shard_size`` cases that run here
    (``workers=1``, the default), in local processes or threads, or on a Dask cluster (``executor="dask"``,
    ``dask_address``; see ``tasks.shards``); the queue is the same either way. The model scores
    the valid images here, in batches.
    """
    from tasks.scored_model import predict_risk

    cases_csv, out_csv = Path(cases_csv), Path(out_csv)
    if not cases_csv.is_file():
        raise SkinriskError(f"cases file {cases_csv} not found")
    try:
        cases = pd.read_csv(cases_csv, dtype={"image": str, "sex": str, "localization": str}, keep_default_na=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0][:200]
        raise DataError(
            f"{cases_csv} is not a readable cases CSV ({reason}); give a UTF-8 CSV with a header row "
            f"{','.join(REQUIRED_COLUMNS)}"
        ) from None
    for column in ("image", "sex", "localization"):  # as `skinrisk data import` reads them
        if column in cases.columns:
            cases[column] = cases[column].str.strip()
    missing = [c for c in REQUIRED_COLUMNS if c not in cases.columns]
    if missing:
        raise SkinriskError(f"{cases_csv}: missing column(s) {missing}; a cases file has {list(REQUIRED_COLUMNS)}")
    if bundle.operating_point is None:
        raise SkinriskError("the model carries no triage threshold (models/operating_point.json): evaluate it first")

    rows = [(index, row.to_dict()) for index, row in cases.iterrows()]
    checked = map_shards(
        partial(_check_rows, images_dir=str(images_dir), image_size=bundle.summary.image_size, encoder=bundle.encoder),
        [rows[s : s + shard_size] for s in range(0, len(rows), shard_size)],
        executor=executor,
        workers=workers,
        dask_address=dask_address,
        desc="check cases",
    )
    images, ages, valid_rows, problems = [], [], [], []
    for index, image, age, reason in (case for shard in checked for case in shard):
        if reason is not None:
            problems.append({"row": int(index) + 2, "image": cases.at[index, "image"], "reason": reason})  # file line
            continue
        images.append(image)
        ages.append(age)
        valid_rows.append(index)

    started = time.perf_counter()
    valid = cases.loc[valid_rows].copy()
    if valid_rows:
        valid["age"] = ages
        probs = predict_risk(bundle, np.stack(images), bundle.encoder.transform(valid))
    else:
        probs = np.zeros((0, len(RISK_LEVELS)))
    seconds = time.perf_counter() - started
    for i, level in enumerate(RISK_LEVELS):
        valid[f"p_{level}"] = probs[:, i].round(4)
    valid["risk_level"] = [RISK_LEVELS[i] for i in bundle.called_levels(probs)]
    valid["refer"] = valid["p_high"] >= float(bundle.operating_point["threshold"])
    valid["action"] = list(map(action_for, valid["risk_level"], valid["refer"]))
    queue = valid.sort_values(["p_high", "p_moderate"], ascending=False, kind="stable")
    queue.insert(0, "rank", range(1, len(queue) + 1))
    with atomic_path(out_csv) as tmp:
        queue.to_csv(tmp, index=False)
    invalid_path = out_csv.with_name(out_csv.stem + ".invalid.csv")
    if problems:
        with atomic_path(invalid_path) as tmp:
            pd.DataFrame(problems).to_csv(tmp, index=False)
    else:  # an earlier run's invalid rows do not describe this queue
        invalid_path.unlink(missing_ok=True)
        invalid_path = None
    return TriageSummary(
        n_cases=len(cases),
        n_scored=len(queue),
        n_invalid=len(problems),
        n_referred=int(queue["refer"].sum()),
        queue_path=str(out_csv),
        invalid_path=str(invalid_path) if invalid_path else None,
        seconds_scoring=round(seconds, 3),
    )

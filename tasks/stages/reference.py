"""The reference stage: the drift reference profile of the trained model's training data.

:func:`build_reference_profile` summarises up to ``monitor.reference_size`` training lesions (one
image each) in one file (``models/reference_profile.parquet``; see :mod:`tasks.drift_profile` for
what it holds), which the monitoring of new batches (``skinrisk monitor``,
``tasks/stages/monitor.py``) compares against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tasks.drift_profile import fit_reference, one_per_lesion, original_sizes
from tasks.errors import DataError
from tasks.params import MonitorParams
from tasks.scored_model import bundle_from_files


def build_reference_profile(
    model_path: Path,
    processed_dir: Path,
    out_path: Path,
    params: MonitorParams,
    *,
    raw_dir: Path | None = None,
    run_id: str | None = None,
) -> Path:
    """Build the reference profile from up to ``params.reference_size`` training lesions; returns ``out_path``.

    Reads the training split (images as the model saw them), ``cases.csv`` (raw age, sex and site),
    ``encoder.json`` and ``preprocess.json``. With ``raw_dir`` (the import the data was preprocessed
    from) the original image sizes are profiled, and so monitored, too. With ``run_id`` the profile
    is logged to that MLflow run (``monitoring/``) as the model's drift reference.
    """
    from tasks.dataset import load_split
    from tasks.schema import CASES_FILE, raw_image_path

    processed_dir = Path(processed_dir)
    train = load_split(processed_dir, "train")
    cases_path = processed_dir / CASES_FILE
    if not cases_path.exists():
        raise DataError(f"{cases_path} not found: run `skinrisk preprocess` first")
    cases = pd.read_csv(cases_path, dtype=str, keep_default_na=False).set_index("image_id")
    cases["age"] = pd.to_numeric(cases["age"], errors="coerce")
    train_ids = train.image_id.astype(str)
    missing = [i for i in train_ids if i not in cases.index]
    if missing:
        raise DataError(f"{cases_path} lacks {len(missing)} training image(s), e.g. {missing[:5]}; rerun preprocess")

    # One image per lesion (see one_per_lesion), then a seeded sample of reference_size of them.
    lesions = cases.loc[train_ids, "lesion_id"]
    rows = one_per_lesion(lesions.to_numpy(), params.seed)
    if len(rows) > params.reference_size:
        rows = np.sort(np.random.default_rng(params.seed).choice(rows, size=params.reference_size, replace=False))
    image_ids = train_ids[rows]
    frame = cases.loc[image_ids, ["age", "sex", "localization"]].reset_index()

    sizes = None
    if raw_dir is not None:
        paths = [raw_image_path(Path(raw_dir), i) for i in image_ids]
        if all(p.exists() for p in paths):
            sizes = original_sizes(paths)

    bundle = bundle_from_files(Path(model_path), processed_dir)
    profile = fit_reference(
        bundle,
        frame,
        train.images[rows],
        params,
        sizes=sizes,
        meta={
            "model_path": str(model_path),
            "processed_dir": str(processed_dir),
            "n_training_images": len(train),
            "n_training_lesions": int(lesions.nunique()),
            "original_sizes": sizes is not None,
        },
    )
    saved = profile.save(Path(out_path))
    if run_id:
        from tasks.tracking import log_artifacts

        log_artifacts(run_id, [saved], artifact_path="monitoring")
    return saved

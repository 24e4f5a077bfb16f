"""The cross-validation benchmark's folds: grouped by lesion, stratified, laid out as preprocess does."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

from tasks.dataset import load_split
from tests.support import PROJECT_ROOT


@pytest.fixture(scope="module")
def cv():
    spec = importlib.util.spec_from_file_location("cv_quality", PROJECT_ROOT / "benchmarks" / "cv_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_folds_never_share_a_lesion_and_keep_the_risk_mix(cv, processed_dir):
    cases = pd.read_csv(processed_dir / "cases.csv")
    folds = cv.fold_assignment(cases, 5, seed=0)
    assert set(folds) == set(range(5))
    lesion_folds = cases.assign(fold=folds).groupby("lesion_id")["fold"].nunique()
    assert (lesion_folds == 1).all(), "every image of a lesion is in one fold"
    overall = cases["risk_level"].value_counts(normalize=True)
    for k in range(5):
        share = cases.loc[folds == k, "risk_level"].value_counts(normalize=True)
        assert abs(share.get("high", 0) - overall["high"]) < 0.08
    np.testing.assert_array_equal(folds, cv.fold_assignment(cases, 5, seed=0))  # candidates share the folds


def test_a_fold_directory_splits_by_lesion_and_holds_out_exactly_its_fold(cv, processed_dir, tmp_path):
    cases = pd.read_csv(processed_dir / "cases.csv")
    folds = cv.fold_assignment(cases, 4, seed=0)
    out = tmp_path / "fold-1"
    cv.write_fold(processed_dir, out, cases, folds, 1, val_fraction=0.2, seed=0, missing="drop")
    lesions = {}
    for split in ("train", "val", "test"):
        arrays = load_split(out, split)
        ids = set(arrays.image_id)
        lesions[split] = set(cases.loc[cases["image_id"].isin(ids), "lesion_id"])
        assert len(arrays) > 0
    assert set(load_split(out, "test").image_id) == set(cases.loc[folds == 1, "image_id"])
    assert not lesions["train"] & lesions["val"] and not lesions["train"] & lesions["test"]
    assert not lesions["val"] & lesions["test"]
    # the pixels are the preprocess output's own rows
    original = load_split(processed_dir, "test")
    fold_test = load_split(out, "test")
    row = {image_id: i for i, image_id in enumerate(fold_test.image_id)}
    for i, image_id in enumerate(original.image_id[:5]):
        if image_id in row:
            np.testing.assert_array_equal(fold_test.images[row[image_id]], original.images[i])

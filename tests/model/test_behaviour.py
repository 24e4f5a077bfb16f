"""Behavioural tests (Made-With-ML's sense): what the pipeline's predictions must not depend on.

- invariance to a horizontal flip: dermoscopic images have no left or right, and the saved model
  averages its test-time views, so a mirrored image gets the same risk probabilities;
- invariance to the order of the metadata rows: the preprocess stage puts every image in the same
  split, with the same clinical features, however ``metadata.csv`` is ordered.

Each invariance is checked against a control that shows the test can fail: the single-view model
does change under a flip, and the shuffled metadata really is in another order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.clinical import ClinicalEncoder
from tasks.dataset import load_split
from tasks.model import build_model, inference_model, load_model
from tasks.params import PreprocessParams
from tasks.schema import (
    CASES_FILE,
    ENCODER_FILE,
    RAW_IMAGES_DIR,
    RAW_METADATA_FILE,
    RISK_LEVELS,
    SPLITS,
    read_preprocess_summary,
)
from tasks.scored_model import Bundle, predict_risk
from tasks.stages.preprocess import preprocess
from tests.support import tiny_train_params

TEMPERATURE = 1.7  # any fitted temperature: it scales every view alike


@pytest.fixture(scope="module")
def single_view_model(processed_dir):
    """The project's single-view network with its bundled ImageNet backbone (``train.weights:
    imagenet``) and an untrained head: its output depends on the image, as a trained one's does.
    (A random-init backbone is not enough: its embedding is ~1e-11, the same for every image.)"""
    encoder = ClinicalEncoder.load(processed_dir / ENCODER_FILE)
    return build_model(32, encoder.n_features, len(RISK_LEVELS), tiny_train_params(weights="imagenet", alpha=1.0))


def _saved_bundle(base, processed_dir: Path, path: Path, tta: str) -> Bundle:
    """``base`` saved as the train stage saves it (test-time views and temperature inside the
    graph), loaded back with the preprocessing it was trained on."""
    inference_model(base, tta, temperature=TEMPERATURE).save(path)
    return Bundle(
        model=load_model(path),
        encoder=ClinicalEncoder.load(processed_dir / ENCODER_FILE),
        summary=read_preprocess_summary(processed_dir),
        operating_point=None,
    )


def _mirrored(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, :, ::-1])  # N x H x W x C: W is axis 2


@pytest.fixture(scope="module")
def held_out_cases(processed_dir):
    test = load_split(processed_dir, "test")
    return test.images, test.clinical


@pytest.mark.parametrize("tta", ["flips", "none"])
def test_a_mirrored_image_keeps_its_risk_only_through_the_test_time_views(
    tta, single_view_model, processed_dir, held_out_cases, tmp_path
) -> None:
    images, clinical = held_out_cases
    bundle = _saved_bundle(single_view_model, processed_dir, tmp_path / f"model-{tta}.keras", tta)

    probs = predict_risk(bundle, images, clinical)
    mirrored = predict_risk(bundle, _mirrored(images), clinical)

    change = np.abs(probs - mirrored).max()
    if tta == "flips":
        # The mirror of an image has the same four views, only averaged in another order.
        assert change < 1e-5, f"a mirrored image changes the probabilities by {change:.2e}"
        np.testing.assert_array_equal(bundle.called_levels(probs), bundle.called_levels(mirrored))
    else:
        # The control: one view of the same network is not mirror-symmetric, so the invariance
        # above comes from the test-time views, and the check there can fail.
        assert change > 1e-3, f"the single view changes by only {change:.2e}: the flips check proves nothing"


def _per_image(processed_dir: Path) -> pd.DataFrame:
    """Split, labels and clinical features of every image, indexed by image_id (not row order)."""
    rows = []
    for split in SPLITS:
        arrays = load_split(processed_dir, split)
        for image_id, features, risk, dx in zip(arrays.image_id, arrays.clinical, arrays.risk, arrays.dx, strict=True):
            rows.append(
                {"image_id": str(image_id), "split": split, "risk": int(risk), "dx": int(dx), "clinical": features}
            )
    return pd.DataFrame(rows).set_index("image_id").sort_index()


def test_preprocess_does_not_depend_on_the_order_of_the_metadata_rows(raw_dir, processed_dir, tmp_path) -> None:
    metadata = pd.read_csv(raw_dir / RAW_METADATA_FILE, dtype=str, keep_default_na=False)
    shuffled = metadata.sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert (shuffled["image_id"] != metadata["image_id"]).mean() > 0.9, "the shuffle left the order as it was"
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / RAW_IMAGES_DIR).symlink_to(raw_dir / RAW_IMAGES_DIR)
    shuffled.to_csv(raw / RAW_METADATA_FILE, index=False)

    preprocess(raw, tmp_path / "processed", PreprocessParams(image_size=32, workers=1))  # as processed_dir

    original, reordered = _per_image(processed_dir), _per_image(tmp_path / "processed")
    assert reordered.index.equals(original.index), "the same images are kept"
    moved = original.index[original["split"] != reordered["split"]]
    assert moved.empty, f"{len(moved)} image(s) change split with the row order, e.g. {list(moved[:5])}"
    pd.testing.assert_frame_equal(reordered[["risk", "dx"]], original[["risk", "dx"]])
    # The encoder is fitted on the same training rows; only the order of summation differs.
    np.testing.assert_allclose(np.stack(reordered["clinical"]), np.stack(original["clinical"]), rtol=0, atol=1e-6)
    # The control: the stage really saw the rows in another order (its output follows the input).
    order = [
        pd.read_csv(d / CASES_FILE, usecols=["image_id"])["image_id"].tolist()
        for d in (processed_dir, tmp_path / "processed")
    ]
    assert order[0] != order[1]

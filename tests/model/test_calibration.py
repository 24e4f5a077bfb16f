"""Temperature scaling and test-time views: fitted on validation, saved inside the model, and the
same probabilities wherever the model is used (evaluate, the served pyfunc)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.pyfunc import PythonModelContext

from tasks.clinical import ClinicalEncoder
from tasks.model import (
    build_model,
    calibrated_single_view,
    head_of,
    inference_model,
    load_model,
    scoring_settings,
    served_output,
    single_view,
)
from tasks.params import TrainParams
from tasks.schema import DIAGNOSES, RISK_LEVELS
from tasks.stages.train import calibrated, class_weights, fit_temperature
from tests.model.test_register import SUMMARY, cases, input_sensitive

IMAGE_SIZE = 32
PARAMS = TrainParams(weights="none", alpha=0.35, image_units=8, clinical_units=4, fusion_units=8)
ENCODER = ClinicalEncoder(age_mean=50, age_std=15, age_fill=50, missing_policy="impute")
N_CLINICAL = ENCODER.n_features


def overconfident(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Views (1 x N x 3) of a classifier right 70% of the time that always says 97%."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    predicted = np.where(rng.random(n) < 0.7, labels, (labels + rng.integers(1, 3, n)) % 3)
    probs = np.full((n, 3), 0.015)
    probs[np.arange(n), predicted] = 0.97
    return probs[None], labels


def test_temperature_scaling_lowers_the_log_loss_of_overconfident_predictions():
    from tasks.metrics import expected_calibration_error

    views, labels = overconfident()
    temperature = fit_temperature(views, labels)
    rows = np.arange(len(labels))

    def nll(probs):
        return -np.log(probs[rows, labels]).mean()

    before, after = calibrated(views, 1.0), calibrated(views, temperature)
    assert temperature > 1.5, "over-confidence is cured by softening"
    assert nll(after) < nll(before) - 0.3
    assert expected_calibration_error(labels, after) < 0.03 < 0.2 < expected_calibration_error(labels, before)
    np.testing.assert_array_equal(after.argmax(axis=1), before.argmax(axis=1))  # the ranking is kept
    # held-out cases from the same classifier are better calibrated too
    test_views, test_labels = overconfident(seed=1)
    assert -np.log(calibrated(test_views, temperature)[np.arange(2000), test_labels]).mean() < nll(before)


def test_a_separable_validation_split_keeps_temperature_one():
    """Every case called right: the log loss falls as T does, so the fit would run to its bound."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    probs = np.full((300, 3), 0.2)
    probs[np.arange(300), labels] = 0.6  # right every time, unsure every time
    views = probs[None]
    rows = np.arange(300)
    assert -np.log(calibrated(views, 0.1)[rows, labels]).mean() < -np.log(probs[rows, labels]).mean()
    assert fit_temperature(views, labels) == 1.0
    # one case called wrong makes it identifiable again, and the fit sharpens these unsure predictions
    probs[0] = np.roll(probs[0], 1)
    assert fit_temperature(probs[None], labels) < 1.0


def test_class_weights_are_balanced_weights_to_a_power():
    labels = np.array([0] * 80 + [1] * 15 + [2] * 5)
    full, root, none = (class_weights(labels, 3, power) for power in (1.0, 0.5, 0.0))
    assert full == pytest.approx({0: 100 / 240, 1: 100 / 45, 2: 100 / 15})
    assert root == pytest.approx({c: w**0.5 for c, w in full.items()})
    assert none == {0: 1.0, 1: 1.0, 2: 1.0}
    assert class_weights(np.array([0, 0, 1]), 3)[2] == 1.0, "an absent class keeps weight 1"


@pytest.fixture(scope="module")
def base():
    return input_sensitive(build_model(IMAGE_SIZE, N_CLINICAL, len(RISK_LEVELS), PARAMS))


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calibrated") / "model.keras"
    inference_model(base, "flips", 0.5).save(path)
    return path


def _symmetric_image(rng) -> np.ndarray:
    image = rng.uniform(-1, 1, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    image = (image + image[::-1]) / 2
    return (image + image[:, ::-1]) / 2


def test_test_time_views_leave_a_flip_symmetric_image_unchanged(base):
    rng = np.random.default_rng(0)
    symmetric, clinical = _symmetric_image(rng)[None], rng.normal(size=(1, N_CLINICAL)).astype(np.float32)
    model = inference_model(base, "flips", 1.0)
    single = base.predict([symmetric, clinical], verbose=0)
    np.testing.assert_allclose(model.predict([symmetric, clinical], verbose=0), single, atol=1e-6)
    # an image that is not symmetric gets the mean of its four views, which the single view is not
    image = rng.uniform(-1, 1, (1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    views = [image, image[:, :, ::-1], image[:, ::-1], image[:, ::-1, ::-1]]
    mean = np.mean([base.predict([v, clinical], verbose=0) for v in views], axis=0)
    np.testing.assert_allclose(model.predict([image, clinical], verbose=0), mean, atol=1e-5)
    assert not np.allclose(base.predict([image, clinical], verbose=0), mean, atol=1e-4)


def test_dihedral_views_average_the_eight_quarter_turns_and_mirrors(base):
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    clinical = rng.normal(size=(2, N_CLINICAL)).astype(np.float32)
    turned = np.rot90(image, k=1, axes=(1, 2)).copy()
    model = inference_model(base, "dihedral", 1.0)
    # the mean over the whole group is the same for any member of it
    np.testing.assert_allclose(
        model.predict([turned, clinical], verbose=0), model.predict([image, clinical], verbose=0), atol=1e-5
    )


def test_the_saved_model_keeps_its_views_and_temperature(base, saved):
    loaded = load_model(saved)
    assert scoring_settings(loaded) == {"views": "flips", "temperature": 0.5}
    assert single_view(loaded).get_layer("out_relu") is not None
    rng = np.random.default_rng(2)
    image = rng.uniform(-1, 1, (3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    clinical = rng.normal(size=(3, N_CLINICAL)).astype(np.float32)
    np.testing.assert_allclose(
        loaded.predict([image, clinical], verbose=0),
        inference_model(base, "flips", 0.5).predict([image, clinical], verbose=0),
        atol=1e-6,
    )
    uncalibrated = inference_model(base, "flips", 1.0).predict([image, clinical], verbose=0)
    assert not np.allclose(loaded.predict([image, clinical], verbose=0), uncalibrated, atol=1e-3)


def test_the_calibrated_single_view_puts_the_temperature_in_the_head(saved):
    loaded = load_model(saved)
    explained = calibrated_single_view(loaded)
    rng = np.random.default_rng(3)
    image = rng.uniform(-1, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    clinical = rng.normal(size=(2, N_CLINICAL)).astype(np.float32)
    raw = single_view(loaded).predict([image, clinical], verbose=0)
    expected = calibrated(raw[None], 0.5)
    np.testing.assert_allclose(explained.predict([image, clinical], verbose=0), expected, atol=1e-5)
    # head and embedding compose to the whole (what SHAP's fast path relies on)
    from tasks.model import embedding_model

    embedding = embedding_model(explained).predict(image, verbose=0)
    np.testing.assert_allclose(head_of(explained).predict([embedding, clinical], verbose=0), expected, atol=1e-5)


def test_the_auxiliary_diagnosis_head_is_not_served():
    model = build_model(IMAGE_SIZE, N_CLINICAL, len(RISK_LEVELS), PARAMS, aux_classes=len(DIAGNOSES))
    assert [tuple(o.shape) for o in model.outputs] == [(None, 3), (None, 7)]
    served = served_output(model)
    assert tuple(served.output.shape) == (None, 3)
    names = [layer.name for layer in served.get_layer("fusion_head").layers]
    assert "dx_probabilities" not in names and "probabilities" in names


def test_the_pyfunc_and_evaluate_give_the_same_calibrated_probabilities(saved, tmp_path):
    from tasks.images import load_image
    from tasks.scored_model import Bundle, predict_risk
    from tasks.serving import RiskModel

    processed = tmp_path / "processed"
    processed.mkdir()
    encoder = ENCODER
    encoder.save(processed / "encoder.json")
    (processed / "preprocess.json").write_text(json.dumps(SUMMARY.to_json()), encoding="utf-8")
    point = tmp_path / "operating_point.json"
    point.write_text(json.dumps({"target": "risk", "threshold": 0.3, "target_recall": 0.9}), encoding="utf-8")
    served = RiskModel()
    served.load_context(
        PythonModelContext(
            artifacts={
                "model": str(saved),
                "encoder": str(processed / "encoder.json"),
                "preprocess": str(processed / "preprocess.json"),
                "operating_point": str(point),
            },
            model_config=None,
        )
    )
    frame = cases()
    served_probs = served.predict(None, frame)[["p_low", "p_moderate", "p_high"]].to_numpy()

    bundle = Bundle(model=load_model(saved), encoder=encoder, summary=SUMMARY, operating_point=None)
    images = np.stack([load_image(base64.b64decode(text), IMAGE_SIZE) for text in frame["image"]])
    clinical = encoder.transform(frame[["age", "sex", "localization"]])
    np.testing.assert_allclose(served_probs, predict_risk(bundle, images, clinical), atol=1e-5)


def test_the_views_the_temperature_is_fitted_on_are_the_saved_models(base):
    from tasks.dataset import SplitArrays
    from tasks.stages.train import view_probabilities

    # more cases than one predict batch (32) and than one chunk, an uneven last chunk
    rng = np.random.default_rng(5)
    n = 150
    split = SplitArrays(
        images=rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        clinical=rng.normal(size=(n, N_CLINICAL)).astype(np.float32),
        risk=rng.integers(0, 3, n),
        dx=rng.integers(0, 7, n),
        image_id=np.array([f"ISIC_{i}" for i in range(n)]),
    )
    views = view_probabilities(base, split, "flips", batch_size=64)
    assert views.shape == (4, n, 3)
    from tasks.images import normalize_for_mobilenet

    pixels = normalize_for_mobilenet(split.images)
    np.testing.assert_allclose(views[0], base.predict([pixels, split.clinical], verbose=0), atol=1e-5)
    np.testing.assert_allclose(views[1], base.predict([pixels[:, :, ::-1], split.clinical], verbose=0), atol=1e-5)
    saved = inference_model(base, "flips", 0.7).predict([pixels, split.clinical], verbose=0)
    np.testing.assert_allclose(calibrated(views, 0.7), saved, atol=1e-5)

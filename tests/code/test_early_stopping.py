"""Training's per-epoch validation figures and its best-epoch rule (no model is trained here)."""

import math

import numpy as np
import pytest

from tasks.dataset import SplitArrays
from tasks.errors import SkinriskError
from tasks.schema import PreprocessSummary
from tasks.stages.train import _check_monitor, _improved, _validation_figures, _worst
from tasks.tracking import numeric_metrics


class _FixedModel:
    """Stands in for the served model: the same probabilities whatever the input."""

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs

    def predict(self, inputs, verbose: int = 0) -> np.ndarray:
        return self.probs


def test_high_risk_figures_are_nan_without_a_high_risk_validation_case_and_are_not_logged():
    risk = np.array([0, 1, 0, 1])
    val = SplitArrays(
        images=np.zeros((4, 2, 2, 3), np.uint8),
        clinical=np.zeros((4, 1), np.float32),
        risk=risk,
        dx=risk,
        image_id=np.array(["a", "b", "c", "d"]),
    )
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    summary = PreprocessSummary(image_size=2, risk_map={}, counts={}, lesions={}, n_images=4, diagnoses=())
    figures = _validation_figures(_FixedModel(probs), val, None, "risk", summary)()
    assert math.isnan(figures["val_high_risk_auc"]) and math.isnan(figures["val_high_risk_recall"])
    assert figures["val_balanced_accuracy"] == pytest.approx(1.0)
    # MLflow gets the defined figures only (a NaN is skipped, never logged as 0).
    assert set(numeric_metrics(figures)) == {"val_loss", "val_accuracy", "val_balanced_accuracy"}


@pytest.mark.parametrize("monitor", ["val_loss", "val_high_risk_auc", "val_balanced_accuracy"])
def test_an_undefined_monitor_value_is_never_an_improvement(monitor):
    assert not _improved(monitor, math.nan, _worst(monitor))
    assert not _improved(monitor, math.nan, 0.5)
    assert _improved(monitor, 0.5, _worst(monitor))


def test_lower_is_better_only_for_the_loss():
    assert _improved("val_loss", 0.4, 0.5) and not _improved("val_loss", 0.6, 0.5)
    assert _improved("val_high_risk_auc", 0.6, 0.5) and not _improved("val_high_risk_auc", 0.4, 0.5)


@pytest.mark.parametrize("val_is_high", [np.zeros(5, bool), np.ones(5, bool)], ids=["no high risk", "all high risk"])
def test_a_monitor_undefined_on_the_validation_split_is_refused(val_is_high):
    with pytest.raises(SkinriskError, match=r"train\.monitor is val_high_risk_auc .* set train\.monitor to val_loss"):
        _check_monitor("val_high_risk_auc", val_is_high)
    _check_monitor("val_loss", val_is_high)
    _check_monitor("val_high_risk_auc", np.array([True, False]))


def test_each_epoch_prints_one_line_with_its_validation_figures():
    """Printed (not Keras' stdout bar), so the Prefect flow-run logs carry training progress."""
    from tasks.stages.train import epoch_line

    logs = {"loss": 0.71234, "val_loss": 0.39, "val_high_risk_auc": float("nan"), "learning_rate": 3e-4}
    assert epoch_line(5, 13, "finetune", logs) == (
        "epoch 5/13 (finetune): loss 0.7123, val_loss 0.3900, val high-risk AUC n/a, "
        "val balanced accuracy n/a, rate 3.00e-04"
    )

"""tasks.metrics against figures worked out by hand on small fixed predictions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.metrics import (
    bootstrap_interval,
    choose_threshold,
    classification_figures,
    expected_calibration_error,
    reliability_curve,
    risk_probabilities,
    triage_figures,
)
from tasks.plots import plot_confusion_matrix, plot_reliability, plot_training_curves
from tasks.schema import DIAGNOSES, RISK_LEVELS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Six cases, three classes (0 low, 1 moderate, 2 high). Argmax predictions: [0, 0, 1, 1, 2, 2].
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
PROBS = np.array(
    [
        [0.8, 0.1, 0.1],  # true 0, predicted 0
        [0.6, 0.3, 0.1],  # true 0, predicted 0
        [0.3, 0.5, 0.2],  # true 0, predicted 1
        [0.2, 0.7, 0.1],  # true 1, predicted 1
        [0.1, 0.4, 0.5],  # true 1, predicted 2
        [0.1, 0.2, 0.7],  # true 2, predicted 2
    ]
)
NAMES = list(RISK_LEVELS)


@pytest.fixture(scope="module")
def figures() -> dict:
    return classification_figures(Y_TRUE, PROBS, NAMES, n_resamples=200)


# --- classification figures --------------------------------------------------------------------


def test_accuracy_and_confusion_matrix(figures: dict) -> None:
    # Correct: cases 0, 1, 3, 5 -> 4/6.
    assert figures["accuracy"] == pytest.approx(4 / 6)
    # Rows true, columns predicted:
    #   true 0 -> predicted 0, 0, 1; true 1 -> predicted 1, 2; true 2 -> predicted 2.
    assert figures["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert figures["n_cases"] == 6


def test_per_class_precision_recall_f1(figures: dict) -> None:
    # From the confusion matrix:
    #   low:      precision 2/2 = 1,   recall 2/3, f1 = 2*1*(2/3)/(1+2/3) = 0.8
    #   moderate: precision 1/2,       recall 1/2, f1 = 0.5
    #   high:     precision 1/2,       recall 1/1, f1 = 2*0.5*1/1.5 = 2/3
    expected = {
        "low": (1.0, 2 / 3, 0.8, 3),
        "moderate": (0.5, 0.5, 0.5, 2),
        "high": (0.5, 1.0, 2 / 3, 1),
    }
    for name, (precision, recall, f1, support) in expected.items():
        per_class = figures["per_class"][name]
        assert per_class["precision"] == pytest.approx(precision)
        assert per_class["recall"] == pytest.approx(recall)
        assert per_class["f1"] == pytest.approx(f1)
        assert per_class["support"] == support


def test_balanced_accuracy_and_macro_f1(figures: dict) -> None:
    # Balanced accuracy = mean recall = (2/3 + 1/2 + 1) / 3 = 13/18 = 0.7222...
    assert figures["balanced_accuracy"] == pytest.approx(13 / 18)
    # Macro F1 = (0.8 + 0.5 + 2/3) / 3 = 59/90 = 0.6555...
    assert figures["macro_f1"] == pytest.approx(59 / 90)
    # High-risk recall with argmax predictions: the one high case is predicted high.
    assert figures["high_risk_recall"] == pytest.approx(1.0)


def test_log_loss(figures: dict) -> None:
    # Probabilities given to the true class: 0.8, 0.6, 0.3, 0.7, 0.4, 0.7; their product is
    # 0.028224, so loss = -ln(0.028224) / 6 = 3.565583 / 6 = 0.594597.
    assert figures["loss"] == pytest.approx(0.594597, abs=1e-6)


def test_roc_auc_one_vs_rest(figures: dict) -> None:
    # low vs rest: positives 0.8, 0.6, 0.3 all above negatives 0.2, 0.1, 0.1 -> 1.
    # moderate vs rest: positives 0.7, 0.4 against negatives 0.1, 0.3, 0.5, 0.2:
    #   0.7 beats all 4, 0.4 beats 3 of 4 -> 7/8 = 0.875.
    # high vs rest: positive 0.7 above negatives 0.1, 0.1, 0.2, 0.1, 0.5 -> 1.
    assert figures["roc_auc_per_class"] == pytest.approx({"low": 1.0, "moderate": 0.875, "high": 1.0})
    # Macro = (1 + 0.875 + 1) / 3 = 23/24.
    assert figures["roc_auc_ovr"] == pytest.approx(23 / 24)


def test_roc_auc_ties_count_half_and_absent_classes_are_skipped() -> None:
    y_true = np.array([0, 0, 1, 1])
    probs = np.array([[0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.6, 0.4, 0.0], [0.1, 0.9, 0.0]])
    result = classification_figures(y_true, probs, NAMES, n_resamples=50)
    # moderate vs rest: positives 0.4, 0.9 against negatives 0.4, 0.7:
    #   0.4 ties 0.4 (1/2) and loses to 0.7 (0); 0.9 beats both (2) -> 2.5/4 = 0.625.
    # low vs rest is its mirror (scores are 1 - moderate): also 0.625. high is absent: skipped.
    assert result["roc_auc_per_class"] == pytest.approx({"low": 0.625, "moderate": 0.625})
    assert result["roc_auc_ovr"] == pytest.approx(0.625)
    assert math.isnan(result["high_risk_recall"])


def test_figures_are_json_serialisable_with_plain_types() -> None:
    result = classification_figures(Y_TRUE, PROBS.astype(np.float32), NAMES, threshold=0.5, n_resamples=100)
    text = json.dumps(result)
    assert json.loads(text)["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        else:
            assert type(value) in (int, float, str), f"{value!r} is {type(value)}"

    walk(result)
    lo, hi = result["balanced_accuracy_ci95"]
    assert lo <= result["balanced_accuracy"] <= hi


def test_figures_at_an_operating_point() -> None:
    # p_high = [0.1, 0.1, 0.2, 0.1, 0.5, 0.7]; threshold 0.5 refers cases 4 and 5.
    # high (case 5): referred -> recall 1. Non-high (cases 0-4): case 4 referred -> 4/5 spared.
    # Referral rate 2/6. Low (cases 0-2): none referred -> spared 1.
    result = classification_figures(Y_TRUE, PROBS, NAMES, threshold=0.5, n_resamples=100)
    triage = result["triage"]
    assert triage["high_risk_recall"] == pytest.approx(1.0)
    assert triage["specificity"] == pytest.approx(4 / 5)
    assert triage["referral_rate"] == pytest.approx(2 / 6)
    assert triage["low_risk_spared"] == pytest.approx(1.0)
    assert triage["threshold"] == 0.5
    assert triage["high_risk_recall_ci95"] == pytest.approx([1.0, 1.0])
    assert "triage" not in classification_figures(Y_TRUE, PROBS, NAMES, n_resamples=10)


def test_rejects_rows_that_are_not_probabilities() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        classification_figures(Y_TRUE, PROBS * 2, NAMES)
    with pytest.raises(ValueError, match="class_names"):
        classification_figures(Y_TRUE, PROBS, ["a", "b"])


# --- calibration -------------------------------------------------------------------------------


def test_ece_with_two_bins_by_hand() -> None:
    # Top-label confidences: 0.8, 0.6, 0.5, 0.7, 0.5, 0.7; correct: 1, 1, 0, 1, 0, 1.
    # Bins (0, 0.5] and (0.5, 1]; 0.5 sits in the lower bin.
    #   (0, 0.5]: cases 2, 4 -> confidence 0.5, accuracy 0 -> gap 0.5, weight 2/6
    #   (0.5, 1]: cases 0, 1, 3, 5 -> confidence (0.8+0.6+0.7+0.7)/4 = 0.7, accuracy 1
    #             -> gap 0.3, weight 4/6
    # ECE = 2/6 * 0.5 + 4/6 * 0.3 = 1/6 + 1/5 = 11/30.
    assert expected_calibration_error(Y_TRUE, PROBS, n_bins=2) == pytest.approx(11 / 30)

    curve = reliability_curve(Y_TRUE, PROBS, n_bins=2)
    assert list(curve.columns) == [
        "bin_lower",
        "bin_upper",
        "count",
        "mean_confidence",
        "accuracy",
    ]
    assert curve["bin_lower"].tolist() == [0.0, 0.5]
    assert curve["bin_upper"].tolist() == [0.5, 1.0]
    assert curve["count"].tolist() == [2, 4]
    assert curve["mean_confidence"].tolist() == pytest.approx([0.5, 0.7])
    assert curve["accuracy"].tolist() == pytest.approx([0.0, 1.0])


def test_ece_is_zero_when_confidence_matches_accuracy_and_empty_bins_are_nan() -> None:
    # Four cases at confidence 0.75, three of them right: accuracy 0.75 in that bin.
    y_true = np.array([0, 0, 0, 1])
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(y_true, probs, n_bins=4) == pytest.approx(0.0)
    curve = reliability_curve(y_true, probs, n_bins=4)
    assert curve["count"].tolist() == [0, 0, 4, 0]
    assert curve["accuracy"].isna().tolist() == [True, True, False, True]


def test_the_figures_ece_uses_the_given_number_of_bins() -> None:
    # evaluate.calibration_bins sets metrics.json's ece, not only the reliability plot's.
    default = classification_figures(Y_TRUE, PROBS, NAMES, n_resamples=10)["ece"]
    three_bins = classification_figures(Y_TRUE, PROBS, NAMES, n_resamples=10, calibration_bins=3)["ece"]
    assert three_bins == pytest.approx(expected_calibration_error(Y_TRUE, PROBS, n_bins=3))
    assert default == pytest.approx(expected_calibration_error(Y_TRUE, PROBS))
    assert three_bins != pytest.approx(default)


# --- triage ------------------------------------------------------------------------------------

# Nine lesions: three high, two moderate, four low.
Y_RISK = np.array([2, 2, 2, 1, 1, 0, 0, 0, 0])
P_HIGH = np.array([0.9, 0.6, 0.3, 0.7, 0.2, 0.65, 0.5, 0.1, 0.05])


def test_choose_threshold_picks_the_highest_that_reaches_the_recall() -> None:
    y_high = (Y_RISK == 2).astype(int)
    # Positives score 0.9, 0.6, 0.3. Recall 0.66 needs 2 of 3 referred: t = 0.6 (at 0.61 only
    # one is referred).
    assert choose_threshold(y_high, P_HIGH, 0.66) == 0.6
    assert choose_threshold(y_high, P_HIGH, 2 / 3) == 0.6
    assert choose_threshold(y_high, P_HIGH, 0.3) == 0.9  # 1 of 3 is enough
    assert choose_threshold(y_high, P_HIGH, 0.67) == 0.3  # needs all 3
    assert choose_threshold(y_high, P_HIGH, 1.0) == 0.3
    # Just above the chosen threshold the recall falls below the target.
    above = np.nextafter(0.6, 1.0)
    assert np.mean(P_HIGH[y_high == 1] >= above) < 0.66


def test_choose_threshold_errors() -> None:
    with pytest.raises(ValueError, match="no high-risk cases"):
        choose_threshold(np.zeros(4, dtype=int), np.linspace(0, 1, 4), 0.9)
    with pytest.raises(ValueError, match="target_recall"):
        choose_threshold(np.array([1, 0]), np.array([0.9, 0.1]), 0.0)
    with pytest.raises(ValueError, match="binary"):
        choose_threshold(np.array([2, 0]), np.array([0.9, 0.1]), 0.5)


def test_triage_figures_by_hand() -> None:
    threshold = choose_threshold((Y_RISK == 2).astype(int), P_HIGH, 0.66)
    # Referred (p >= 0.6): cases 0, 1 (high), 3 (moderate, 0.7), 5 (low, 0.65) -> 4 of 9.
    #   high-risk recall: 2 of 3 high                      = 2/3
    #   specificity: non-high are cases 3-8 (6), 2 referred = 4/6
    #   low spared: low are cases 5-8 (4), 1 referred       = 3/4
    assert triage_figures(Y_RISK, P_HIGH, threshold) == pytest.approx(
        {
            "high_risk_recall": 2 / 3,
            "specificity": 4 / 6,
            "referral_rate": 4 / 9,
            "low_risk_spared": 3 / 4,
            "threshold": 0.6,
        }
    )


# --- risk probabilities ------------------------------------------------------------------------

DEFAULT_RISK_MAP = {
    "high": ["mel"],
    "moderate": ["bcc", "akiec"],
    "low": ["nv", "bkl", "df", "vasc"],
}


def test_risk_probabilities_sums_diagnoses_per_level() -> None:
    assert DIAGNOSES == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    dx_probs = np.array(
        [
            # akiec bcc   bkl   df    mel  nv    vasc
            [0.10, 0.20, 0.05, 0.05, 0.30, 0.25, 0.05],
            [0.00, 0.00, 0.00, 0.00, 0.00, 1.00, 0.00],
            [0.05, 0.05, 0.00, 0.00, 0.90, 0.00, 0.00],
        ]
    )
    # Row 0: low = bkl+df+nv+vasc = 0.05+0.05+0.25+0.05 = 0.4; moderate = akiec+bcc = 0.3;
    #        high = mel = 0.3. Row 1: all nv -> low 1. Row 2: moderate 0.1, high 0.9.
    expected = np.array([[0.4, 0.3, 0.3], [1.0, 0.0, 0.0], [0.0, 0.1, 0.9]])
    result = risk_probabilities(dx_probs, "dx", list(DIAGNOSES), DEFAULT_RISK_MAP)
    np.testing.assert_allclose(result, expected)


def test_risk_probabilities_passes_risk_targets_through_and_rejects_bad_maps() -> None:
    assert risk_probabilities(PROBS, "risk", list(DIAGNOSES), DEFAULT_RISK_MAP) is PROBS
    dx_probs = np.full((2, 7), 1 / 7)
    with pytest.raises(ValueError, match="without a level"):
        incomplete = {**DEFAULT_RISK_MAP, "low": ["nv", "bkl", "df"]}
        risk_probabilities(dx_probs, "dx", list(DIAGNOSES), incomplete)
    with pytest.raises(ValueError, match="both"):
        duplicated = {**DEFAULT_RISK_MAP, "high": ["mel", "nv"]}
        risk_probabilities(dx_probs, "dx", list(DIAGNOSES), duplicated)
    with pytest.raises(ValueError, match="unknown target"):
        risk_probabilities(dx_probs, "lesion", list(DIAGNOSES), DEFAULT_RISK_MAP)
    with pytest.raises(ValueError, match="N x 7"):
        risk_probabilities(PROBS, "dx", list(DIAGNOSES), DEFAULT_RISK_MAP)


# --- bootstrap ---------------------------------------------------------------------------------


def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred))


def _cases(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, size=n)
    wrong = rng.random(n) < 0.3  # about 70% accuracy
    y_pred = np.where(wrong, (y_true + 1) % 3, y_true)
    return y_true, y_pred


def test_bootstrap_contains_the_estimate_and_is_deterministic() -> None:
    y_true, y_pred = _cases(300)
    estimate = _accuracy(y_true, y_pred)
    lo, hi = bootstrap_interval(_accuracy, y_true, y_pred, seed=7)
    assert lo < estimate < hi
    assert (lo, hi) == bootstrap_interval(_accuracy, y_true, y_pred, seed=7)
    # A continuous metric, so that another seed cannot land on the same percentiles by chance.
    scores = np.random.default_rng(2).random(300)

    def mean_score(_: np.ndarray, s: np.ndarray) -> float:
        return float(s.mean())

    assert bootstrap_interval(mean_score, y_true, scores, seed=7) != bootstrap_interval(
        mean_score, y_true, scores, seed=8
    )


def test_bootstrap_narrows_with_more_data() -> None:
    small = bootstrap_interval(_accuracy, *_cases(50))
    large = bootstrap_interval(_accuracy, *_cases(5000))
    # Width shrinks like 1/sqrt(n): roughly 10 times narrower for 100 times the cases.
    assert (large[1] - large[0]) < (small[1] - small[0]) / 4


def test_group_bootstrap_keeps_groups_whole() -> None:
    # Ten lesions with three images each; y_true carries the lesion id so the metric can see
    # which images were drawn together.
    groups = np.repeat(np.arange(10), 3)
    image = np.tile(np.arange(3), 10)

    def whole_groups(lesion: np.ndarray, image_in_lesion: np.ndarray) -> float:
        # 1 if every drawn lesion came with its images 0, 1, 2 in equal numbers.
        for g in np.unique(lesion):
            counts = np.bincount(image_in_lesion[lesion == g], minlength=3)
            if not (counts[0] == counts[1] == counts[2]):
                return 0.0
        return 1.0

    assert bootstrap_interval(whole_groups, groups, image, groups=groups, n_resamples=200) == pytest.approx((1.0, 1.0))
    # Case-level resampling splits lesions, so the same check fails there.
    assert bootstrap_interval(whole_groups, groups, image, n_resamples=200)[0] == 0.0

    def distinct_groups(lesion: np.ndarray, _: np.ndarray) -> float:
        return float(np.unique(lesion).size)

    lo, hi = bootstrap_interval(distinct_groups, groups, image, groups=groups, n_resamples=200)
    # Drawing 10 of 10 lesions with replacement: about 6.5 distinct on average, never above 10.
    assert 3 <= lo <= hi <= 10


def test_group_bootstrap_is_wider_when_images_of_a_lesion_agree() -> None:
    # Each lesion's five images are all right or all wrong: 40 independent units, not 200.
    rng = np.random.default_rng(3)
    lesion_right = rng.random(40) < 0.7
    groups = np.repeat(np.arange(40), 5)
    y_true = np.zeros(200, dtype=int)
    y_pred = np.where(np.repeat(lesion_right, 5), 0, 1)
    naive = bootstrap_interval(_accuracy, y_true, y_pred)
    clustered = bootstrap_interval(_accuracy, y_true, y_pred, groups=groups)
    assert (clustered[1] - clustered[0]) > 1.5 * (naive[1] - naive[0])


# --- plots -------------------------------------------------------------------------------------


def _assert_png_and_no_leftovers(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_plot_confusion_matrix_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "figures" / "confusion_matrix.png"
    plot_confusion_matrix([[2, 1, 0], [0, 1, 1], [0, 0, 0]], NAMES, path)
    _assert_png_and_no_leftovers(path)
    plot_confusion_matrix(np.eye(3, dtype=int), NAMES, path, normalize=False)
    _assert_png_and_no_leftovers(path)


def test_plot_reliability_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "reliability.png"
    plot_reliability(reliability_curve(Y_TRUE, PROBS, n_bins=10), path)
    _assert_png_and_no_leftovers(path)


def test_plot_training_curves_writes_a_png(tmp_path: Path) -> None:
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3, 4],
            "phase": ["head", "head", "finetune", "finetune"],
            "loss": [1.0, 0.8, 0.7, 0.6],
            "val_loss": [1.1, 0.9, 0.85, 0.8],
            "val_balanced_accuracy": [0.4, 0.5, 0.55, 0.6],
        }
    )
    path = tmp_path / "training_curves.png"
    plot_training_curves(history, path)
    _assert_png_and_no_leftovers(path)


def test_a_failed_plot_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "confusion_matrix.png"
    path.write_bytes(b"old")
    with pytest.raises(ValueError):
        plot_confusion_matrix(np.ones((2, 2)), NAMES, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_high_risk_auc_leads_with_its_interval_and_each_operating_point_is_reported():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 400)
    p_high = np.clip(0.3 * (y == 2) + rng.uniform(0, 0.7, 400), 0, 1)
    rest = (1 - p_high)[:, None] * np.array([0.7, 0.3])
    probs = np.column_stack([rest, p_high])
    figures = classification_figures(
        y, probs, ["low", "moderate", "high"], threshold=0.5, operating_points={"a": 0.5, "b": 0.8}, n_resamples=200
    )
    assert figures["high_risk_roc_auc"] == pytest.approx(roc_auc_score(y == 2, p_high))
    low, high = figures["high_risk_roc_auc_ci95"]
    assert low < figures["high_risk_roc_auc"] < high
    assert figures["high_risk_pr_auc"] == pytest.approx(average_precision_score(y == 2, p_high))
    assert figures["operating_points"]["a"] == figures["triage"]
    assert figures["operating_points"]["b"]["high_risk_recall"] < figures["operating_points"]["a"]["high_risk_recall"]


def test_dvc_s_metrics_file_holds_the_headline_rounded() -> None:
    from tasks.stages.evaluate import dvc_headline

    metrics = {
        "high_risk_roc_auc": 0.864213,
        "high_risk_roc_auc_ci95": [0.82, 0.9012345],
        "balanced_accuracy": 0.75,
        "ece": 0.0321987,
        "triage": {"high_risk_recall": 0.877, "specificity": 0.654, "low_risk_spared": 0.655, "threshold": 0.123456},
        "operating_points": {"recall_0.95": {"high_risk_recall": 0.919, "low_risk_spared": 0.597}},
        "per_class": {"low": {"f1": 0.9}},
        "confusion_matrix": [[1]],
    }
    headline = dvc_headline(metrics)
    assert next(iter(headline)) == "high_risk_roc_auc" and headline["high_risk_roc_auc"] == 0.8642
    assert headline["high_risk_roc_auc_ci_high"] == 0.9012 and headline["threshold"] == 0.1235
    assert headline["high_risk_recall_at_0.95"] == 0.919
    assert all(not isinstance(v, dict | list) for v in headline.values()), "one level: one column each"
    assert "per_class" not in headline and "confusion_matrix" not in headline


def test_what_scores_cases_never_imports_matplotlib():
    """The served model, triage and the metrics load without the plotting stack (tasks.plots)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import tasks.metrics, tasks.scored_model, tasks.serving, tasks.triage\n"
        "print(sorted(m for m in ('matplotlib', 'tasks.plots') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_confusion_plot_shows_each_cells_share_and_count(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    from tasks import plots

    kept = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: kept.append(fig))
    plot_confusion_matrix([[2, 1, 0], [0, 1, 1], [0, 0, 4]], NAMES, tmp_path / "cm.png")
    texts = {t.get_text() for t in kept[0].axes[0].texts}
    assert {"0.67\n(2)", "0.33\n(1)", "1.00\n(4)", "0.00\n(0)"} <= texts, texts
    plt.close(kept[0])

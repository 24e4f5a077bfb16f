"""The 3-level decision: the level most likely relative to its training share."""

import numpy as np

from tasks.decision import called_levels, level_prior
from tasks.metrics import classification_figures
from tasks.schema import RISK_LEVELS, PreprocessSummary


def trained_on(train_counts: dict) -> PreprocessSummary:
    """A preprocess summary whose training split holds ``train_counts`` images per level."""
    return PreprocessSummary(image_size=32, risk_map={}, counts={"train": train_counts}, lesions={}, n_images=0)


SUMMARY = trained_on({"low": 700, "moderate": 200, "high": 100})


def test_the_prior_is_the_training_share_of_each_level():
    np.testing.assert_allclose(level_prior(SUMMARY), [0.7, 0.2, 0.1])
    assert level_prior(trained_on({})) is None


def test_a_case_as_likely_high_as_its_share_is_called_high_where_argmax_says_low():
    probs = np.array([[0.6, 0.15, 0.25], [0.9, 0.05, 0.05]])
    assert called_levels(probs, None).tolist() == [0, 0]
    assert called_levels(probs, level_prior(SUMMARY)).tolist() == [2, 0]


def test_a_level_absent_from_training_is_never_called():
    prior = level_prior(trained_on({"low": 9, "moderate": 0, "high": 1}))
    assert called_levels(np.array([[0.1, 0.85, 0.05]]), prior).tolist() == [2]


def test_on_imbalanced_calibrated_cases_the_rule_raises_balanced_accuracy():
    rng = np.random.default_rng(0)
    y = rng.choice(3, size=3000, p=[0.7, 0.2, 0.1])
    logits = rng.normal(size=(3000, 3)) + 1.2 * np.eye(3)[y] + np.log([0.7, 0.2, 0.1])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    plain = classification_figures(y, probs, list(RISK_LEVELS), n_resamples=10)
    balanced = classification_figures(y, probs, list(RISK_LEVELS), n_resamples=10, prior=np.array([0.7, 0.2, 0.1]))
    assert balanced["balanced_accuracy"] > plain["balanced_accuracy"] + 0.05
    assert balanced["high_risk_roc_auc"] == plain["high_risk_roc_auc"]  # the probabilities are the same

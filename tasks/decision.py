"""The 3-level risk decision: which level a case is called.

The calibrated probabilities stay as they are (they are what triage ranks and what the
referral threshold cuts); the *called* level is the one whose probability is highest relative
to how common that level was in training: ``argmax_k P(k | case) / prior_k``. With calibrated
probabilities this is the Bayes decision for balanced accuracy (each level's recall counts
equally), where the plain argmax mostly calls the 2-in-3 low-risk level and under-calls high
risk. Measured by lesion-grouped 5-fold CV on the real sample (benchmarks/cv_quality.py,
README "Training choices"): 3-level balanced accuracy 0.683 ± 0.064 with the argmax,
0.756 ± 0.022 with this rule, from the same models and probabilities.
"""

from __future__ import annotations

import numpy as np

from tasks.schema import RISK_LEVELS, PreprocessSummary


def level_prior(summary: PreprocessSummary) -> np.ndarray | None:
    """The training split's share of each risk level, from preprocess.json's ``counts``
    (None for a summary without them: the plain argmax is used then)."""
    train = summary.train_counts
    if not train:
        return None
    counts = np.array([float(train.get(level, 0)) for level in RISK_LEVELS])
    # a level absent from training is never called (its probability is ~0 anyway)
    counts = np.where(counts > 0, counts, np.inf)
    return counts / counts[np.isfinite(counts)].sum()


def called_levels(probs: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
    """The level index called for each row of risk-level probabilities (N x 3)."""
    probs = np.asarray(probs, dtype=np.float64)
    if prior is None:
        return probs.argmax(axis=1)
    return (probs / np.asarray(prior, dtype=np.float64)).argmax(axis=1)

"""The evaluate stage: test-split figures, the triage operating point, and external validation.

Metrics are computed once (``tasks.metrics``), written to ``reports/metrics.json`` for DVC and
logged from that same dict to MLflow.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.atomic import atomic_path, write_json, write_text
from tasks.dataset import SplitArrays, load_split
from tasks.errors import SkinriskError
from tasks.metrics import headline_figures
from tasks.params import EvaluateParams
from tasks.paths import METRICS_FILE
from tasks.schema import CASES_FILE, RISK_LEVELS
from tasks.scored_model import (
    OPERATING_POINT_FILE,
    Bundle,
    bundle_from_files,
    json_safe,
    predict_risk,
    risk_labels,
    score_images,
)

# DVC's metrics file: only the headline test figures, rounded, so `dvc metrics diff` and
# `dvc exp show --only-changed` fit a terminal; small enough to commit with dvc.lock (git-tracked)
HEADLINE_FILE = "headline.json"
PREDICTIONS_FILE = "predictions.csv"
HIGH = RISK_LEVELS.index("high")


def _split_cases(processed_dir: Path, split: SplitArrays) -> pd.DataFrame:
    """The case-table rows of ``split``'s images, in the split's order."""
    cases = pd.read_csv(Path(processed_dir) / CASES_FILE, dtype={"image_id": str, "lesion_id": str})
    return cases.set_index("image_id").loc[list(map(str, split.image_id))].reset_index()


def _figures(
    bundle: Bundle,
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray,
    threshold: float | None,
    operating_points: dict[str, float] | None,
    params: EvaluateParams,
) -> dict:
    """:func:`tasks.metrics.classification_figures` with the evaluate stage's settings."""
    from tasks.metrics import classification_figures

    return classification_figures(
        y_true,
        probs,
        list(RISK_LEVELS),
        groups=groups,
        threshold=threshold,
        operating_points=operating_points,
        high_index=HIGH,
        n_resamples=params.bootstrap_resamples,
        seed=params.seed,
        prior=bundle.prior,
        calibration_bins=params.calibration_bins,
    )


def subgroup_report(cases: pd.DataFrame, y, probs, called, groups, threshold: float, params: EvaluateParams) -> dict:
    """:func:`tasks.subgroups.subgroup_figures` with the evaluate stage's bootstrap settings."""
    from tasks.subgroups import subgroup_figures

    return subgroup_figures(
        cases,
        y,
        probs,
        called,
        groups,
        threshold,
        risk_levels=list(RISK_LEVELS),
        high_index=HIGH,
        n_resamples=params.bootstrap_resamples,
        seed=params.seed,
    )


def _write_plots(
    metrics: dict,
    y_true: np.ndarray,
    probs: np.ndarray,
    uncalibrated_probs: np.ndarray | None,
    reports_dir: Path,
    params: EvaluateParams,
) -> None:
    from tasks.metrics import reliability_curve
    from tasks.plots import plot_confusion_matrix, plot_reliability, plot_training_curves

    plot_confusion_matrix(
        np.array(metrics["confusion_matrix"]), list(RISK_LEVELS), reports_dir / "confusion_matrix.png"
    )
    bins = params.calibration_bins
    before = None if uncalibrated_probs is None else reliability_curve(y_true, uncalibrated_probs, bins)
    plot_reliability(reliability_curve(y_true, probs, bins), reports_dir / "reliability.png", before=before)
    if (history := reports_dir / "training_history.csv").exists():
        plot_training_curves(pd.read_csv(history), reports_dir / "training_curves.png")


def _uncalibrated(bundle: Bundle) -> Bundle | None:
    """The bundle's model over the same views at temperature 1, or None if it has no temperature."""
    from tasks.model import inference_model, scoring_settings, single_view

    settings = scoring_settings(bundle.model)
    if settings["temperature"] == 1.0:
        return None
    model = inference_model(single_view(bundle.model), settings["views"], 1.0)
    return replace(bundle, model=model)


def dvc_headline(metrics: dict) -> dict:
    """The headline test figures as DVC's metrics file holds them: one level, rounded to 4 decimals,
    the high-risk AUC's interval beside it; the recall 0.95 operating point too."""
    figures = dict(headline_figures(metrics))
    low, high = (metrics.get("high_risk_roc_auc_ci95") or [None, None])[:2]
    figures = {
        "high_risk_roc_auc": figures.pop("high_risk_roc_auc"),
        "high_risk_roc_auc_ci_low": low,
        "high_risk_roc_auc_ci_high": high,
        **figures,
    }
    strict = (metrics.get("operating_points") or {}).get("recall_0.95") or {}
    figures["high_risk_recall_at_0.95"] = strict.get("high_risk_recall")
    figures["low_risk_spared_at_0.95"] = strict.get("low_risk_spared")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()}


def format_headline(metrics: dict) -> str:
    """:func:`headline_figures` with confidence intervals and every operating point, for the console."""
    figures = headline_figures(metrics)
    triage = metrics.get("triage") or {}
    intervals = {
        "high_risk_roc_auc": metrics.get("high_risk_roc_auc_ci95"),
        "balanced_accuracy": metrics.get("balanced_accuracy_ci95"),
        "high_risk_recall": triage.get("high_risk_recall_ci95"),
    }
    labels = {
        "high_risk_roc_auc": "high-risk (melanoma) ROC-AUC",
        "high_risk_pr_auc": "high-risk PR-AUC (average precision)",
        "high_risk_recall": "sensitivity (high-risk recall) at the operating point",
        "specificity": "specificity at the operating point",
        "low_risk_spared": "low-risk lesions not referred",
        "threshold": "P(high) threshold (chosen on val)",
        "balanced_accuracy": "3-level balanced accuracy",
        "ece": "expected calibration error",
        "macro_f1": "macro F1",
        "roc_auc_ovr": "macro one-vs-rest ROC-AUC (not the headline)",
    }
    lines = []
    for key, label in labels.items():
        value = figures.get(key)
        text = "n/a" if value is None else f"{value:.3f}"
        ci = intervals.get(key)
        if ci and None not in ci:
            text += f"  (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
        lines.append(f"  {label:<56}{text}")
    calibration = metrics.get("calibration") or {}
    if calibration.get("ece_before") is not None:
        lines.append(
            f"  {'ECE before temperature scaling (T = ' + format(calibration['temperature'], '.2f') + ')':<56}"
            f"{calibration['ece_before']:.3f}"
        )
    for name, point in (metrics.get("operating_points") or {}).items():
        recall, ci = point.get("high_risk_recall"), point.get("high_risk_recall_ci95") or [None, None]
        if recall is None:
            continue
        interval = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if None not in ci else ""
        lines.append(
            f"  at {name.replace('_', ' ')} on val: sensitivity {recall:.3f}{interval}, specificity "
            f"{point['specificity']:.3f}, low-risk not referred {point['low_risk_spared']:.3f}"
        )
    return "\n".join(lines)


def evaluate(
    model_path: Path,
    processed_dir: Path,
    reports_dir: Path,
    model_dir: Path,
    params: EvaluateParams,
    *,
    run_id: str | None = None,
) -> dict:
    """Score the test split, choose the triage threshold on val, write and log every figure."""
    from sklearn.metrics import classification_report, log_loss

    from tasks.metrics import choose_threshold, expected_calibration_error, operating_point_name
    from tasks.model import scoring_settings

    processed_dir, reports_dir, model_dir = Path(processed_dir), Path(reports_dir), Path(model_dir)
    bundle = bundle_from_files(Path(model_path), processed_dir)
    val, test = load_split(processed_dir, "val"), load_split(processed_dir, "test")
    val_probs = predict_risk(bundle, val.images, val.clinical)
    is_high, p_high = val.risk == HIGH, val_probs[:, HIGH]  # calibrated P(high), as every consumer sees it
    if not is_high.any():
        raise SkinriskError("the validation split has no high-risk lesion: cannot choose a triage threshold")
    threshold = choose_threshold(is_high, p_high, params.target_recall)
    thresholds = {operating_point_name(r): choose_threshold(is_high, p_high, r) for r in params.operating_recalls}
    operating_point = {
        "target": bundle.target,
        "threshold": float(threshold),
        "target_recall": params.target_recall,
        "thresholds": thresholds,
    }

    test_probs = predict_risk(bundle, test.images, test.clinical)
    test_cases = _split_cases(processed_dir, test)
    # what the bootstrap resamples: lesions, joined by near-duplicate images (split_group)
    groups = test_cases["split_group" if "split_group" in test_cases else "lesion_id"].astype(str).to_numpy()
    metrics = _figures(bundle, test.risk, test_probs, groups, threshold, thresholds, params)
    uncalibrated = _uncalibrated(bundle)
    raw_probs = None
    if uncalibrated is not None:
        raw_probs = predict_risk(uncalibrated, test.images, test.clinical)
        metrics["calibration"] = {
            **scoring_settings(bundle.model),
            "ece_before": expected_calibration_error(test.risk, raw_probs, params.calibration_bins),
            "ece_after": expected_calibration_error(test.risk, test_probs, params.calibration_bins),
            "log_loss_before": float(log_loss(test.risk, raw_probs, labels=range(len(RISK_LEVELS)))),
            "log_loss_after": metrics["loss"],
        }
    called = bundle.called_levels(test_probs)
    metrics["subgroups"] = subgroup_report(test_cases, test.risk, test_probs, called, groups, threshold, params)
    metrics = json_safe({**metrics, "n_test_images": len(test), "operating_point": operating_point})

    reports_dir.mkdir(parents=True, exist_ok=True)
    write_json(reports_dir / METRICS_FILE, metrics)
    write_json(reports_dir / HEADLINE_FILE, dvc_headline(metrics))
    write_text(
        reports_dir / "classification_report.txt",
        classification_report(
            test.risk, called, labels=range(len(RISK_LEVELS)), target_names=list(RISK_LEVELS), digits=3, zero_division=0
        )
        + "\n(levels called by the rule of tasks/decision.py: the level most likely relative to its training share)\n",
    )
    predictions = pd.DataFrame(
        {
            "image_id": test.image_id,
            "actual": [RISK_LEVELS[i] for i in test.risk],
            "predicted": [RISK_LEVELS[i] for i in called],
            **{f"p_{level}": test_probs[:, i] for i, level in enumerate(RISK_LEVELS)},
            "referred": test_probs[:, HIGH] >= threshold,
            # the clinical columns, so a reader can slice without a join
            **{column: test_cases[column].to_numpy() for column in SLICE_COLUMNS if column in test_cases},
        }
    )
    with atomic_path(reports_dir / PREDICTIONS_FILE) as tmp:
        predictions.to_csv(tmp, index=False)
    _write_plots(metrics, test.risk, test_probs, raw_probs, reports_dir, params)
    _write_subgroups(metrics["subgroups"], reports_dir)
    write_json(model_dir / OPERATING_POINT_FILE, operating_point)

    if run_id:
        log_to_run(run_id, metrics, processed_dir, reports_dir)
    return metrics


SLICE_COLUMNS = ("lesion_id", "dx", "dx_type", "age", "sex", "localization")
SUBGROUPS_FILE = "subgroups.md"


def _write_subgroups(report: dict, reports_dir: Path) -> None:
    """The subgroup table (Markdown) and its forest plot beside the other reports."""
    from tasks.subgroups import format_subgroups, plot_subgroups

    flagged = ", ".join(report["flagged"]) or "none"
    write_text(
        Path(reports_dir) / SUBGROUPS_FILE,
        "# Test figures by subgroup\n\n"
        f"Flagged (high-risk recall interval wholly below the overall figure): {flagged}.\n\n"
        + format_subgroups(report)
        + "\n",
    )
    plot_subgroups(report, Path(reports_dir) / "subgroups.png")


# What a person compares across runs sits at the artifact root: MLflow's run comparison shows
# only the files common to every run's root. The rest of the reports go under reports/.
COMPARED_ARTIFACTS = (METRICS_FILE, "confusion_matrix.png", "reliability.png", "training_curves.png", "subgroups.png")
DETAIL_ARTIFACTS = ("classification_report.txt", PREDICTIONS_FILE, "training_history.csv", SUBGROUPS_FILE)


def log_to_run(run_id: str, metrics: dict, processed_dir: Path, reports_dir: Path) -> None:
    """Log the test figures (``test_``: the split they come from, apart from the per-epoch training
    curves' ``loss``, ``accuracy``...), the reports, and the test split as the run's dataset."""
    from tasks.tracking import NOTE_TAG, log_artifacts, log_metrics, log_split_datasets, set_tags

    # the run's description on its MLflow page: the test figures a triage user reads first
    set_tags(run_id, {NOTE_TAG: "Test split:\n\n```\n" + format_headline(metrics) + "\n```"})
    # the subgroup table is an artifact (subgroups.md, subgroups.png, metrics.json), not 200 metric keys
    log_metrics(
        run_id, {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "subgroups")}, prefix="test_"
    )
    if metrics.get("subgroups"):
        log_metrics(run_id, {"subgroups_flagged": len(metrics["subgroups"]["flagged"])}, prefix="test_")
    log_artifacts(run_id, [Path(reports_dir) / name for name in COMPARED_ARTIFACTS])
    log_artifacts(run_id, [Path(reports_dir) / name for name in DETAIL_ARTIFACTS], artifact_path="reports")
    log_split_datasets(run_id, Path(processed_dir) / CASES_FILE, ["test"])


def evaluate_external(bundle: Bundle, source: Path, out_file: Path, params: EvaluateParams) -> dict:
    """Score a labelled dataset in any HAM10000 layout (e.g. another clinic's) with the same figures.

    The data goes through the import and the model's own preprocessing (its encoder, image size
    and risk mapping); the triage threshold is the model's, chosen on its validation split.
    """
    from tasks.clinical import clinical_frame
    from tasks.ingest import import_dataset, read_raw_metadata
    from tasks.schema import RAW_METADATA_FILE, raw_image_path

    with tempfile.TemporaryDirectory(prefix="skinrisk-external-") as scratch:
        raw_dir = Path(scratch) / "raw"
        import_dataset(Path(source), raw_dir, progress=False)
        frame = clinical_frame(read_raw_metadata(raw_dir), raw_dir / RAW_METADATA_FILE)
        if bundle.encoder.missing_policy == "drop":
            frame = frame.loc[frame["age"].notna()].reset_index(drop=True)
        probs = score_images(bundle, frame, [raw_image_path(raw_dir, i) for i in frame["image_id"]])
    y_true = risk_labels(bundle, frame["dx"])
    operating_point = bundle.operating_point or {}
    threshold = operating_point.get("threshold")
    lesions = frame["lesion_id"].to_numpy()
    metrics = _figures(bundle, y_true, probs, lesions, threshold, operating_point.get("thresholds"), params)
    if threshold is not None:
        groups = frame["lesion_id"].astype(str).to_numpy()
        called = bundle.called_levels(probs)
        metrics["subgroups"] = subgroup_report(frame, y_true, probs, called, groups, threshold, params)
    metrics = json_safe({**metrics, "n_images": len(frame), "source": str(source)})
    write_json(Path(out_file), metrics)
    return metrics

"""Promotion in the MLflow registry, by aliases: ``@challenger`` replaces ``@champion`` only through gates.

Both models are scored on the same evaluation cases (by default the current test split, decoded
from the raw images at each model's own input size, through each model's own encoder and at each
model's own triage threshold). The challenger becomes champion only if every gate passes; the
former champion stays reachable as ``@previous``. Every decision and its reasons are recorded as
tags on the challenger's version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from tasks.errors import SkinriskError
from tasks.params import PromoteParams
from tasks.tracking import MODEL_NAME, client

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    challenger_version: str
    champion_version: str | None  # the champion it was compared with (None: there was none)
    reasons: list[str]
    challenger_figures: dict
    champion_figures: dict | None
    n_cases: int
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def summary(self) -> str:
        verdict = "promoted to @champion" if self.promoted else "not promoted"
        against = f"champion version {self.champion_version}" if self.champion_version else "no champion yet"
        lines = [f"challenger version {self.challenger_version} {verdict} (against {against}, {self.n_cases} cases)"]
        lines += [f"  - {reason}" for reason in self.reasons]
        return "\n".join(lines)


def decide(challenger: dict, champion: dict | None, params: PromoteParams) -> tuple[bool, list[str]]:
    """The gates, as a pure function of the two models' figures on the same cases.

    Each reason says what was measured against what bound; the decision passes only if all do.
    """
    auc, ba = challenger["high_risk_roc_auc"], challenger["balanced_accuracy"]
    recall, ece = challenger["high_risk_recall"], challenger["ece"]
    checks = [
        (auc >= params.min_high_risk_auc, f"high-risk ROC-AUC {auc:.3f} vs floor {params.min_high_risk_auc:.3f}"),
        (ba >= params.min_balanced_accuracy, f"balanced accuracy {ba:.3f} vs floor {params.min_balanced_accuracy:.3f}"),
        (
            recall >= params.min_high_risk_recall,
            f"high-risk recall at the operating point {recall:.3f} vs floor {params.min_high_risk_recall:.3f}",
        ),
        (ece <= params.max_ece, f"calibration error {ece:.3f} vs bound {params.max_ece:.3f}"),
    ]
    if champion is not None:  # no worse than the champion, within a tolerance
        for key, label, tolerance in (
            ("high_risk_roc_auc", "high-risk ROC-AUC", params.max_high_risk_auc_drop),
            ("balanced_accuracy", "balanced accuracy", params.max_balanced_accuracy_drop),
        ):
            value, theirs = challenger[key], champion[key]
            text = f"{label} {value:.3f} vs champion {theirs:.3f} minus tolerance {tolerance:.3f}"
            checks.append((value >= theirs - tolerance, text))
    reasons = [f"{'pass' if ok else 'FAIL'}: {text}" for ok, text in checks]
    return all(ok for ok, _ in checks), reasons


def evaluation_cases(processed_dir: Path, raw_dir: Path, split: str = "test") -> tuple[pd.DataFrame, list[Path]]:
    """The cases of one split (parsed clinical fields and diagnoses) and their raw image files."""
    from tasks.schema import CASES_FILE, raw_image_path

    path = Path(processed_dir) / CASES_FILE
    if not path.exists():
        raise SkinriskError(f"{path} not found: run `skinrisk preprocess` first")
    cases = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str, "sex": str, "localization": str})
    cases = cases.loc[cases["split"] == split].reset_index(drop=True)
    if cases.empty:
        raise SkinriskError(f"{path} has no {split} cases to compare models on")
    return cases, [raw_image_path(Path(raw_dir), image_id) for image_id in cases["image_id"]]


def model_figures(
    bundle, cases: pd.DataFrame, image_paths: list[Path], params: PromoteParams, *, calibration_bins: int = 15
) -> dict:
    """Headline figures of one model on the evaluation cases, at the model's own threshold; the ECE
    over ``calibration_bins`` bins, as ``evaluate.calibration_bins`` gives it in metrics.json."""
    from tasks.metrics import classification_figures, headline_figures
    from tasks.schema import RISK_LEVELS
    from tasks.scored_model import json_safe, risk_labels, score_images

    if bundle.operating_point is None:
        raise SkinriskError("the model carries no operating point: evaluate it before promotion")
    frame = cases
    if bundle.encoder.missing_policy == "drop":
        keep = frame["age"].notna().to_numpy()
        frame, image_paths = frame.loc[keep], [p for p, k in zip(image_paths, keep, strict=True) if k]
    probs = score_images(bundle, frame, image_paths)
    metrics = classification_figures(
        risk_labels(bundle, frame["dx"]),
        probs,
        list(RISK_LEVELS),
        groups=frame["lesion_id"].to_numpy(),
        threshold=bundle.operating_point["threshold"],
        high_index=RISK_LEVELS.index("high"),
        n_resamples=params.bootstrap_resamples,
        prior=bundle.prior,
        calibration_bins=calibration_bins,
    )
    figures = json_safe(headline_figures(metrics))
    return {k: (float("nan") if v is None else v) for k, v in figures.items()}


def _version_for(name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(
    processed_dir: Path,
    raw_dir: Path,
    params: PromoteParams,
    *,
    name: str = MODEL_NAME,
    calibration_bins: int = 15,
) -> PromotionDecision:
    """Compare ``@challenger`` with ``@champion`` and move the aliases if every gate passes (the
    ECE gate over ``calibration_bins`` bins: pass ``evaluate.calibration_bins``)."""
    from tasks.scored_model import load_bundle

    challenger = _version_for(name, CHALLENGER)
    if challenger is None:
        raise SkinriskError(f"no @{CHALLENGER} version of {name!r}: train and register a model first")
    champion = _version_for(name, CHAMPION)
    cases, paths = evaluation_cases(processed_dir, raw_dir)
    if champion == challenger:
        return PromotionDecision(
            False, challenger, champion, ["the challenger already is the champion"], {}, None, len(cases)
        )

    def figures(version: str) -> dict:
        bundle = load_bundle(f"models:/{name}/{version}", processed_dir, Path())
        return model_figures(bundle, cases, paths, params, calibration_bins=calibration_bins)

    challenger_figures = figures(challenger)
    champion_figures = figures(champion) if champion else None
    promoted, reasons = decide(challenger_figures, champion_figures, params)
    decision = PromotionDecision(
        promoted, challenger, champion, reasons, challenger_figures, champion_figures, len(cases)
    )
    _record(name, decision)
    return decision


def _record(name: str, decision: PromotionDecision) -> None:
    """Tags on the challenger's version; alias moves when promoted."""
    registry = client()
    tags = {
        "promotion.decision": "promoted" if decision.promoted else "rejected",
        "promotion.reasons": "; ".join(decision.reasons),
        "promotion.compared_with": decision.champion_version or "none",
        "promotion.decided_at": decision.decided_at,
        "promotion.cases": str(decision.n_cases),
        **{f"promotion.{k}": f"{v:.4f}" for k, v in decision.challenger_figures.items() if v == v},
    }
    for key, value in tags.items():
        registry.set_model_version_tag(name, decision.challenger_version, key, value[:5000])
    if decision.promoted:
        if decision.champion_version:
            registry.set_registered_model_alias(name, PREVIOUS, decision.champion_version)
            registry.set_model_version_tag(
                name, decision.challenger_version, "promotion.previous_champion", decision.champion_version
            )
        registry.set_registered_model_alias(name, CHAMPION, decision.challenger_version)


def rollback(*, name: str = MODEL_NAME) -> tuple[str, str]:
    """``@champion`` back to ``@previous``; returns (demoted version, restored version)."""
    registry = client()
    current, previous = _version_for(name, CHAMPION), _version_for(name, PREVIOUS)
    if previous is None:
        raise SkinriskError(f"{name!r} has no @{PREVIOUS} version to roll back to")
    registry.set_registered_model_alias(name, CHAMPION, previous)
    restored = registry.get_model_version(name, previous)
    older = restored.tags.get("promotion.previous_champion")
    if older:
        registry.set_registered_model_alias(name, PREVIOUS, older)
    else:
        registry.delete_registered_model_alias(name, PREVIOUS)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    if current:
        registry.set_model_version_tag(name, current, "promotion.rolled_back_at", stamp)
    registry.set_model_version_tag(name, previous, "promotion.restored_at", stamp)
    return current or "none", previous


_TAG_COLUMNS = ("high_risk_roc_auc", "balanced_accuracy", "high_risk_recall", "ece", "data_version")


def registry_table(*, name: str = MODEL_NAME) -> pd.DataFrame:
    """Every version with its aliases, run, headline figures and last promotion decision."""
    registry = client()
    try:
        model = registry.get_registered_model(name)
    except Exception as exc:
        raise SkinriskError(f"no registered model {name!r} yet: run the training pipeline first") from exc
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for version in registry.search_model_versions(f"name='{name}'"):
        tags = version.tags
        rows.append(
            {
                "version": int(version.version),
                "aliases": ",".join(sorted(aliases.get(str(version.version), []))),
                "created": datetime.fromtimestamp(version.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
                **{key: tags.get(key, "") for key in _TAG_COLUMNS},
                "decision": tags.get("promotion.decision", ""),
                "run_id": version.run_id,
            }
        )
    return pd.DataFrame(rows).sort_values("version", ascending=False).reset_index(drop=True)


def decision_record(decision: PromotionDecision) -> dict:
    return asdict(decision)

"""The model card of a model version (Mitchell et al. 2019, "Model Cards for Model Reporting").

:func:`render_model_card` is a pure function: Markdown from what the pipeline already wrote —
the evaluate stage's ``metrics.json``, the preprocess summary (``preprocess.json``), the train
params and summary (``train.json``) — and the registry facts (model name, version, run, data
version). The register stage logs it to the run as ``model_card.md`` and makes it the version's
description; ``skinrisk model-card`` prints it.

Figures are rounded for people: three decimals, shares as percentages with one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import SkinriskError
from tasks.schema import RISK_LEVELS, PreprocessSummary, read_preprocess_summary

CARD_FILE = "model_card.md"
# The test-time views each train.tta setting averages (tasks.model)
VIEWS = {
    "none": "the image as is (1 view)",
    "flips": "the image as is, mirrored both ways and turned 180° (4 views)",
    "dihedral": "the 8 mirrors and quarter turns",
}
# What the card calls the subgroup columns of tasks.subgroups, in the card's order
SUBGROUP_COLUMNS = {"sex": "sex", "age band": "age band", "site group": "body-site group", "dx_type": "dx_type"}
# What a version's description keeps first when the whole card is too long for it (the title and
# its headline summary always): how to use it, the figures, the referral trade-off, then the rest
DESCRIPTION_PRIORITY = (
    "Intended use",
    "Evaluation data and figures",
    "Operating point",
    "Model details",
    "Out-of-scope uses",
    "Calibration",
    "Caveats and recommendations",
    "Training data",
    "Ethical considerations",
    "Known failure modes and shortcuts",
    "Figures by subgroup",
)


@dataclass(frozen=True)
class RegistryFacts:
    """Where a card's model lives: the registered version and its run, or a local file."""

    name: str  # the registered model's name, or the model file for a local model
    version: str | None = None
    run_id: str | None = None
    run_name: str | None = None
    data_version: str | None = None
    data_source: str | None = None  # "synthetic" or "imported" (the run's data_source tag)
    date: str | None = None  # registration date, YYYY-MM-DD (UTC)


# ---------------------------------------------------------------------------------------------
# Numbers and tables


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def figure(value, digits: int = 3) -> str:
    """A figure for people: ``0.898``; ``n/a`` when undefined (metrics.json writes nan as null)."""
    return "n/a" if _missing(value) else f"{float(value):.{digits}f}"


def interval(ci) -> str:
    """`` (95% CI 0.862-0.932)``, or nothing when the interval is undefined."""
    if not ci or len(ci) < 2 or _missing(ci[0]) or _missing(ci[1]):
        return ""
    return f" (95% CI {figure(ci[0])}-{figure(ci[1])})"


def with_interval(value, ci) -> str:
    return figure(value) + ("" if _missing(value) else interval(ci))


def share(value) -> str:
    """A proportion as a percentage: ``71.0%``."""
    return "n/a" if _missing(value) else f"{100 * float(value):.1f}%"


def _subgroup_order(value: str) -> tuple:
    """Age bands by age (``under 30`` first), the rest alphabetically, ``unknown`` last."""
    if value == "unknown":
        return (2, 0, value)
    if value.startswith("under "):
        return (0, 0, value)
    head = value.split("-")[0].split(" ")[0]
    return (0, int(head), value) if head.isdigit() else (1, 0, value)


def _high_share(preprocess: PreprocessSummary, split: str = "train") -> float | None:
    counts = preprocess.counts.get(split) or {}
    total = sum(counts.values())
    return counts.get("high", 0) / total if total else None


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (pandas' ``to_markdown`` needs ``tabulate``, which the
    project does not declare: only DVC pulls it in)."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Sections


def _title(registry: RegistryFacts) -> str:
    if registry.version:
        return f"# Model card: {registry.name} version {registry.version}"
    return f"# Model card: {registry.name} (not registered)"


def _details(
    metrics: Mapping, preprocess: PreprocessSummary, train_params: Mapping, train_summary: Mapping, registry
) -> str:
    target = (
        train_summary.get("target")
        or train_params.get("target")
        or (metrics.get("operating_point") or {}).get("target", "risk")
    )
    calibration = metrics.get("calibration") or {}
    temperature = train_summary.get("temperature", calibration.get("temperature"))
    tta = str(train_summary.get("tta") or calibration.get("views") or train_params.get("tta") or "unknown")
    size = preprocess.image_size
    weights = train_params.get("weights", "unknown")
    alpha = train_params.get("alpha", "?")
    aux = train_params.get("aux_dx_weight")
    levels = ", ".join(preprocess.risk_levels)
    target_text = (
        f"the risk level ({levels}) directly"
        if target == "risk"
        else "the 7 HAM10000 diagnoses, summed per risk level for the output"
    )
    rows = [
        (
            "architecture",
            f"MobileNetV2 image branch (width {alpha}, {weights} weights) → global average pooling → dense "
            f"({train_params.get('image_units', '?')} units); clinical branch: dense "
            f"({train_params.get('clinical_units', '?')} units) on standardized age with a missing flag and "
            f"one-hot sex and body site; concatenated → dense ({train_params.get('fusion_units', '?')} units) "
            f"with dropout {train_params.get('dropout', '?')} → softmax",
        ),
        (
            "target",
            target_text
            + (
                f"; an auxiliary 7-diagnosis head (loss weight {aux}) is trained, not served"
                if aux and target == "risk"
                else ""
            ),
        ),
        ("image input", f"the whole frame resized to {size} x {size} pixels"),
        ("clinical input", "age (years, may be unknown), sex, body site (one of 15 HAM10000 sites)"),
        (
            "training",
            f"{train_params.get('head_epochs', '?')} epochs with the backbone frozen, then up to "
            f"{train_params.get('finetune_epochs', '?')} fine-tuning from block "
            f"{train_params.get('finetune_from_block', '?')}; best epoch by {train_summary.get('monitor', train_params.get('monitor', '?'))}"
            + (
                f" (epoch {train_summary['best_epoch']} of {train_summary['epochs_run']} run)"
                if "best_epoch" in train_summary and "epochs_run" in train_summary
                else ""
            ),
        ),
        (
            "softmax temperature",
            ("n/a" if _missing(temperature) else f"{float(temperature):.2f}") + " (fitted on the validation split)",
        ),
        ("test-time views", f"`{tta}`: {VIEWS.get(tta, tta)}, averaged inside the model"),
        ("version", registry.version or "not registered (a local model file)"),
        (
            "MLflow run",
            f"`{registry.run_name}` ({registry.run_id})" if registry.run_name else (registry.run_id or "none"),
        ),
        ("date", registry.date or "unknown"),
        (
            "data version",
            f"`{registry.data_version or 'unknown'}`"
            + (f" ({registry.data_source} data)" if registry.data_source not in (None, "unknown") else ""),
        ),
        ("output", "`p_low`, `p_moderate`, `p_high`, `risk_level`, `refer` (P(high) at or above the threshold)"),
    ]
    return "## Model details\n\n" + markdown_table(("", ""), rows)


INTENDED_USE = """## Intended use

- **Triage prioritisation** of dermoscopic images of skin lesions in dermatology clinics and
  teledermatology services: the queue is ranked by P(high) so that likely melanomas are seen
  first, and fewer clearly benign lesions are sent on.
- **Decision support for clinicians** (dermatologists, or trained clinicians reviewing
  dermoscopy), who see the probabilities next to the image and the patient, and decide.
- **Not a medical device.** It has no regulatory clearance (CE, FDA or other), is not for
  diagnosis, and must not be used without a clinician: every referral, biopsy or discharge
  decision rests with the clinician. Research software."""

OUT_OF_SCOPE = """## Out-of-scope uses

- Diagnosis, or ruling a lesion out, without a clinician; direct use by patients or consumers
  (self-screening apps).
- Clinical (non-dermoscopic) photographs, smartphone photos without a dermatoscope,
  histopathology slides, or images of several lesions.
- Populations the training data barely covers: darker skin types (Fitzpatrick IV-VI), children,
  acral (palms, soles, nails) and mucosal lesions; lesion types absent from HAM10000.
- Any setting where its referral threshold has not been checked on that setting's own patients
  (another clinic, another dermatoscope): run `skinrisk evaluate --data` on local labelled cases
  first.
- Screening a whole population, where melanoma is far rarer than in this data: the share of
  referrals that are melanomas would be much lower than here."""


def _training_data(preprocess: PreprocessSummary, registry: RegistryFacts) -> str:
    counts, lesions = preprocess.counts, preprocess.lesions
    levels, risk_map = list(preprocess.risk_levels), preprocess.risk_map
    mapping = "; ".join(f"**{level}** = {', '.join(risk_map[level])}" for level in levels if level in risk_map)
    lines = [
        "## Training data",
        "",
        "HAM10000 (Tschandl et al. 2018, doi:10.1038/sdata.2018.161; CC BY-NC 4.0): 10,015 dermoscopic "
        "images of 7 diagnoses (akiec, bcc, bkl, df, mel, nv, vasc), several images per lesion, collected "
        "mostly at the Medical University of Vienna and a skin-cancer practice in Queensland, Australia. "
        "Its patients are predominantly fair-skinned (Fitzpatrick I-III); acral and mucosal sites are "
        "rare. **Performance on darker skin types is unknown**: the data cannot measure it, and melanoma "
        "there is more often acral, the very sites the data lacks. About half the diagnoses are confirmed "
        "by histopathology; the rest by follow-up, expert consensus or confocal microscopy (the `dx_type` "
        "column; see the subgroup table for figures by it). Benign nevi dominate (about two in three "
        "images).",
        "",
        f"This version: data version `{registry.data_version or 'unknown'}`"
        + (
            " — **the synthetic HAM10000-shaped sample**: its figures show that the pipeline works, not "
            "how the model does on real lesions."
            if registry.data_source == "synthetic"
            else "."
        )
        + f" {preprocess.n_images} images used"
        + (
            f" ({preprocess.n_dropped} without an age left out: `preprocess.missing_clinical: drop`)"
            if preprocess.n_dropped and preprocess.missing_clinical == "drop"
            else (f" ({preprocess.n_dropped} left out)" if preprocess.n_dropped else "")
        )
        + ", split by lesion (near-duplicate images joined, see below) and stratified by risk level."
        + (f" Risk map: {mapping}." if mapping else ""),
    ]
    if counts:
        rows = [
            (split, lesions.get(split, "?"), *(counts[split].get(level, 0) for level in levels)) for split in counts
        ]
        lines += ["", markdown_table(("split", "lesions", *(f"{level} images" for level in levels)), rows)]
    return "\n".join(lines)


def _headline(metrics: Mapping) -> str:
    triage = metrics.get("triage") or {}
    subgroup_overall = (metrics.get("subgroups") or {}).get("overall") or {}
    rows = [
        (
            "**high-risk (melanoma) ROC-AUC** of calibrated P(high)",
            with_interval(metrics.get("high_risk_roc_auc"), metrics.get("high_risk_roc_auc_ci95")),
        ),
        ("high-risk PR-AUC (average precision)", figure(metrics.get("high_risk_pr_auc"))),
    ]
    points = metrics.get("operating_points") or {}
    served = (metrics.get("operating_point") or {}).get("threshold", triage.get("threshold"))
    for name, point in points.items():
        label = name.replace("recall_", "recall ")
        specificity = figure(point.get("specificity"))
        if subgroup_overall and not _missing(served) and point.get("threshold") == served:
            # the subgroup report bootstraps specificity at the served threshold
            specificity = with_interval(subgroup_overall.get("specificity"), subgroup_overall.get("specificity_ci95"))
        rows += [
            (
                f"sensitivity (high-risk recall) at the {label} point",
                with_interval(point.get("high_risk_recall"), point.get("high_risk_recall_ci95")),
            ),
            (f"specificity at the {label} point", specificity),
        ]
    if not points and triage:
        rows += [
            (
                "sensitivity (high-risk recall) at the operating point",
                with_interval(triage.get("high_risk_recall"), triage.get("high_risk_recall_ci95")),
            ),
            ("specificity at the operating point", figure(triage.get("specificity"))),
        ]
    calibration = metrics.get("calibration") or {}
    rows += [
        (
            "3-level balanced accuracy (called levels)",
            with_interval(metrics.get("balanced_accuracy"), metrics.get("balanced_accuracy_ci95")),
        ),
        ("expected calibration error (ECE)", figure(metrics.get("ece"))),
        (
            "temperature T (see Calibration)",
            "1.00 (none fitted)" if not calibration else figure(calibration.get("temperature"), 2),
        ),
        (
            "macro one-vs-rest ROC-AUC (not the headline: lifted by the easy moderate class)",
            figure(metrics.get("roc_auc_ovr")),
        ),
        ("accuracy; macro F1", f"{figure(metrics.get('accuracy'))}; {figure(metrics.get('macro_f1'))}"),
    ]
    return markdown_table(("figure (held-out test split)", "value"), rows)


def _evaluation(metrics: Mapping) -> str:
    overall = (metrics.get("subgroups") or {}).get("overall") or {}
    n_images = metrics.get("n_test_images", metrics.get("n_cases", "?"))
    per_class = metrics.get("per_class") or {}
    high = (per_class.get("high") or {}).get("support", overall.get("n_high", "?"))
    by_dx_type = ((metrics.get("subgroups") or {}).get("by") or {}).get("dx_type") or {}
    dx_types = ", ".join(f"{name} {f.get('n_images', '?')}" for name, f in by_dx_type.items())
    return "\n".join(
        [
            "## Evaluation data and figures",
            "",
            f"The held-out test split of the same data: {n_images} images"
            + (f" of {overall['n_lesions']} lesions" if "n_lesions" in overall else "")
            + f", {high} high-risk"
            + (f"; confirmed by (`dx_type`): {dx_types}" if dx_types else "")
            + ". No lesion (nor a near-duplicate image of one) is in both training and test. Intervals are "
            "95% percentile bootstrap intervals that resample whole lesions. The operating points' "
            "thresholds were chosen on the validation split, never on test.",
            "",
            _headline(metrics),
        ]
    )


def _subgroups(metrics: Mapping) -> str:
    report = metrics.get("subgroups")
    if not report:
        return "## Figures by subgroup\n\nNot measured for this version (its metrics.json has no `subgroups`)."
    rows = []
    by = report.get("by") or {}
    for column in [*(c for c in SUBGROUP_COLUMNS if c in by), *(c for c in by if c not in SUBGROUP_COLUMNS)]:
        for value in sorted(by[column], key=_subgroup_order):
            f = by[column][value]
            name = f"{SUBGROUP_COLUMNS.get(column, column)}: {value}"
            if "high_risk_roc_auc" not in f:
                rows.append(
                    (name, f.get("n_images", "?"), "", f.get("n_high", "?"), "too few", "too few", "too few", "")
                )
                continue
            rows.append(
                (
                    name,
                    f["n_images"],
                    f.get("n_lesions", ""),
                    f["n_high"],
                    with_interval(f.get("high_risk_roc_auc"), f.get("high_risk_roc_auc_ci95")),
                    with_interval(f.get("high_risk_recall"), f.get("high_risk_recall_ci95")),
                    with_interval(f.get("specificity"), f.get("specificity_ci95")),
                    "**below overall**" if f.get("flagged") else "",
                )
            )
    flagged = ", ".join(report.get("flagged") or []) or "none"
    lines = [
        "## Figures by subgroup",
        "",
        f"Test figures by sex, age band, body-site group and `dx_type`, at the served operating point. "
        f"Subgroups under {report.get('min_cases', 10)} images show counts only; a subgroup is flagged when its "
        f"recall interval lies wholly below the overall recall. Small subgroups have wide intervals: a "
        f"missing flag is not evidence of equal performance. **Flagged: {flagged}.**",
        "",
        markdown_table(
            ("subgroup", "images", "lesions", "high-risk", "high-risk AUC", "sensitivity", "specificity", "flag"),
            rows,
        ),
    ]
    by_diagnosis = report.get("by_diagnosis") or {}
    if by_diagnosis:
        levels = [level for level in RISK_LEVELS if level in by_diagnosis]
        dx_rows = [
            (
                level,
                dx,
                f.get("n_images", "?"),
                *(share(f.get(f"called_{name}")) for name in levels),
                share(f.get("referred")),
            )
            for level in reversed(levels)  # high risk first
            for dx, f in sorted(by_diagnosis[level].items())
        ]
        lines += [
            "",
            "Within each risk level, how each diagnosis is called and how often it is referred:",
            "",
            markdown_table(
                ("risk level", "diagnosis", "images", *(f"called {n}" for n in levels), "referred"), dx_rows
            ),
        ]
    return "\n".join(lines)


def _calibration(metrics: Mapping, preprocess: PreprocessSummary) -> str:
    calibration = metrics.get("calibration") or {}
    if calibration:
        text = (
            f"A softmax temperature T = {figure(calibration.get('temperature'), 2)}, fitted on the validation "
            f"split (Guo et al. 2017), takes the test ECE from {figure(calibration.get('ece_before'))} to "
            f"{figure(calibration.get('ece_after', metrics.get('ece')))} and the log loss from "
            f"{figure(calibration.get('log_loss_before'))} to {figure(calibration.get('log_loss_after'))}; "
            "it leaves the ranking (the AUCs) unchanged."
        )
    else:
        text = (
            f"No temperature (T = 1: calibration off, or nothing on validation to fit it from); test ECE "
            f"{figure(metrics.get('ece'))}."
        )
    high = _high_share(preprocess)
    return (
        "## Calibration\n\n"
        + text
        + " The probabilities are calibrated to this data's mix of levels"
        + ("" if high is None else f" ({share(high)} of training images high risk)")
        + ": where melanoma is rarer, P(high) overstates it. The run's `reliability.png` plots the "
        "reliability curve before and after the temperature."
    )


def _operating_point(metrics: Mapping, preprocess: PreprocessSummary) -> str:
    operating_point = metrics.get("operating_point") or {}
    served = operating_point.get("threshold", (metrics.get("triage") or {}).get("threshold"))
    points = dict(metrics.get("operating_points") or {})
    if not points and metrics.get("triage"):
        points = {"served": metrics["triage"]}
    rows = []
    for name, point in points.items():
        recall = point.get("high_risk_recall")
        missed = "n/a" if _missing(recall) else f"{100 * (1 - float(recall)):.1f}"
        rows.append(
            (
                name.replace("recall_", "recall ") + (" (served)" if point.get("threshold") == served else ""),
                figure(point.get("threshold"), 4),
                with_interval(recall, point.get("high_risk_recall_ci95")),
                missed,
                share(point.get("low_risk_spared")),
                share(point.get("referral_rate")),
            )
        )
    target = operating_point.get("target_recall")
    return "\n".join(
        [
            "## Operating point",
            "",
            "A lesion is referred when P(high) is at or above the threshold. Each threshold is the highest "
            "that reaches its target high-risk recall on the validation split"
            + (f"; the model serves the recall {figure(target, 2)} one" if target else "")
            + f" (threshold {figure(served, 4)}). What each trades on the test split:",
            "",
            markdown_table(
                (
                    "point",
                    "P(high) threshold",
                    "sensitivity",
                    "melanomas missed per 100",
                    "low-risk lesions not referred",
                    "all lesions referred",
                ),
                rows,
            ),
            "",
            f"A threshold chosen on {(preprocess.counts.get('val') or {}).get('high', 'few')} "
            "validation high-risk images is optimistic: recall on new lesions is often a few points under the "
            "target. A clinic that needs 0.90 on its own patients should serve the stricter point "
            "(`evaluate.target_recall: 0.95`) and check it on local cases.",
        ]
    )


def _failure_modes(preprocess: PreprocessSummary) -> str:
    duplicates = preprocess.duplicates or {}
    if duplicates:
        duplicate_text = (
            f"This version's preprocess found {duplicates.get('near_duplicate_pairs', 0)} near-duplicate image "
            f"pair(s) across lesion_ids and joined {duplicates.get('merged_lesions', 0)} lesion_ids into "
            f"{duplicates.get('merged_groups', 0)} split group(s), so none straddles training and test."
        )
    else:
        duplicate_text = "This version's preprocess summary records no duplicate search."
    return "\n".join(
        [
            "## Known failure modes and shortcuts",
            "",
            "Dermoscopy classifiers are known to learn shortcuts from image artefacts that correlate with "
            "the diagnosis in the training data. Not measured one by one for this model; check the Grad-CAM "
            "overlays (`explain/` in the run) of the cases you care about.",
            "",
            "- **Vignetting and dark corners** of the dermatoscope's round field, and image borders: which "
            "device took the picture correlates with the clinic, and the clinic with the diagnosis mix.",
            "- **Rulers, ink markings and surgical-pen circles**, drawn more often around lesions already "
            "suspected, can raise P(high) by themselves.",
            "- **Hair, gel and air bubbles, specular glare** hide structure and can lower or raise scores.",
            "- **The skin around the lesion rather than the lesion** (skin tone, sun damage, patient age "
            "seen in the skin) can drive predictions; with mostly fair skin in training, this is one way "
            "darker skin can fail.",
            "- **Duplicate images of the same lesion**: HAM10000 files some lesions under more than one "
            "lesion_id (Abhishek et al. 2025). A perceptual-hash search joins near-duplicates before the "
            f"split (`tasks/duplicates.py`). {duplicate_text} A grey-level hash misses some duplicates "
            "(on the real sample one of two known ones), so a small leak may remain and flatter the test figures.",
            "- **Lesions unlike the training set**: amelanotic melanoma, lesion types absent from HAM10000, "
            "very small or out-of-focus images, non-dermoscopic photos; the model still returns "
            "probabilities for them, with no warning.",
        ]
    )


ETHICS = """## Ethical considerations

- **Missed melanomas cost most.** A melanoma not referred is a delayed diagnosis; the operating
  point favours recall and the clinician stays responsible for every lesion, referred or not.
- **Unequal performance.** Skin types, ages and sites that the data under-represents may be served
  worse, and the subgroup table can only show the groups the data holds.
- **Automation bias.** A low P(high) must not stop a clinician from referring a lesion that
  worries them, nor a patient's own concern from being heard.
- **Data.** HAM10000 is de-identified public data (CC BY-NC 4.0: no commercial use). Cases scored
  in service are patient data: keep them under the clinic's data-protection rules; the drift
  monitoring stores image statistics and clinical fields, not the images."""


def _caveats(metrics: Mapping) -> str:
    n_high = ((metrics.get("subgroups") or {}).get("overall") or {}).get("n_high")
    return "\n".join(
        [
            "## Caveats and recommendations",
            "",
            "- **One train/test split is noisy**"
            + (f" ({n_high} high-risk test images here)" if n_high else "")
            + ": figures vary by about ±0.02 AUC between folds of the same data. The README's "
            "cross-validation table (Training choices: lesion-grouped 5-fold CV of the default recipe) is the "
            "figure to trust; compare versions on the same cases (`skinrisk registry promote` does).",
            "- The test split comes from the same sources as training: external validation "
            "(`skinrisk evaluate --model ... --data OTHER_CLINIC_DIR`) is needed before use in a new setting.",
            "- Monitor the inputs in service (`skinrisk monitor`): a new dermatoscope, population or site mix "
            "moves the probabilities and the referral rate.",
            "- The 3-level call (`risk_level`) is `argmax P(level) / training share`; referral is decided "
            "separately by the P(high) threshold, so a lesion can be called moderate and still be referred.",
        ]
    )


def card_sections(
    metrics: Mapping,
    preprocess: PreprocessSummary,
    train_params: Mapping,
    train_summary: Mapping,
    registry: RegistryFacts,
    *,
    lead: str | None = None,
) -> list[str]:
    """The card's parts in order: the title (with ``lead``, e.g. the version's headline summary,
    under it), then one Markdown section each."""
    title = (
        _title(registry)
        + "\n\n"
        + (
            "Skin-lesion risk triage (low, moderate, high) from one dermoscopic image and the patient's age, "
            "sex and lesion site. **Not a medical device**: decision support for clinicians, not a diagnosis."
        )
    )
    return [
        title + (f"\n\n{lead.strip()}" if lead else ""),
        _details(metrics, preprocess, train_params, train_summary, registry),
        INTENDED_USE,
        OUT_OF_SCOPE,
        _training_data(preprocess, registry),
        _evaluation(metrics),
        _subgroups(metrics),
        _calibration(metrics, preprocess),
        _operating_point(metrics, preprocess),
        _failure_modes(preprocess),
        ETHICS,
        _caveats(metrics),
    ]


def render_model_card(
    metrics: Mapping,
    preprocess: PreprocessSummary,
    train_params: Mapping,
    train_summary: Mapping,
    registry: RegistryFacts,
    *,
    lead: str | None = None,
) -> str:
    """The model card as Markdown.

    ``metrics``: ``reports/metrics.json`` (:func:`tasks.stages.evaluate.evaluate`); ``preprocess``: the
    processed data's ``preprocess.json``; ``train_params``: the train section (keys without
    ``train.``, values as given: typed, or the strings MLflow stores); ``train_summary``: the train
    stage's ``train.json`` (temperature, test-time views, best epoch); ``registry``: where the model
    is registered. Missing pieces are said to be missing, never guessed.
    """
    return "\n\n".join(card_sections(metrics, preprocess, train_params, train_summary, registry, lead=lead)) + "\n"


def _section_title(section: str) -> str:
    return section.split("\n", 1)[0].removeprefix("## ")


def fit_description(sections: Sequence[str], limit: int, full_card: str) -> str:
    """The card, or, when it is longer than ``limit`` characters, the title (with its lead) and the
    sections that fit, taken in :data:`DESCRIPTION_PRIORITY` order and shown in the card's order, then
    a line naming the sections left out and ``full_card`` (where the whole card is). MLflow's SQL
    stores hold a version's description in a VARCHAR(5000), which PostgreSQL enforces."""
    text = "\n\n".join(sections) + "\n"
    if len(text) <= limit:
        return text
    rank = {title: i for i, title in enumerate(DESCRIPTION_PRIORITY)}
    rest = sorted(range(1, len(sections)), key=lambda i: rank.get(_section_title(sections[i]), len(rank)))

    def shown(kept: set[int]) -> str:
        omitted = [_section_title(sections[i]) for i in range(1, len(sections)) if i not in kept]
        body = "\n\n".join(sections[i] for i in range(len(sections)) if i in kept)
        return body + f"\n\n*Not shown here: {', '.join(omitted)}. The whole card: {full_card}*\n"

    kept = {0}
    for index in rest:
        if len(shown(kept | {index})) <= limit:
            kept.add(index)
    text = shown(kept)
    return text if len(text) <= limit else text[: limit - 2] + "…\n"


# ---------------------------------------------------------------------------------------------
# A local model (a .keras file and the pipeline's outputs beside it)


def _read_json(path: Path, made_by: str) -> dict:
    if not path.is_file():
        raise SkinriskError(f"{path} not found (made by {made_by}): cannot write the model card")
    return json.loads(path.read_text(encoding="utf-8"))


def local_model_card(
    model_path: Path,
    metrics_path: Path,
    processed_dir: Path,
    train_info_path: Path,
    train_params: Mapping,
    data_version: str | None,
    data_source: str | None = None,
) -> str:
    """The card of a model file not (yet) registered, from the pipeline's outputs beside it."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise SkinriskError(f"model file {model_path} not found: run `skinrisk train` first, or give a models:/ URI")
    metrics = _read_json(Path(metrics_path), "`skinrisk evaluate`")
    preprocess = read_preprocess_summary(processed_dir)
    train_summary = (
        json.loads(Path(train_info_path).read_text(encoding="utf-8")) if Path(train_info_path).is_file() else {}
    )
    registry = RegistryFacts(
        name=str(model_path),
        run_id=train_summary.get("run_id"),
        data_version=data_version,
        data_source=data_source,
    )
    return render_model_card(metrics, preprocess, train_params, train_summary, registry)

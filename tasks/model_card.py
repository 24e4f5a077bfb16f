"""The model card of a model version (Mitchell et al. 2019, "Model Cards for Model Reporting").

:func:`render_model_card` is a pure function: Markdown from what the pipeline already wrote —
the evaluate stage's ``metrics.json``, the preprocess summary (``preprocess.json``), the train
params and summary (``train.json``) — and the registry facts (model name, version, run, data
version). The words are the Jinja template ``templates/model_card.md.j2``; this module works out
the figures and tables it shows. The register stage logs the card to the run as ``model_card.md``
and makes it the version's description; ``skinrisk model-card`` prints it.

Figures are rounded for people: three decimals, shares as percentages with one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2

from tasks.errors import SkinriskError
from tasks.schema import RISK_LEVELS, PreprocessSummary, read_preprocess_summary

CARD_FILE = "model_card.md"
TEMPLATE = "model_card.md.j2"
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
# What the architecture and training rows say of a train param the run does not record
TRAIN_PARAM_DEFAULTS = {
    **dict.fromkeys(("alpha", "image_units", "clinical_units", "fusion_units", "dropout", "monitor"), "?"),
    **dict.fromkeys(("head_epochs", "finetune_epochs", "finetune_from_block"), "?"),
    "weights": "unknown",
}


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
    """metrics.json writes nan as null; the template reads an absent key as undefined."""
    return value is None or isinstance(value, jinja2.Undefined) or (isinstance(value, float) and math.isnan(value))


def figure(value, digits: int = 3) -> str:
    """A figure for people: ``0.898``; ``n/a`` when undefined."""
    return "n/a" if _missing(value) else f"{float(value):.{digits}f}"


def with_interval(value, ci) -> str:
    """``0.898 (95% CI 0.862-0.932)``; the figure alone when the interval is undefined."""
    if _missing(value) or not ci or len(ci) < 2 or _missing(ci[0]) or _missing(ci[1]):
        return figure(value)
    return f"{figure(value)} (95% CI {figure(ci[0])}-{figure(ci[1])})"


def share(value) -> str:
    """A proportion as a percentage: ``71.0%``."""
    return "n/a" if _missing(value) else f"{100 * float(value):.1f}%"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (pandas' ``to_markdown`` needs ``tabulate``, which the
    project does not declare: only DVC pulls it in)."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _subgroup_order(value: str) -> tuple:
    """Age bands by age (``under 30`` first), the rest alphabetically, ``unknown`` last."""
    if value == "unknown":
        return (2, 0, value)
    if value.startswith("under "):
        return (0, 0, value)
    head = value.split("-")[0].split(" ")[0]
    return (0, int(head), value) if head.isdigit() else (1, 0, value)


# ---------------------------------------------------------------------------------------------
# The tables


def _details_table(
    metrics: Mapping,
    preprocess: PreprocessSummary,
    train_params: Mapping,
    train_summary: Mapping,
    registry: RegistryFacts,
) -> str:
    calibration = metrics.get("calibration") or {}
    target = (
        train_summary.get("target")
        or train_params.get("target")
        or (metrics.get("operating_point") or {}).get("target", "risk")
    )
    temperature = train_summary.get("temperature", calibration.get("temperature"))
    tta = str(train_summary.get("tta") or calibration.get("views") or train_params.get("tta") or "unknown")
    p = TRAIN_PARAM_DEFAULTS | dict(train_params)
    aux = p.get("aux_dx_weight")
    if target == "risk":
        target_text = f"the risk level ({', '.join(preprocess.risk_levels)}) directly"
        if aux:
            target_text += f"; an auxiliary 7-diagnosis head (loss weight {aux}) is trained, not served"
    else:
        target_text = "the 7 HAM10000 diagnoses, summed per risk level for the output"
    best_epoch = (
        f" (epoch {train_summary['best_epoch']} of {train_summary['epochs_run']} run)"
        if {"best_epoch", "epochs_run"} <= train_summary.keys()
        else ""
    )
    data_source = f" ({registry.data_source} data)" if registry.data_source not in (None, "unknown") else ""
    rows = [
        (
            "architecture",
            f"MobileNetV2 image branch (width {p['alpha']}, {p['weights']} weights) → global average pooling → "
            f"dense ({p['image_units']} units); clinical branch: dense ({p['clinical_units']} units) on standardized "
            f"age with a missing flag and one-hot sex and body site; concatenated → dense ({p['fusion_units']} units) "
            f"with dropout {p['dropout']} → softmax",
        ),
        ("target", target_text),
        ("image input", f"the whole frame resized to {preprocess.image_size} x {preprocess.image_size} pixels"),
        ("clinical input", "age (years, may be unknown), sex, body site (one of 15 HAM10000 sites)"),
        (
            "training",
            f"{p['head_epochs']} epochs with the backbone frozen, then up to {p['finetune_epochs']} fine-tuning from "
            f"block {p['finetune_from_block']}; best epoch by {train_summary.get('monitor', p['monitor'])}"
            + best_epoch,
        ),
        ("softmax temperature", f"{figure(temperature, 2)} (fitted on the validation split)"),
        ("test-time views", f"`{tta}`: {VIEWS.get(tta, tta)}, averaged inside the model"),
        ("version", registry.version or "not registered (a local model file)"),
        (
            "MLflow run",
            f"`{registry.run_name}` ({registry.run_id})" if registry.run_name else registry.run_id or "none",
        ),
        ("date", registry.date or "unknown"),
        ("data version", f"`{registry.data_version or 'unknown'}`{data_source}"),
        ("output", "`p_low`, `p_moderate`, `p_high`, `risk_level`, `refer` (P(high) at or above the threshold)"),
    ]
    return markdown_table(("", ""), rows)


def _headline_table(metrics: Mapping, served) -> str:
    triage = metrics.get("triage") or {}
    overall = (metrics.get("subgroups") or {}).get("overall") or {}
    points = metrics.get("operating_points") or {}
    rows = [
        (
            "**high-risk (melanoma) ROC-AUC** of calibrated P(high)",
            with_interval(metrics.get("high_risk_roc_auc"), metrics.get("high_risk_roc_auc_ci95")),
        ),
        ("high-risk PR-AUC (average precision)", figure(metrics.get("high_risk_pr_auc"))),
    ]
    for name, point in points.items():
        label = name.replace("recall_", "recall ")
        specificity = figure(point.get("specificity"))
        if overall and not _missing(served) and point.get("threshold") == served:
            # the subgroup report bootstraps specificity at the served threshold
            specificity = with_interval(overall.get("specificity"), overall.get("specificity_ci95"))
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
    calibration = metrics.get("calibration")
    rows += [
        (
            "3-level balanced accuracy (called levels)",
            with_interval(metrics.get("balanced_accuracy"), metrics.get("balanced_accuracy_ci95")),
        ),
        ("expected calibration error (ECE)", figure(metrics.get("ece"))),
        (
            "temperature T (see Calibration)",
            figure(calibration.get("temperature"), 2) if calibration else "1.00 (none fitted)",
        ),
        (
            "macro one-vs-rest ROC-AUC (not the headline: lifted by the easy moderate class)",
            figure(metrics.get("roc_auc_ovr")),
        ),
        ("accuracy; macro F1", f"{figure(metrics.get('accuracy'))}; {figure(metrics.get('macro_f1'))}"),
    ]
    return markdown_table(("figure (held-out test split)", "value"), rows)


def _subgroup_table(report: Mapping) -> str:
    by = report.get("by") or {}
    rows = []
    for column in [*(c for c in SUBGROUP_COLUMNS if c in by), *(c for c in by if c not in SUBGROUP_COLUMNS)]:
        for value in sorted(by[column], key=_subgroup_order):
            f = by[column][value]
            name = f"{SUBGROUP_COLUMNS.get(column, column)}: {value}"
            if "high_risk_roc_auc" not in f:
                rows.append((name, f.get("n_images", "?"), "", f.get("n_high", "?"), *["too few"] * 3, ""))
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
    header = ("subgroup", "images", "lesions", "high-risk", "high-risk AUC", "sensitivity", "specificity", "flag")
    return markdown_table(header, rows)


def _diagnosis_table(report: Mapping) -> str:
    by_diagnosis = report.get("by_diagnosis") or {}
    levels = [level for level in RISK_LEVELS if level in by_diagnosis]
    rows = [
        (level, dx, f.get("n_images", "?"), *(share(f.get(f"called_{n}")) for n in levels), share(f.get("referred")))
        for level in reversed(levels)  # high risk first
        for dx, f in sorted(by_diagnosis[level].items())
    ]
    header = ("risk level", "diagnosis", "images", *(f"called {n}" for n in levels), "referred")
    return markdown_table(header, rows) if by_diagnosis else ""


def _operating_table(metrics: Mapping, served) -> str:
    points = metrics.get("operating_points") or ({"served": metrics["triage"]} if metrics.get("triage") else {})
    rows = []
    for name, point in points.items():
        recall = point.get("high_risk_recall")
        rows.append(
            (
                name.replace("recall_", "recall ") + (" (served)" if point.get("threshold") == served else ""),
                figure(point.get("threshold"), 4),
                with_interval(recall, point.get("high_risk_recall_ci95")),
                "n/a" if _missing(recall) else f"{100 * (1 - float(recall)):.1f}",  # melanomas missed per 100
                share(point.get("low_risk_spared")),
                share(point.get("referral_rate")),
            )
        )
    header = (
        "point",
        "P(high) threshold",
        "sensitivity",
        "melanomas missed per 100",
        "low-risk lesions not referred",
        "all lesions referred",
    )
    return markdown_table(header, rows)


def _split_table(preprocess: PreprocessSummary) -> str:
    levels, counts = preprocess.risk_levels, preprocess.counts
    rows = [
        (split, preprocess.lesions.get(split, "?"), *(counts[split].get(lv, 0) for lv in levels)) for split in counts
    ]
    return markdown_table(("split", "lesions", *(f"{level} images" for level in levels)), rows) if counts else ""


# ---------------------------------------------------------------------------------------------
# The card


_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_TEMPLATES.filters.update(figure=figure, share=share)


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
    subgroups = metrics.get("subgroups") or {}
    operating_point = metrics.get("operating_point") or {}
    served = operating_point.get("threshold", (metrics.get("triage") or {}).get("threshold"))
    overall = subgroups.get("overall") or {}
    train_counts = preprocess.counts.get("train") or {}
    by_dx_type = (subgroups.get("by") or {}).get("dx_type") or {}
    risk_map = preprocess.risk_map
    card = _TEMPLATES.get_template(TEMPLATE).render(
        metrics=metrics,
        preprocess=preprocess,
        registry=registry,
        details_table=_details_table(metrics, preprocess, train_params, train_summary, registry),
        risk_map="; ".join(f"**{lv}** = {', '.join(risk_map[lv])}" for lv in preprocess.risk_levels if lv in risk_map),
        split_table=_split_table(preprocess),
        n_test_images=metrics.get("n_test_images", metrics.get("n_cases", "?")),
        n_test_high=((metrics.get("per_class") or {}).get("high") or {}).get("support", overall.get("n_high", "?")),
        overall=overall,
        dx_types=", ".join(f"{name} {f.get('n_images', '?')}" for name, f in by_dx_type.items()),
        headline_table=_headline_table(metrics, served),
        subgroups=subgroups,
        subgroup_table=_subgroup_table(subgroups),
        diagnosis_table=_diagnosis_table(subgroups),
        calibration=metrics.get("calibration") or {},
        high_share=train_counts.get("high", 0) / sum(train_counts.values()) if sum(train_counts.values()) else None,
        target_recall=operating_point.get("target_recall"),
        served=served,
        operating_table=_operating_table(metrics, served),
        val_high=(preprocess.counts.get("val") or {}).get("high", "few"),
        duplicates=preprocess.duplicates or {},
    )
    sections = re.split(r"\n\n(?=## )", card.rstrip("\n"))
    if lead:
        sections[0] += f"\n\n{lead.strip()}"
    return sections


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
    model_path, metrics_path, train_info_path = Path(model_path), Path(metrics_path), Path(train_info_path)
    if not model_path.is_file():
        raise SkinriskError(f"model file {model_path} not found: run `skinrisk train` first, or give a models:/ URI")
    if not metrics_path.is_file():
        raise SkinriskError(f"{metrics_path} not found (made by `skinrisk evaluate`): cannot write the model card")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    train_summary = json.loads(train_info_path.read_text(encoding="utf-8")) if train_info_path.is_file() else {}
    registry = RegistryFacts(
        name=str(model_path), run_id=train_summary.get("run_id"), data_version=data_version, data_source=data_source
    )
    return render_model_card(metrics, read_preprocess_summary(processed_dir), train_params, train_summary, registry)

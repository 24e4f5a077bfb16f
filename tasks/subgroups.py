"""Figures by subgroup: who the model serves less well, with honest intervals.

A triage model can rank melanomas well overall and still miss them in one group (older
patients, acral sites, lesions diagnosed by follow-up rather than histology). For each subgroup of
sex, age band, body-site group and ``dx_type``: its counts, the high-risk ROC-AUC, the high-risk
recall (sensitivity) and specificity at the served operating point, each with a lesion-clustered
95% bootstrap interval; a subgroup is **flagged** when its recall interval lies wholly below the
overall recall. Within each risk level, each diagnosis shows which levels it is called and how
often it is referred (e.g. how many bcc are called low).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.atomic import atomic_path
from tasks.metrics import bootstrap_interval, class_recall, high_risk_auc, triage_figures
from tasks.schema import RISK_LEVELS

# Body sites grouped as clinicians read them (and so each group holds enough lesions to measure)
SITE_GROUPS = {
    "head and neck": ("face", "scalp", "ear", "neck"),
    "trunk": ("back", "trunk", "chest", "abdomen"),
    "upper extremity": ("upper extremity", "hand"),
    "lower extremity": ("lower extremity", "foot"),
    "acral and genital": ("acral", "genital"),
    "unknown": ("unknown",),
}
AGE_BANDS = ((0, 30, "under 30"), (30, 50, "30-49"), (50, 70, "50-69"), (70, 200, "70 and over"))
MIN_CASES = 10  # smaller subgroups are listed with their counts only


def site_group(localization: str) -> str:
    return next((group for group, sites in SITE_GROUPS.items() if localization in sites), "unknown")


def age_band(age: float | None) -> str:
    if age is None or math.isnan(age):
        return "unknown"
    return next(label for low, high, label in AGE_BANDS if low <= age < high)


def subgroup_columns(cases: pd.DataFrame) -> pd.DataFrame:
    """The slicing columns of a case table (``age``, ``sex``, ``localization``, ``dx_type``)."""
    return pd.DataFrame(
        {
            "sex": cases["sex"].fillna("unknown").astype(str),
            "age band": pd.to_numeric(cases["age"], errors="coerce").map(age_band),
            "site group": cases["localization"].fillna("unknown").astype(str).map(site_group),
            "dx_type": cases["dx_type"].fillna("unknown").astype(str),
        },
        index=cases.index,
    )


def _figures(y: np.ndarray, p_high: np.ndarray, groups: np.ndarray, threshold: float, high: int, **boot) -> dict:
    is_high = (y == high).astype(int)
    # 0/1 referrals: recall of class 1 is sensitivity, recall of class 0 (not referred) specificity
    referred = (p_high >= threshold).astype(int)
    triage = triage_figures(y, p_high, threshold, high_index=high)
    sensitivity, specificity = class_recall(1), class_recall(0)
    return {
        "n_images": len(y),
        "n_lesions": len(np.unique(groups)),
        "n_high": int(is_high.sum()),
        "high_risk_roc_auc": high_risk_auc(is_high, p_high),
        "high_risk_roc_auc_ci95": list(bootstrap_interval(high_risk_auc, is_high, p_high, groups=groups, **boot)),
        "high_risk_recall": triage["high_risk_recall"],
        "high_risk_recall_ci95": list(bootstrap_interval(sensitivity, is_high, referred, groups=groups, **boot)),
        "specificity": triage["specificity"],
        "specificity_ci95": list(bootstrap_interval(specificity, is_high, referred, groups=groups, **boot)),
    }


def subgroup_figures(
    cases: pd.DataFrame,
    y_risk: np.ndarray,
    probs: np.ndarray,
    called: np.ndarray,
    groups: np.ndarray,
    threshold: float,
    *,
    risk_levels: list[str],
    high_index: int,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """``{"overall", "by": {column: {value: figures}}, "flagged": [...], "by_diagnosis": {...}}``.

    ``cases`` (one row per scored image, in order) needs ``age``, ``sex``, ``localization``,
    ``dx_type`` and ``dx``; ``groups`` are the lesion (split-group) ids the bootstrap resamples.
    """
    y, p_high, groups = np.asarray(y_risk), np.asarray(probs)[:, high_index], np.asarray(groups)
    boot = {"n_resamples": n_resamples, "seed": seed}
    overall = _figures(y, p_high, groups, threshold, high_index, **boot)
    columns = subgroup_columns(cases.reset_index(drop=True))
    by: dict[str, dict[str, dict]] = {}
    flagged = []
    for column in columns:
        by[column] = {}
        for value, rows in columns.groupby(column).indices.items():
            if len(rows) < MIN_CASES:
                by[column][value] = {"n_images": len(rows), "n_high": int((y[rows] == high_index).sum())}
                continue
            figures = _figures(y[rows], p_high[rows], groups[rows], threshold, high_index, **boot)
            upper = figures["high_risk_recall_ci95"][1]
            figures["flagged"] = bool(upper == upper and upper < overall["high_risk_recall"])
            if figures["flagged"]:
                flagged.append(f"{column}={value}")
            by[column][value] = figures
    referred = p_high >= threshold
    diagnoses = cases["dx"].astype(str).to_numpy()
    by_diagnosis: dict[str, dict[str, dict]] = {}
    for level_index, level in enumerate(risk_levels):
        by_diagnosis[level] = {}
        for dx in sorted(set(diagnoses[y == level_index])):
            rows = (y == level_index) & (diagnoses == dx)
            by_diagnosis[level][dx] = {
                "n_images": int(rows.sum()),
                **{f"called_{name}": float((called[rows] == i).mean()) for i, name in enumerate(risk_levels)},
                "referred": float(referred[rows].mean()),
            }
    return {"overall": overall, "by": by, "flagged": flagged, "by_diagnosis": by_diagnosis, "min_cases": MIN_CASES}


def format_subgroups(report: dict) -> str:
    """A console/Markdown table: one row per subgroup, AUC and recall with their intervals."""

    def cell(value, interval=None) -> str:
        if value is None or value != value:
            return "n/a"
        text = f"{value:.3f}"
        if interval and interval[0] is not None and interval[0] == interval[0]:
            text += f" ({interval[0]:.2f}-{interval[1]:.2f})"
        return text

    lines = [
        "| subgroup | images | high-risk | high-risk AUC (95% CI) | recall at op (95% CI) | specificity at op | flag |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [("overall", report["overall"])] + [
        (f"{column}: {value}", figures) for column, values in report["by"].items() for value, figures in values.items()
    ]
    for name, f in rows:
        if "high_risk_roc_auc" not in f:
            lines.append(f"| {name} | {f['n_images']} | {f['n_high']} | too few | too few | too few | |")
            continue
        lines.append(
            f"| {name} | {f['n_images']} | {f['n_high']} | {cell(f['high_risk_roc_auc'], f['high_risk_roc_auc_ci95'])} "
            f"| {cell(f['high_risk_recall'], f['high_risk_recall_ci95'])} | {cell(f['specificity'])} "
            f"| {'below overall' if f.get('flagged') else ''} |"
        )
    by_diagnosis = report.get("by_diagnosis") or {}
    if by_diagnosis:
        levels = [level for level in RISK_LEVELS if level in by_diagnosis]  # metrics.json sorts its keys
        lines += [
            "",
            "Within each risk level, by diagnosis: the share of images called each level, and the share "
            "referred at the operating point (e.g. benign keratoses sent on as suspected melanoma).",
            "",
            "| level | diagnosis | images | " + " | ".join(f"called {name}" for name in levels) + " | referred |",
            "|---|---|---|" + "---|" * len(levels) + "---|",
        ]
        for level in reversed(levels):  # high risk first
            for dx, f in by_diagnosis[level].items():
                called = " | ".join(f"{100 * f[f'called_{name}']:.1f}%" for name in levels)
                lines.append(f"| {level} | {dx} | {f['n_images']} | {called} | {100 * f['referred']:.1f}% |")
    return "\n".join(lines)


def plot_subgroups(report: dict, path: Path) -> None:
    """A forest plot: high-risk recall at the operating point per subgroup, with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def number(value) -> float:  # metrics.json writes an undefined figure as null
        return math.nan if value is None else float(value)

    rows = [
        (f"{column}: {value}", f)
        for column, values in report["by"].items()
        for value, f in values.items()
        if not math.isnan(number(f.get("high_risk_recall")))
    ]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
    for i, (_, f) in enumerate(rows):
        low, high = (number(v) for v in f["high_risk_recall_ci95"])
        colour = "tab:red" if f.get("flagged") else "tab:blue"
        if not math.isnan(low):
            ax.plot([low, high], [i, i], color=colour, lw=2)
        ax.plot(number(f["high_risk_recall"]), i, "o", color=colour)
    overall = number(report["overall"]["high_risk_recall"])
    if not math.isnan(overall):
        ax.axvline(overall, color="grey", ls="--", label="overall")
    ax.set_yticks(range(len(rows)), [f"{name} (n={f['n_images']}, high {f['n_high']})" for name, f in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("high-risk recall at the operating point (95% lesion-clustered CI)")
    ax.set_title("Sensitivity by subgroup (red: interval below the overall figure)")
    if not math.isnan(overall):
        ax.legend(loc="lower left")
    fig.tight_layout()
    try:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)

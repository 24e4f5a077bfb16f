"""The subgroup report: counts, intervals, the flag, and diagnoses within each risk level."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.subgroups import age_band, format_subgroups, plot_subgroups, site_group, subgroup_figures

LEVELS = ["low", "moderate", "high"]


def _cases(n: int = 600, seed: int = 0):
    """Cases where the model misses the melanomas of patients 70 and over, and no one else's."""
    rng = np.random.default_rng(seed)
    age = rng.choice([25.0, 45.0, 60.0, 80.0], n)
    y = rng.choice([0, 1, 2], n, p=[0.6, 0.2, 0.2])
    p_high = np.where(y == 2, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.4, n))
    missed = (y == 2) & (age >= 70)
    p_high[missed] = rng.uniform(0.0, 0.3, missed.sum())
    probs = np.stack([(1 - p_high) * 0.7, (1 - p_high) * 0.3, p_high], axis=1)
    dx = np.where(y == 2, "mel", np.where(y == 1, rng.choice(["bcc", "akiec"], n), "nv"))
    cases = pd.DataFrame(
        {
            "age": age,
            "sex": rng.choice(["male", "female"], n),
            "localization": rng.choice(["back", "face", "foot", "hand"], n),
            "dx_type": rng.choice(["histo", "follow_up"], n),
            "dx": dx,
        }
    )
    return cases, y, probs, np.array([f"L{i // 2}" for i in range(n)])


def test_a_group_whose_melanomas_are_missed_is_flagged_and_others_are_not():
    cases, y, probs, groups = _cases()
    called = probs.argmax(axis=1)
    report = subgroup_figures(cases, y, probs, called, groups, 0.5, risk_levels=LEVELS, high_index=2, n_resamples=200)
    assert report["flagged"] == ["age band=70 and over"], report["flagged"]
    old = report["by"]["age band"]["70 and over"]
    assert old["high_risk_recall"] == 0.0 and old["high_risk_recall_ci95"] == [0.0, 0.0]
    young = report["by"]["age band"]["under 30"]
    assert young["high_risk_recall"] == 1.0 and not young["flagged"]
    assert sum(v["n_images"] for v in report["by"]["sex"].values()) == len(y)
    assert report["overall"]["n_lesions"] == len(set(groups))
    low, high = report["overall"]["high_risk_roc_auc_ci95"]
    assert low <= report["overall"]["high_risk_roc_auc"] <= high
    assert set(report["by"]["site group"]) == {"trunk", "head and neck", "lower extremity", "upper extremity"}


def test_within_each_level_each_diagnosis_shows_how_it_is_called():
    cases, y, probs, groups = _cases()
    called = np.where(cases["dx"].to_numpy() == "bcc", 0, probs.argmax(axis=1))  # every bcc called low
    report = subgroup_figures(cases, y, probs, called, groups, 0.5, risk_levels=LEVELS, high_index=2, n_resamples=50)
    bcc = report["by_diagnosis"]["moderate"]["bcc"]
    assert bcc["called_low"] == 1.0 and bcc["called_moderate"] == 0.0
    assert bcc["n_images"] == int(((y == 1) & (cases["dx"] == "bcc")).sum())
    assert set(report["by_diagnosis"]["high"]) == {"mel"}
    row = next(line for line in format_subgroups(report).splitlines() if line.startswith("| moderate | bcc |"))
    assert row == f"| moderate | bcc | {bcc['n_images']} | 100.0% | 0.0% | 0.0% | {100 * bcc['referred']:.1f}% |"


def test_small_subgroups_show_counts_only_and_the_table_and_plot_render(tmp_path):
    cases, y, probs, groups = _cases(n=200)
    cases.loc[:4, "sex"] = "unknown"
    report = subgroup_figures(
        cases, y, probs, probs.argmax(axis=1), groups, 0.5, risk_levels=LEVELS, high_index=2, n_resamples=50
    )
    assert "high_risk_roc_auc" not in report["by"]["sex"]["unknown"]
    table = format_subgroups(report)
    assert "| sex: unknown | 5 |" in table and "too few" in table and "below overall" in table
    plot_subgroups(report, tmp_path / "subgroups.png")
    assert (tmp_path / "subgroups.png").stat().st_size > 1000
    # as metrics.json gives it back: undefined figures are null
    from tasks.scored_model import json_safe

    plot_subgroups(json_safe(report), tmp_path / "from_json.png")
    assert "n/a" in format_subgroups(json_safe(report)) or "too few" in format_subgroups(json_safe(report))


def test_bands_and_site_groups():
    assert [age_band(a) for a in (5, 30, 49.9, 50, 70, float("nan"))] == [
        "under 30",
        "30-49",
        "30-49",
        "50-69",
        "70 and over",
        "unknown",
    ]
    assert site_group("scalp") == "head and neck" and site_group("acral") == "acral and genital"
    assert site_group("unknown") == "unknown"

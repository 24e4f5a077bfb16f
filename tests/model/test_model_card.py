"""The model card: what it says about a trained model, and where registration puts it.

The card is rendered from the ``trained`` fixture's own ``metrics.json`` (the evaluate stage's
keys, not a hand-written copy), so a renamed key or a dropped figure fails here. Registration goes
through ``tasks.stages.register.register``, the path both orchestrators take (``skinrisk
register`` under DVC, the Prefect ``register`` task).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow
import pytest

from tasks import tracking
from tasks.cli import main
from tasks.model_card import CARD_FILE, RegistryFacts, fit_description, render_model_card
from tasks.schema import read_preprocess_summary
from tasks.stages.register import DESCRIPTION_LIMIT
from tests.support import PROJECT_ROOT

SECTIONS = [
    "## Model details",
    "## Intended use",
    "## Out-of-scope uses",
    "## Training data",
    "## Evaluation data and figures",
    "## Figures by subgroup",
    "## Calibration",
    "## Operating point",
    "## Known failure modes and shortcuts",
    "## Ethical considerations",
    "## Caveats and recommendations",
]
SUBGROUP_LABELS = {"sex": "sex", "age band": "age band", "site group": "body-site group", "dx_type": "dx_type"}
DATA_VERSION = "sha256:feedfacecafebeef"


def with_ci(value: float, ci: list) -> str:
    """A figure and its interval as the card writes them, spelt out here so a format change fails."""
    return f"{value:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})"


def error_line(stderr: str) -> str:
    """The one ``error:`` line a failed command prints (MLflow may log store set-up lines around it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def table_row(card: str, first_cell: str) -> str:
    rows = [line for line in card.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, (first_cell, rows)
    return rows[0]


@pytest.fixture(scope="module")
def card_inputs(trained, learnable):
    out, _, metrics = trained
    train_summary = json.loads((out / "models" / "train.json").read_text(encoding="utf-8"))
    preprocess = read_preprocess_summary(learnable / "processed")
    return metrics, preprocess, train_summary


@pytest.fixture(scope="module")
def card(card_inputs) -> str:
    metrics, preprocess, train_summary = card_inputs
    registry = RegistryFacts(
        name="skinrisk",
        version="7",
        run_id="0123abcd",
        run_name="dvc-feedface-20261203-1842",
        data_version=DATA_VERSION,
        date="2026-12-03",
    )
    return render_model_card(metrics, preprocess, {"alpha": "0.35", "weights": "none"}, train_summary, registry)


# ---------------------------------------------------------------------------------------------
# What the card says


@pytest.mark.slow
def test_the_card_has_every_section_in_order(card) -> None:
    assert card.startswith("# Model card: skinrisk version 7\n")
    positions = [card.find(section + "\n") for section in SECTIONS]
    assert -1 not in positions, [s for s, p in zip(SECTIONS, positions, strict=True) if p == -1]
    assert positions == sorted(positions), "sections out of order"
    assert "**Not a medical device.** It has no regulatory clearance" in card
    assert "not for\n  diagnosis, and must not be used without a clinician" in card
    assert "Fitzpatrick I-III" in card and "**Performance on darker skin types is unknown**" in card
    for shortcut in ("Vignetting and dark corners", "Rulers, ink markings", "Hair, gel and air bubbles"):
        assert shortcut in card
    assert "±0.02 AUC between folds" in card and "cross-validation table" in card


@pytest.mark.slow
def test_the_details_name_version_run_data_and_scoring(card, card_inputs) -> None:
    _, preprocess, train_summary = card_inputs
    assert "MobileNetV2 image branch (width 0.35, none weights)" in card
    assert table_row(card, "version") == "| version | 7 |"
    assert table_row(card, "MLflow run") == "| MLflow run | `dvc-feedface-20261203-1842` (0123abcd) |"
    assert table_row(card, "date") == "| date | 2026-12-03 |"
    assert table_row(card, "data version").startswith(f"| data version | `{DATA_VERSION}`")
    assert f"resized to {preprocess.image_size} x {preprocess.image_size} pixels" in card
    assert table_row(card, "softmax temperature").startswith(
        f"| softmax temperature | {train_summary['temperature']:.2f} "
    )
    assert f"`{train_summary['tta']}`" in table_row(card, "test-time views")


@pytest.mark.slow
def test_the_headline_figures_and_their_intervals_are_metrics_json(card, card_inputs) -> None:
    metrics, _, _ = card_inputs
    # the high-risk AUC leads the figures, with its interval; the macro AUC comes late, labelled as such
    auc = table_row(card, "**high-risk (melanoma) ROC-AUC** of calibrated P(high)")
    assert auc.endswith(f"| {with_ci(metrics['high_risk_roc_auc'], metrics['high_risk_roc_auc_ci95'])} |")
    header = "| figure (held-out test split) | value |\n|---|---|\n"
    assert card.index(header) + len(header) == card.index(auc)
    macro = table_row(card, "macro one-vs-rest ROC-AUC (not the headline: lifted by the easy moderate class)")
    assert card.index(auc) < card.index(macro)
    assert set(metrics["operating_points"]) == {"recall_0.90", "recall_0.95"}
    for name, point in metrics["operating_points"].items():
        label = name.replace("recall_", "recall ")
        row = table_row(card, f"sensitivity (high-risk recall) at the {label} point")
        assert row.endswith(f"| {with_ci(point['high_risk_recall'], point['high_risk_recall_ci95'])} |")
        assert f"| {point['specificity']:.3f}" in table_row(card, f"specificity at the {label} point")
        missed = f"{100 * (1 - point['high_risk_recall']):.1f}"
        spared = f"{100 * point['low_risk_spared']:.1f}%"
        assert f"| {missed} | {spared} |" in table_row(card, label + (" (served)" if name == "recall_0.90" else ""))
    balanced = table_row(card, "3-level balanced accuracy (called levels)")
    assert balanced.endswith(f"| {with_ci(metrics['balanced_accuracy'], metrics['balanced_accuracy_ci95'])} |")
    assert table_row(card, "expected calibration error (ECE)").endswith(f"| {metrics['ece']:.3f} |")
    assert macro.endswith(f"| {metrics['roc_auc_ovr']:.3f} |")
    if "calibration" in metrics:  # the temperature's effect on the test ECE
        assert f"to {metrics['calibration']['ece_after']:.3f}" in card


@pytest.mark.slow
def test_every_subgroup_has_its_row(card, card_inputs) -> None:
    metrics, _, _ = card_inputs
    report = metrics["subgroups"]
    assert set(report["by"]) == set(SUBGROUP_LABELS)
    rows = 0
    for column, values in report["by"].items():
        for value, figures in values.items():
            row = table_row(card, f"{SUBGROUP_LABELS[column]}: {value}")
            assert row.startswith(f"| {SUBGROUP_LABELS[column]}: {value} | {figures['n_images']} |")
            if (
                "high_risk_roc_auc" in figures
                and figures["high_risk_roc_auc"] is not None
                and figures["high_risk_recall_ci95"][0] is not None
            ):
                assert with_ci(figures["high_risk_recall"], figures["high_risk_recall_ci95"]) in row
                assert ("**below overall**" in row) == figures["flagged"]
            elif "high_risk_roc_auc" not in figures:
                assert "too few" in row
            rows += 1
    assert rows >= 8
    assert f"**Flagged: {', '.join(report['flagged']) or 'none'}.**" in card
    for level, diagnoses in report["by_diagnosis"].items():
        for dx, figures in diagnoses.items():
            assert table_row(card, level + f" | {dx}").endswith(f"| {100 * figures['referred']:.1f}% |")


@pytest.mark.slow
def test_the_duplicate_search_counts_are_preprocess_json(card, card_inputs) -> None:
    _, preprocess, _ = card_inputs
    duplicates = preprocess.duplicates
    assert (
        f"found {duplicates['near_duplicate_pairs']} near-duplicate image pair(s) across lesion_ids and joined "
        f"{duplicates['merged_lesions']} lesion_ids into {duplicates['merged_groups']} split group(s)"
    ) in card
    for split, counts in preprocess.counts.items():
        assert table_row(card, split).endswith(
            " | ".join(str(counts[level]) for level in ("low", "moderate", "high")) + " |"
        )


def test_a_description_too_long_for_the_registry_keeps_the_first_sections_and_says_where_the_rest_is() -> None:
    title = "# Model card: m version 1\n\nlead"
    details, use = "## Model details\n\n" + "d" * 60, "## Intended use\n\n" + "i" * 60
    subgroups = "## Figures by subgroup\n\n" + "s" * 200
    sections = [title, details, use, subgroups]
    assert fit_description(sections, 1000, "elsewhere") == "\n\n".join(sections) + "\n"

    where = "the artifact `model_card.md`"
    text = fit_description(sections, 300, where)
    assert len(text) <= 300
    assert text == f"{title}\n\n{details}\n\n{use}\n\n*Not shown here: Figures by subgroup. The whole card: {where}*\n"
    # intended use goes before the model details, which no longer fit; the card's order is kept
    text = fit_description(sections, 230, where)
    assert (
        text == f"{title}\n\n{use}\n\n*Not shown here: Model details, Figures by subgroup. The whole card: {where}*\n"
    )


# ---------------------------------------------------------------------------------------------
# Registration, and `skinrisk model-card`


@pytest.fixture
def registered(trained, learnable, mlflow_store, tmp_path):
    """The trained model registered through the pipeline's path: (run id, registration)."""
    from tasks.stages.register import register

    out = trained[0]
    model_dir = shutil.copytree(out / "models", tmp_path / "models")  # registered.json lands here, not in the fixture
    run_id = tracking.start_run(
        "dvc-feedface-20261203-1842",
        {"train.alpha": 0.35, "train.weights": "none", "train.target": "risk"},
        {"data_version": DATA_VERSION, "data_source": "synthetic"},
    )
    registration = register(model_dir / "model.keras", learnable / "processed", model_dir, out / "reports", run_id)
    return run_id, registration


@pytest.mark.slow
def test_registering_logs_the_card_and_makes_it_the_version_description(registered, trained, tmp_path) -> None:
    run_id, registration = registered
    metrics = trained[2]
    store = tracking.client()
    assert CARD_FILE in [artifact.path for artifact in store.list_artifacts(run_id)], "at the artifact root"
    logged = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CARD_FILE, dst_path=str(tmp_path)))
    card = logged.read_text(encoding="utf-8")

    assert card.startswith(f"# Model card: skinrisk version {registration.version}\n")
    for section in SECTIONS:
        assert section + "\n" in card
    assert "MobileNetV2 image branch (width 0.35, none weights)" in card, "the run's train params"
    assert "**the synthetic HAM10000-shaped sample**" in card, "the run's data_source tag"
    assert with_ci(metrics["high_risk_roc_auc"], metrics["high_risk_roc_auc_ci95"]) in card
    # the short headline summary stays the card's first lines
    assert "Headline figures on the held-out test split:" in card.split("## Model details")[0]
    assert f"high-risk (melanoma) ROC-AUC: {metrics['high_risk_roc_auc']:.4f}" in card

    version = store.get_model_version("skinrisk", registration.version)
    assert len(version.description) <= DESCRIPTION_LIMIT, "PostgreSQL's VARCHAR(5000)"
    if len(card) <= DESCRIPTION_LIMIT:
        assert version.description == card
    else:
        shown, note = version.description.split("\n\n*Not shown here: ")
        parts = shown.split("\n\n## ")
        assert [card.index(part) for part in parts] == sorted(card.index(part) for part in parts), "the card's order"
        titles = [part.split("\n", 1)[0] for part in parts[1:]]
        assert {"Intended use", "Evaluation data and figures"} <= set(titles), "what matters most is shown"
        omitted = note.split(". The whole card:")[0].split(", ")
        assert sorted(titles + omitted) == sorted(section.removeprefix("## ") for section in SECTIONS)
        assert f"`skinrisk model-card --model models:/skinrisk/{registration.version}`" in note
    assert version.description.startswith(f"# Model card: skinrisk version {registration.version}\n")
    assert "**Not a medical device**" in version.description
    assert "model card" in store.get_registered_model("skinrisk").description, "the model points at the cards"


@pytest.mark.slow
def test_the_model_card_command_prints_a_registered_card(registered, tmp_path, capsys) -> None:
    run_id, registration = registered
    logged = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CARD_FILE, dst_path=str(tmp_path)))
    card = logged.read_text(encoding="utf-8")

    for uri in ("models:/skinrisk@challenger", f"models:/skinrisk/{registration.version}"):
        assert main(["model-card", "--model", uri]) == 0
        assert capsys.readouterr().out == card

    out = tmp_path / "cards" / "card.md"
    assert main(["model-card", "--model", "models:/skinrisk@challenger", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == card
    assert str(out) in capsys.readouterr().out

    # An alias or version the registry does not have: one line, naming what it does have
    assert main(["model-card", "--model", "models:/skinrisk@champion"]) == 1
    err = error_line(capsys.readouterr().err)
    assert re.match(r"error: no model at models:/skinrisk@champion in the MLflow store at sqlite:///", err), err
    assert "alias(es) challenger -> version 1" in err
    assert main(["model-card", "--model", "models:/skinrisk/9"]) == 1
    assert "version(s) [1]" in error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_a_second_registration_from_the_run_keeps_each_version_its_own_card(
    registered, trained, learnable, capsys
) -> None:
    from tasks.stages.register import register_model

    run_id, first = registered
    out = trained[0]
    second = register_model(
        out / "models" / "model.keras",
        learnable / "processed",
        out / "models" / "operating_point.json",
        run_id,
        evaluation=trained[2],
    )
    assert (first.version, second.version) == ("1", "2")
    assert main(["model-card", "--model", "models:/skinrisk/1"]) == 0
    assert capsys.readouterr().out.startswith("# Model card: skinrisk version 1\n"), "from the description"
    assert main(["model-card", "--model", "models:/skinrisk/2"]) == 0
    assert capsys.readouterr().out.startswith("# Model card: skinrisk version 2\n")


@pytest.mark.slow
def test_the_model_card_command_renders_a_local_model(trained, learnable, tmp_path, monkeypatch, capsys) -> None:
    out = trained[0]
    monkeypatch.chdir(tmp_path)
    card_file = tmp_path / "card.md"
    args = [
        "model-card",
        "--params",
        str(PROJECT_ROOT / "params.yaml"),
        "--model",
        str(out / "models" / "model.keras"),
        "--processed-dir",
        str(learnable / "processed"),
        "--model-dir",
        str(out / "models"),
        "--reports-dir",
        str(out / "reports"),
        "--raw-dir",
        str(learnable / "raw"),
        "--out",
        str(card_file),
    ]
    assert main(args) == 0, capsys.readouterr().err
    card = card_file.read_text(encoding="utf-8")
    assert card.startswith(f"# Model card: {out / 'models' / 'model.keras'} (not registered)\n")
    metrics = trained[2]
    assert with_ci(metrics["high_risk_roc_auc"], metrics["high_risk_roc_auc_ci95"]) in card
    assert "**the synthetic HAM10000-shaped sample**" in card


def test_a_bad_model_is_one_clear_line(mlflow_store, capsys) -> None:
    assert main(["model-card", "--model", "models:/skinrisk@champion"]) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: no model at models:/skinrisk@champion")
    assert "No registered model is named 'skinrisk': run `skinrisk register` first." in err

    assert main(["model-card", "--model", "models:/skinrisk/latest"]) == 1
    assert "names no model version" in error_line(capsys.readouterr().err)
    assert main(["model-card", "--model", "model.onnx"]) == 1
    assert "is neither a registered model nor a .keras file" in error_line(capsys.readouterr().err)
    assert main(["model-card", "--model", "missing.keras", "--params", str(PROJECT_ROOT / "params.yaml")]) == 1
    assert "model file missing.keras not found" in error_line(capsys.readouterr().err)

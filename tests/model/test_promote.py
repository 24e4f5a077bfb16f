"""Registry promotion on a real SQLite MLflow store: gates, aliases, rollback, triage from @champion."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.errors import DataError, SkinriskError
from tasks.params import EvaluateParams, PromoteParams
from tasks.schema import raw_image_path

pytestmark = pytest.mark.slow

# Loose absolute floors: the tiny test model is good but not a clinical one. Its high-risk recall
# at the operating point rests on about ten test lesions and a threshold chosen on as few in
# validation, so it swings between machines (0.4 to 1.0 seen); that floor stays open here and
# each gate's blocking is proved on fixed figures in tests/code/test_promotion_gates.py.
# The tiny model ranks well above chance but is no clinical model: the floors are set for it.
GATES = PromoteParams(
    min_high_risk_auc=0.5, min_high_risk_recall=0.0, max_ece=0.35, min_balanced_accuracy=0.4, bootstrap_resamples=100
)


def _register(model_path: Path, processed: Path, model_dir: Path) -> str:
    from tasks.stages.register import register_model
    from tasks.tracking import start_run

    run_id = start_run("test", {}, {"data_version": "test"})
    return register_model(model_path, processed, model_dir / "operating_point.json", run_id).version


def _alias(registry, alias: str) -> str:
    return str(registry.get_model_version_by_alias("skinrisk", alias).version)


def _always_low_model(trained_model: Path, processed: Path, out: Path) -> Path:
    """The trained network with its output layer overwritten: it predicts "low" for every case."""
    from tasks.model import load_model, single_view
    from tasks.stages.evaluate import evaluate

    model = load_model(trained_model)
    head = single_view(model).get_layer("fusion_head").get_layer("probabilities")
    kernel, bias = head.get_weights()
    head.set_weights([np.zeros_like(kernel), np.array([4.0, 0.0, 0.0], dtype=bias.dtype)])
    out.mkdir(parents=True)
    model.save(out / "model.keras")
    evaluate(out / "model.keras", processed, out / "reports", out, EvaluateParams(bootstrap_resamples=100))
    return out / "model.keras"


def test_promotion_gates_aliases_and_rollback(trained, learnable, mlflow_store, tmp_path):
    from tasks.stages.promote import promote, registry_table, rollback
    from tasks.tracking import client

    out, result, _ = trained
    processed, raw = learnable / "processed", learnable / "raw"
    registry = client()

    first = _register(Path(result.model_path), processed, out / "models")
    decision = promote(processed, raw, GATES)
    assert decision.promoted and decision.champion_version is None, decision.summary()
    assert _alias(registry, "champion") == first

    worse = _always_low_model(Path(result.model_path), processed, tmp_path / "worse")
    second = _register(worse, processed, worse.parent)
    decision = promote(processed, raw, GATES)
    assert not decision.promoted, "a worse model must never be promoted"
    assert decision.challenger_figures["balanced_accuracy"] == pytest.approx(1 / 3)
    assert _alias(registry, "champion") == first
    tags = registry.get_model_version("skinrisk", second).tags
    assert tags["promotion.decision"] == "rejected" and "FAIL" in tags["promotion.reasons"]

    third = _register(Path(result.model_path), processed, out / "models")
    decision = promote(processed, raw, GATES)
    assert decision.promoted, decision.summary()
    assert _alias(registry, "champion") == third
    assert _alias(registry, "previous") == first

    table = registry_table()
    assert table["version"].tolist() == [int(third), int(second), int(first)]
    assert "champion" in table.loc[0, "aliases"]

    assert rollback() == (third, first)
    assert _alias(registry, "champion") == first
    with pytest.raises(SkinriskError, match="no @previous"):
        rollback()


def test_triage_ranks_valid_cases_and_reports_invalid_ones(trained, learnable, mlflow_store, tmp_path):
    from tasks.scored_model import load_bundle
    from tasks.stages.promote import promote
    from tasks.triage import ACTIONS, triage

    out, result, _ = trained
    processed, raw = learnable / "processed", learnable / "raw"
    _register(Path(result.model_path), processed, out / "models")
    assert promote(processed, raw, GATES).promoted

    images = tmp_path / "incoming"
    images.mkdir()
    cases = pd.read_csv(processed / "cases.csv").query("split == 'test'").head(12)
    for image_id in cases["image_id"]:
        shutil.copy(raw_image_path(raw, image_id), images / f"{image_id}.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    rows = [
        {"case": image_id, "image": f"{image_id}.jpg", "age": age, "sex": sex, "localization": site}
        for image_id, age, sex, site in cases[["image_id", "age", "sex", "localization"]].itertuples(index=False)
    ]
    rows += [
        {"case": "missing", "image": "nowhere.jpg", "age": 50, "sex": "male", "localization": "back"},
        {"case": "site", "image": rows[0]["image"], "age": 50, "sex": "male", "localization": "elbow"},
        {"case": "old", "image": rows[0]["image"], "age": 130, "sex": "male", "localization": "back"},
        {"case": "corrupt", "image": "broken.jpg", "age": 50, "sex": "female", "localization": "back"},
        {"case": "outside", "image": "../outside.jpg", "age": 50, "sex": "male", "localization": "back"},
        {"case": "spaced", "image": rows[0]["image"], "age": 50, "sex": " male ", "localization": "back "},
    ]
    shutil.copy(images / rows[0]["image"], tmp_path / "outside.jpg")  # a readable file, but not under --images
    pd.DataFrame(rows).to_csv(tmp_path / "cases.csv", index=False)

    bundle = load_bundle("models:/skinrisk@champion", processed, Path())
    summary = triage(bundle, tmp_path / "cases.csv", images, tmp_path / "queue.csv")
    assert (summary.n_cases, summary.n_scored, summary.n_invalid) == (18, 13, 5)
    queue = pd.read_csv(tmp_path / "queue.csv")
    assert queue["rank"].tolist() == list(range(1, 14))
    assert queue.set_index("case").loc["spaced", "sex"] == "male"  # stripped, as the import does
    assert queue["p_high"].is_monotonic_decreasing
    np.testing.assert_allclose(queue[["p_low", "p_moderate", "p_high"]].sum(axis=1), 1.0, atol=1e-3)
    threshold = json.loads((out / "models" / "operating_point.json").read_text())["threshold"]
    assert (queue["refer"] == (queue["p_high"] >= threshold - 1e-4)).all()
    assert set(queue["action"]) <= set(ACTIONS.values())
    invalid = pd.read_csv(summary.invalid_path).set_index("row")
    reasons = " | ".join(invalid["reason"])
    fragments = ("nowhere.jpg not found", "unknown localization 'elbow'", "130 is outside", "cannot decode image")
    for fragment in (*fragments, "../outside.jpg is outside the images folder"):
        assert fragment in reasons, reasons

    # The command line, its rows checked in two worker processes: the same queue.
    from tasks.cli import main

    command = ["triage", "--model", "models:/skinrisk@champion", "--cases", str(tmp_path / "cases.csv")]
    command += ["--images", str(images), "--out", str(tmp_path / "queue2.csv"), "--workers", "2"]
    assert main([*command, "--processed-dir", str(processed)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "queue2.csv"), queue)

    # A second run to the same queue with only valid rows: the first run's invalid rows are gone.
    pd.DataFrame(rows[:12]).to_csv(tmp_path / "valid.csv", index=False)
    again = triage(bundle, tmp_path / "valid.csv", images, tmp_path / "queue.csv")
    assert again.invalid_path is None and not Path(summary.invalid_path).exists()

    for content in (b"", b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary"):  # an empty file, a binary one
        (tmp_path / "bad.csv").write_bytes(content)
        with pytest.raises(DataError, match="not a readable cases CSV"):
            triage(bundle, tmp_path / "bad.csv", images, tmp_path / "queue.csv")


def test_the_ece_gate_measures_over_evaluate_s_bins(trained, learnable):
    """The gate's ECE is the one metrics.json reports: over ``evaluate.calibration_bins`` bins."""
    from tasks.metrics import expected_calibration_error
    from tasks.scored_model import load_bundle, risk_labels, score_images
    from tasks.stages.promote import evaluation_cases, model_figures

    out, result, _ = trained
    processed, raw = learnable / "processed", learnable / "raw"
    bundle = load_bundle(result.model_path, processed, out / "models")
    cases, paths = evaluation_cases(processed, raw)
    known = cases["age"].notna().to_numpy()  # under missing_clinical: drop, the gate scores these
    scored = cases.loc[known]
    labels = risk_labels(bundle, scored["dx"])
    probs = score_images(bundle, scored, [p for p, k in zip(paths, known, strict=True) if k])
    # A confident model puts every case in the top bin of both 3 and 15 bins, where the two ECEs
    # agree; a fine binning separates them, so the check below sees whether the bins reach it.
    bins = next(
        b
        for b in (3, 50, 1000)
        if expected_calibration_error(labels, probs, b) != pytest.approx(expected_calibration_error(labels, probs, 15))
    )
    assert model_figures(bundle, cases, paths, GATES, calibration_bins=bins)["ece"] == pytest.approx(
        expected_calibration_error(labels, probs, bins)
    )
    assert model_figures(bundle, cases, paths, GATES)["ece"] == pytest.approx(expected_calibration_error(labels, probs))

"""Drift monitoring: the reference profile, per-column drift of shifted batches, the alarm and retraining.

The reference is built from the session's synthetic training split with a tiny untrained model.
Batches are a second synthetic sample (another seed, same distribution) and shifted copies of it,
each written as a HAM10000 folder. Every shift test checks the shifted column drifts *and* that the
group it did not touch scores exactly as in the unshifted batch, so drift is attributed to its cause.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from flows.retraining import trigger_retraining
from tasks.errors import DataError, SkinriskError
from tasks.params import MonitorParams
from tests.support import PROJECT_ROOT, tiny_train_params

BATCH_IMAGES = 200
BATCH_SEED = 12  # the session sample is seed 11: same distribution, different cases
METADATA = "HAM10000_metadata.csv"
DEPLOYMENT = MonitorParams().retrain_deployment


@pytest.fixture(autouse=True)
def no_prefect_api(request):
    """No test may reach a real Prefect server (and trigger a real retraining) from a developer's env;
    only the flow test talks to Prefect, through the test harness's temporary server."""
    if "prefect_api" in request.fixturenames:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


# --- fast unit tests -------------------------------------------------------------------------


def test_image_statistics_measure_what_they_name():
    from tasks.drift_profile import image_statistics

    rng = np.random.default_rng(0)
    grey = np.full((1, 16, 16, 3), 100, np.uint8)
    lighter = np.full((1, 16, 16, 3), 150, np.uint8)
    noisy = np.clip(100 + rng.normal(0, 30, (1, 16, 16, 3)), 0, 255).astype(np.uint8)
    reddish = grey.copy()
    reddish[..., 0] = 180
    stats = image_statistics(np.concatenate([grey, lighter, noisy, reddish]))
    assert list(stats.columns) == ["brightness", "contrast", "mean_red", "mean_green", "mean_blue", "sharpness"]
    assert stats.loc[0, "brightness"] == pytest.approx(100, abs=0.01)
    assert stats.loc[1, "brightness"] == pytest.approx(150, abs=0.01)
    assert stats.loc[0, "contrast"] == pytest.approx(0) and stats.loc[2, "contrast"] > 10
    assert stats.loc[0, "sharpness"] == pytest.approx(0) and stats.loc[2, "sharpness"] > 100
    assert stats.loc[3, "mean_red"] == pytest.approx(180) and stats.loc[3, "mean_green"] == pytest.approx(100)


def test_categorical_test_tolerates_a_rare_new_category_but_not_a_new_mix():
    from tasks.stages.monitor import _chi2_homogeneity

    rng = np.random.default_rng(0)
    reference = pd.Series(rng.choice(["back", "trunk", "face"], 400, p=[0.5, 0.4, 0.1]))
    same = pd.Series([*rng.choice(["back", "trunk", "face"], 199, p=[0.5, 0.4, 0.1]), "acral"])
    other = pd.Series(rng.choice(["back", "trunk", "face"], 200, p=[0.2, 0.3, 0.5]))
    assert not _chi2_homogeneity(reference, same, None, 0.05)[1], "one case of an unseen site is not drift"
    p_value, drifted = _chi2_homogeneity(reference, other, None, 0.05)
    assert drifted and p_value < 1e-6
    assert _chi2_homogeneity(pd.Series(["low"] * 50), pd.Series(["low"] * 20), None, 0.05) == (1.0, False)


def test_one_image_per_lesion_keeps_cases_without_a_lesion_id():
    from tasks.drift_profile import one_per_lesion

    ids = ["L1", "L1", "L2", "", "L3", "L3", "L3", ""]
    rows = one_per_lesion(ids, seed=0)
    kept = [ids[i] for i in rows]
    assert sorted(k for k in kept if k) == ["L1", "L2", "L3"]
    assert {3, 7} <= set(rows) and list(rows) == sorted(rows)


def test_a_cases_csv_is_checked_with_line_numbers(tmp_path):
    from tasks.stages.monitor import read_batch

    (tmp_path / "a.jpg").write_bytes(b"")
    csv = tmp_path / "cases.csv"
    csv.write_text("image,age,sex\na.jpg,40,male\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['localization'\]"):
        read_batch(csv, tmp_path)
    csv.write_text("image,age,sex,localization\na.jpg,40,male,back\na.jpg,50,robot,back\n")
    with pytest.raises(DataError, match=r"line 3: sex 'robot'"):
        read_batch(csv, tmp_path)
    csv.write_text("image,age,sex,localization\nmissing.jpg,40,male,back\n")
    with pytest.raises(DataError, match="not found"):
        read_batch(csv, tmp_path)


def test_without_a_prefect_api_retraining_reports_no_deployment():
    outcome = trigger_retraining(DEPLOYMENT, "3 of 20 columns drifted")
    assert outcome.requested and not outcome.triggered
    assert outcome.message.startswith("no deployment") and "PREFECT_API_URL" in outcome.message


# --- the monitor on synthetic batches (tiny untrained model) ---------------------------------


@pytest.fixture(scope="module")
def tiny_model(processed_dir):
    from tasks.clinical import ClinicalEncoder
    from tasks.model import build_model

    encoder = ClinicalEncoder.load(processed_dir / "encoder.json")
    return build_model(32, encoder.n_features, 3, tiny_train_params())


@pytest.fixture(scope="module")
def model_path(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("monitor-model") / "model.keras"
    tiny_model.save(path)
    return path


@pytest.fixture(scope="module")
def reference_path(model_path, processed_dir, raw_dir, tmp_path_factory) -> Path:
    from tasks.stages.reference import build_reference_profile

    out = tmp_path_factory.mktemp("reference") / "reference_profile.parquet"
    return build_reference_profile(model_path, processed_dir, out, MonitorParams(), raw_dir=raw_dir)


@pytest.fixture(scope="module")
def bundle(reference_path, tiny_model):
    """The model in memory (the same weights as the saved file), with the profile's encoder."""
    from tasks.drift_profile import ReferenceProfile

    return ReferenceProfile.load(reference_path).bundle(tiny_model)


@pytest.fixture(scope="module")
def batches(tmp_path_factory) -> Path:
    """A folder for batches, holding ``same/``: a fresh synthetic sample of the same distribution."""
    from tasks.synth import synthesize_ham10000

    root = tmp_path_factory.mktemp("batches")
    synthesize_ham10000(root / "same", n_images=BATCH_IMAGES, seed=BATCH_SEED, width=96, height=72, workers=1)
    return root


def _monitor(reference_path, bundle, batch: Path, out_dir: Path, **kwargs) -> dict:
    from tasks.stages.monitor import monitor_batch

    kwargs.setdefault("track", False)
    kwargs.setdefault("retrain", None)
    result = monitor_batch(reference_path, bundle, batch, out_dir, MonitorParams(), **kwargs)
    summary = json.loads(Path(result.summary_path).read_text())
    assert summary["alarm"] == result.alarm and summary["drifted_columns"] == result.drifted_columns
    return summary


@pytest.fixture(scope="module")
def same_run(reference_path, bundle, batches, tmp_path_factory) -> tuple[dict, Path, str]:
    """The unshifted batch, monitored once: tracked in a module-local MLflow store, retraining on."""
    root = tmp_path_factory.mktemp("same")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)  # the local store keeps its artifacts under the working directory
        summary = _monitor(
            reference_path, bundle, batches / "same", root / "monitoring", track=True, retrain=trigger_retraining
        )
    return summary, root / "monitoring", uri


@pytest.fixture(scope="module")
def same_summary(same_run) -> dict:
    return same_run[0]


def _shifted_copy(batches: Path, name: str, *, metadata=None, image=None) -> Path:
    """A HAM10000-layout copy of ``same/`` with its metadata table and/or every image changed."""
    target = batches / name
    if target.exists():
        return target
    shutil.copytree(batches / "same", target)
    if metadata is not None:
        table = pd.read_csv(target / METADATA, dtype=str, keep_default_na=False)
        metadata(table).to_csv(target / METADATA, index=False)
    if image is not None:
        for path in sorted(target.rglob("*.jpg")):
            with Image.open(path) as original:
                shifted = image(original.convert("RGB"))
            shifted.save(path, "JPEG", quality=95)
    return target


def _older(table: pd.DataFrame) -> pd.DataFrame:
    ages = pd.to_numeric(table["age"], errors="coerce")
    table["age"] = [("" if np.isnan(a) else f"{min(a + 20, 85):g}") for a in ages]
    return table


def _head_and_neck(table: pd.DataFrame) -> pd.DataFrame:
    """Another clinic's mix: most lesions on the face, scalp, neck and ears (per lesion, not per image)."""
    rng = np.random.default_rng(3)
    lesions = sorted(table["lesion_id"].unique())
    moved = rng.choice(lesions, size=int(0.6 * len(lesions)), replace=False)
    new_site = dict(zip(moved, rng.choice(["face", "scalp", "neck", "ear"], size=len(moved)), strict=True))
    table["localization"] = [
        new_site.get(lesion, site) for lesion, site in zip(table["lesion_id"], table["localization"], strict=True)
    ]
    return table


def _red_cast(image: Image.Image) -> Image.Image:
    red, green, blue = image.split()
    return Image.merge("RGB", (red.point(lambda v: min(255, round(v * 1.2))), green, blue))


# shift -> (how the batch is changed, columns that must drift, groups the change leaves as they were)
SHIFTS = {
    "older": ({"metadata": _older}, ["age"], ["image", "embedding"]),
    "sites": ({"metadata": _head_and_neck}, ["localization"], ["image", "embedding"]),
    "brighter": ({"image": lambda im: ImageEnhance.Brightness(im).enhance(1.4)}, ["brightness"], ["clinical"]),
    "red_cast": ({"image": _red_cast}, ["mean_red"], ["clinical"]),
    "blurred": ({"image": lambda im: im.filter(ImageFilter.GaussianBlur(2))}, ["sharpness"], ["clinical"]),
}


@pytest.mark.slow
def test_reference_profile_describes_one_training_image_per_lesion(reference_path, processed_dir, tiny_model):
    from tasks.drift_profile import ReferenceProfile, model_fingerprint

    profile = ReferenceProfile.load(reference_path)
    table = profile.table
    cases = pd.read_csv(processed_dir / "cases.csv").set_index("image_id")
    train = cases[cases["split"] == "train"]
    assert set(table["image_id"]) <= set(train.index)
    assert len(table) == train["lesion_id"].nunique(), "every training lesion, once (fewer than reference_size)"
    assert cases.loc[table["image_id"], "lesion_id"].is_unique
    assert profile.groups["embedding"] == [f"embedding_pc{i}" for i in range(1, 6)]
    assert profile.groups["image"][-2:] == ["image_width", "image_height"], "sizes from raw_dir"
    assert (table["image_width"] == 96).all() and (table["image_height"] == 72).all()
    np.testing.assert_allclose(table[["p_low", "p_moderate", "p_high"]].sum(axis=1), 1.0, rtol=1e-5)
    assert set(table["predicted_level"]) <= {"low", "moderate", "high"}
    np.testing.assert_allclose(table["age"].to_numpy(), cases.loc[table["image_id"], "age"].to_numpy())
    assert profile.pca.components.shape == (5, 1280)
    assert profile.meta["model_fingerprint"] == model_fingerprint(tiny_model), "saving keeps the weights"
    assert profile.image_size == 32 and profile.encoder.missing_policy == "drop"


@pytest.mark.slow
def test_same_distribution_raises_no_alarm_and_is_logged(same_run):
    from mlflow.tracking import MlflowClient

    from tasks.stages.monitor import MONITORING_EXPERIMENT

    summary, out, mlflow_store = same_run
    assert not summary["alarm"], summary["reason"]
    assert summary["drifted_share"] < MonitorParams().drift_share
    assert not summary["groups"]["clinical"]["drifted_columns"], "same population: no clinical drift"
    assert summary["retraining"]["message"] == "no alarm: retraining not requested"
    assert summary["n_images"] == BATCH_IMAGES and summary["n_tested"] < BATCH_IMAGES, "one image per lesion"
    assert set(summary["groups"]) == {"clinical", "image", "embedding", "prediction"}
    assert summary["columns"]["age"]["stattest"] == "ks" and summary["columns"]["sex"]["stattest"] == "chi2_homogeneity"
    assert summary["n_columns"] == 3 + 8 + 5 + 4

    report = json.loads((out / "drift_report.json").read_text())
    assert any(m["config"].get("column") == "brightness" for m in report["metrics"])
    (count,) = [m["value"] for m in report["metrics"] if m["config"]["type"].endswith("DriftedColumnsCount")]
    assert count["count"] == summary["n_drifted"] and count["share"] == pytest.approx(summary["drifted_share"])
    assert (out / "drift_report.html").read_text().lstrip().lower().startswith("<!doctype html>")

    client = MlflowClient(mlflow_store)
    run = client.get_run(summary["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == MONITORING_EXPERIMENT
    assert run.info.status == "FINISHED"
    assert run.data.metrics["drifted_share"] == pytest.approx(summary["drifted_share"])
    assert run.data.metrics["n_drifted"] == summary["n_drifted"]
    assert "drifted_share_by_group.clinical" in run.data.metrics and "drift_score.age" in run.data.metrics
    assert run.data.tags["alarm"] == "false" and run.data.tags["retraining"] == "not triggered"
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "drift")}
    assert artifacts == {f"drift/{name}" for name in ("drift_summary.json", "drift_report.json", "drift_report.html")}


@pytest.fixture(scope="module")
def shifted_summary(reference_path, bundle, batches, tmp_path_factory):
    """Monitor a shifted batch once per module (retraining on: no Prefect API, so never triggered)."""
    done: dict[str, dict] = {}

    def summary_of(shift: str) -> dict:
        if shift not in done:
            batch = _shifted_copy(batches, shift, **SHIFTS[shift][0])
            done[shift] = _monitor(
                reference_path, bundle, batch, tmp_path_factory.mktemp(shift), retrain=trigger_retraining
            )
        return done[shift]

    return summary_of


@pytest.mark.slow
@pytest.mark.parametrize("shift", list(SHIFTS))
def test_a_shift_drifts_its_own_columns(shift, shifted_summary, same_summary):
    _, expected, untouched_groups = SHIFTS[shift]
    summary = shifted_summary(shift)
    for column in expected:
        shifted, unshifted = summary["columns"][column], same_summary["columns"][column]
        assert shifted["drifted"], f"{shift}: {column} {shifted}"
        # Far beyond the sampling noise of the unshifted batch (whose p-value may itself be small:
        # the session's reference sample is a little darker than most synthetic samples).
        assert shifted["score"] < 1e-3 * unshifted["score"], f"{shift}: {column} {shifted} vs {unshifted}"
    untouched = [c for c, info in same_summary["columns"].items() if info["group"] in untouched_groups]
    assert untouched
    for column in untouched:
        assert summary["columns"][column] == same_summary["columns"][column], f"{shift} left {column} as it was"


@pytest.mark.slow
def test_an_alarm_without_a_deployment_is_recorded_not_raised(shifted_summary):
    summary = shifted_summary("brighter")
    assert summary["alarm"], summary["reason"]
    assert summary["reason"].startswith(f"{summary['n_drifted']} of {summary['n_columns']} monitored columns drifted")
    assert "brightness" in summary["reason"]
    retraining = summary["retraining"]
    assert retraining["requested"] and not retraining["triggered"] and retraining["deployment"] == DEPLOYMENT
    assert retraining["message"].startswith("no deployment")


def test_a_cases_csv_batch_reads_like_a_folder(batches, tmp_path):
    from tasks.stages.monitor import read_batch

    source = batches / "same"
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(source.rglob("*.jpg")):
        shutil.copy(path, images / path.name)
    metadata = pd.read_csv(source / METADATA, dtype=str, keep_default_na=False).sample(frac=1, random_state=0)
    cases = metadata.assign(image=[f"{i}.jpg" for i in metadata["image_id"]])
    csv = tmp_path / "cases.csv"
    cases[["image", "lesion_id", "age", "sex", "localization"]].to_csv(csv, index=False)

    from_csv = read_batch(csv, tmp_path / "scratch-csv", images_dir=images)
    from_folder = read_batch(source, tmp_path / "scratch-folder")
    assert from_csv.kind == "cases_csv" and from_folder.kind == "ham10000"
    columns = ["image_id", "lesion_id", "age", "sex", "localization"]
    by_id = from_folder.frame.set_index("image_id")
    pd.testing.assert_frame_equal(from_csv.frame[columns], by_id.loc[from_csv.frame["image_id"]].reset_index()[columns])
    folder_paths = dict(zip(from_folder.frame["image_id"], from_folder.paths, strict=True))
    for image_id, path in zip(from_csv.frame["image_id"], from_csv.paths, strict=True):
        assert path.read_bytes() == folder_paths[image_id].read_bytes()

    cases[["image", "age", "sex", "localization"]].to_csv(csv, index=False)  # no lesion ids: every row a case
    assert (read_batch(csv, tmp_path / "scratch", images_dir=images).frame["lesion_id"] == "").all()


@pytest.mark.slow
def test_quick_verdicts_agree_with_the_evidently_report(reference_path, bundle, batches, same_summary, tmp_path):
    """benchmarks/monitor_sensitivity.py uses column_drift: it must give the report's verdicts."""
    from tasks.drift_profile import ReferenceProfile, one_per_lesion, original_sizes
    from tasks.images import decode_images
    from tasks.stages.monitor import column_drift, profile_batch, read_batch

    profile = ReferenceProfile.load(reference_path)
    cases = read_batch(batches / "same", tmp_path)
    frame = cases.frame.loc[cases.frame["age"].notna()]
    frame = frame.iloc[one_per_lesion(frame["lesion_id"], MonitorParams().seed)]
    paths = [cases.paths[i] for i in frame.index]
    frame = frame.reset_index(drop=True)
    current = profile_batch(profile, bundle, frame, decode_images(paths, 32, workers=1), original_sizes(paths))
    quick = column_drift(profile.table, current, profile.groups, MonitorParams())
    assert quick.drifted_columns == same_summary["drifted_columns"]
    assert quick.alarm == same_summary["alarm"], "the benchmark path applies Evidently's dataset rule"
    for name, column in same_summary["columns"].items():
        assert quick.columns[name].score == pytest.approx(column["score"], rel=1e-6, abs=1e-12), name


@pytest.mark.slow
def test_a_reference_of_another_model_is_refused(reference_path, bundle, batches, tmp_path):
    import keras

    from tasks.scored_model import Bundle
    from tasks.stages.monitor import monitor_batch

    other = Bundle(keras.models.clone_model(bundle.model), bundle.encoder, bundle.summary, None)
    with pytest.raises(SkinriskError, match="built with another model"):
        monitor_batch(reference_path, other, batches / "same", tmp_path, MonitorParams(), track=False)
    assert not (tmp_path / "drift_summary.json").exists()


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
@pytest.mark.integration  # a temporary Prefect server on loopback, as tests/integration
def test_the_flow_publishes_the_drift_and_finds_no_deployment(
    prefect_api, reference_path, model_path, batches, tmp_path, mlflow_store
):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.monitoring import monitoring_flow
    from tasks.params import load_params

    params_file = tmp_path / "params.yaml"
    shutil.copy(PROJECT_ROOT / "params.yaml", params_file)
    result = monitoring_flow(
        batch=str(batches / "same"),
        reference=str(reference_path),
        model=str(model_path),
        out_dir=str(tmp_path / "monitoring"),
        params_file=str(params_file),
        overrides=["monitor.drift_share=0.01"],  # any drifted column raises the alarm
        workspace=str(tmp_path / "evidently"),
    )
    assert result["alarm"] and result["drifted_columns"]
    assert result["evidently"]["workspace"] == str(tmp_path / "evidently") and result["evidently"]["snapshot_id"]
    message = result["retraining"]["message"]
    assert not result["retraining"]["triggered"]
    deployment = load_params(params_file).monitor.retrain_deployment
    assert message.startswith(f"no deployment named '{deployment}' is deployed on the Prefect API"), message
    run = MlflowClient(mlflow_store).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["retraining"] == "not triggered"
    assert run.data.tags["retraining_message"] == message

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    markdown = {a.key: a for a in artifact}["skinrisk-drift"]
    assert "**ALARM**" in str(markdown.data) and "no deployment named" in str(markdown.data)
    assert "skinrisk-drift-columns" in {a.key for a in artifact}


def test_a_batch_that_does_not_exist_opens_no_monitoring_run(reference_path, bundle, mlflow_store, tmp_path):
    from tasks import tracking
    from tasks.stages.monitor import monitor_batch

    with pytest.raises(DataError, match="not found"):
        monitor_batch(reference_path, bundle, tmp_path / "no-such-batch", tmp_path / "out", MonitorParams())
    store = tracking.client()  # this test's store (mlflow's global URI may be an earlier test's)
    assert not store.search_runs([e.experiment_id for e in store.search_experiments()])


# --- the report's reading order and the history (Evidently workspace) ------------------------

SMALL_GROUPS = {
    "clinical": ["age", "sex"],
    "image": ["brightness"],
    "embedding": ["embedding_pc1"],
    "prediction": ["p_high"],
}
PANELS = [
    "Share of drifted columns",
    "Drifted columns",
    "Drift of age",
    "Drift of image brightness",
    "Drift of image embedding, 1st principal component",
    "Drift of predicted P(high)",
]


@pytest.fixture(scope="module")
def small_drift():
    """An Evidently report on small synthetic tables: age and brightness shifted, the rest not."""
    from tasks.stages.monitor import RunLabel, detect_drift

    rng = np.random.default_rng(0)

    def table(n: int, older: float = 0.0, brighter: float = 0.0) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "age": rng.normal(50 + older, 12, n),
                "sex": rng.choice(["male", "female"], n),
                "brightness": rng.normal(120 + brighter, 15, n),
                "embedding_pc1": rng.normal(0, 1, n),
                "p_high": rng.beta(2, 5, n),
            }
        )

    label = RunLabel("clinic-a", "skinrisk v3", datetime(2025, 6, 1, 6, 0, tzinfo=UTC))
    drift = detect_drift(table(400), table(200, older=6, brighter=12), SMALL_GROUPS, MonitorParams(), title=label.title)
    assert set(drift.drifted_columns) == {"age", "brightness"}, drift.columns
    return drift, label


@pytest.mark.parametrize(("drift_share", "alarm"), [(0.4, True), (0.41, False)])
def test_the_alarm_is_evidently_s_dataset_drift_verdict(small_drift, drift_share, alarm):
    """Two of the five columns drifted: Evidently's share-of-drifted-columns test raises the alarm
    from a drift_share of 0.4 (2/5) on, and not above it."""
    from tasks.stages.monitor import detect_drift

    drift, _ = small_drift
    rng = np.random.default_rng(1)
    reference = pd.DataFrame({name: rng.normal(0, 1, 300) for name in ("a", "b", "c", "d", "e")})
    current = reference.sample(200, random_state=1).reset_index(drop=True)
    current[["a", "b"]] += 3
    groups = {"clinical": ["a", "b", "c", "d", "e"]}
    result = detect_drift(reference, current, groups, MonitorParams(drift_share=drift_share))
    assert result.drifted_columns == ["a", "b"] and result.dataset_drift is alarm and result.alarm is alarm
    assert drift.dataset_drift is not None


def _drifted_first(drift) -> list[str]:
    return sorted(drift.columns, key=lambda name: (not drift.columns[name].drifted, drift.columns[name].score))


def _table_order(widgets) -> list[str]:
    (table,) = [w for w in widgets if w.type == "big_table"]
    return [row["column_name"] for row in table.params["data"]]


def test_the_report_is_titled_and_lists_drifted_columns_first(small_drift):
    from tasks.stages.monitor import titled_html

    drift, label = small_drift
    assert label.title == "Drift of batch clinic-a · model skinrisk v3 · 2025-06-01 06:00 UTC"
    page = titled_html(drift.snapshot, label.title)
    assert f"<title>{html.escape(label.title)}</title>" in page.split("</head>")[0]
    widgets = drift.snapshot.to_snapshot_model().widgets
    assert widgets[0].params["counters"][0]["label"] == label.title, "the title heads the report"

    expected = _drifted_first(drift)
    assert expected[:2] == sorted(["age", "brightness"], key=lambda n: drift.columns[n].score)
    evidently_order = sorted(drift.columns, key=lambda n: drift.columns[n].score, reverse=True)
    assert expected != evidently_order, "Evidently's own order (highest score first) lists p-values backwards"
    assert _table_order(widgets) == expected
    in_page = list(dict.fromkeys(re.findall(r'"column_name":\s*"([^"]+)"', page)))
    assert in_page == expected, "the saved page lists drifted columns first"


def _dashboard_series(workspace: Path, project_id, panel) -> list[list]:
    """What `evidently ui` plots for ``panel``: its storage's series, one value per snapshot."""
    from evidently.ui.service.base import SeriesFilter
    from evidently.ui.service.storage.local.base import InMemoryDataStorage

    storage = InMemoryDataStorage(str(workspace))
    filters = [
        SeriesFilter(tags=v.tags, metadata=v.metadata, metric=v.metric, metric_labels=v.metric_labels)
        for v in panel.values
    ]
    response = asyncio.run(storage.get_data_series(project_id, filters, None, None))
    return [series.values for series in response.series]


def test_each_run_is_a_tagged_snapshot_of_one_project_with_a_drift_dashboard(small_drift, tmp_path):
    from evidently.sdk.panels import text_panel
    from evidently.ui.workspace import Workspace

    from tasks.stages.monitor import EVIDENTLY_PROJECT, RunLabel, add_to_workspace

    drift, label = small_drift
    workspace = tmp_path / "evidently"
    later = RunLabel("clinic-b", "model.keras, weights 0123456789ab", label.created_at + timedelta(days=1))
    added = [
        add_to_workspace(
            workspace, drift.snapshot, run, alarm=alarm, metadata={"batch": run.batch}, params=MonitorParams()
        )
        for run, alarm in ((label, False), (later, True))
    ]

    store = Workspace(str(workspace))
    (project,) = store.list_projects()
    assert project.name == EVIDENTLY_PROJECT and added[0]["project_id"] == added[1]["project_id"] == str(project.id)
    assert {str(i) for i in store.list_runs(project.id)} == {a["snapshot_id"] for a in added}
    first, second = (store.get_run(project.id, a["snapshot_id"]) for a in added)
    assert first.tags == ["batch:clinic-a", "model:skinrisk v3", "date:2025-06-01", "no-alarm"]
    assert second.tags == ["batch:clinic-b", "model:model.keras, weights 0123456789ab", "date:2025-06-02", "alarm"]
    assert second.metadata == {"batch": "clinic-b"} and second.name == later.title
    assert first.timestamp == datetime(2025, 6, 1, 6, 0) and second.timestamp == datetime(2025, 6, 2, 6, 0)
    assert _table_order(second.widgets) == _drifted_first(drift), "the snapshot keeps the drifted-first order"

    dashboard = store.get_dashboard(project.id)
    assert [tab.title for tab in dashboard.tabs] == ["Drift over time"]
    assert [panel.title for panel in dashboard.panels] == PANELS
    assert dashboard.tabs[0].panels == [panel.id for panel in dashboard.panels], "each panel once"
    for panel in dashboard.panels:
        (values,) = _dashboard_series(workspace, project.id, panel)
        assert len(values) == 2 and None not in values, panel.title
    share = _dashboard_series(workspace, project.id, dashboard.panels[0])[0]
    assert share == pytest.approx([drift.drifted_share] * 2)
    age = _dashboard_series(workspace, project.id, dashboard.panels[2])[0]
    assert age == pytest.approx([drift.columns["age"].score] * 2)

    # A tab of a user's own survives, and ours is not duplicated by later runs.
    project.dashboard.add_panel(text_panel(title="Notes"), tab="Mine")
    add_to_workspace(workspace, drift.snapshot, later, alarm=True, metadata={}, params=MonitorParams())
    dashboard = store.get_dashboard(project.id)
    assert [tab.title for tab in dashboard.tabs] == ["Drift over time", "Mine"]
    assert [panel.title for panel in dashboard.panels] == [*PANELS, "Notes"]
    assert len(store.list_runs(project.id)) == 3


def test_a_model_version_names_the_registered_version_or_the_weights():
    from tasks.stages.monitor import model_version

    fingerprint = "0123456789abcdef" * 4
    assert model_version("models:/skinrisk/7", fingerprint) == "skinrisk v7"
    assert model_version("models/model.keras", fingerprint) == "model.keras, weights 0123456789ab"
    assert model_version("runs:/abc/model", fingerprint) == "runs:/abc/model, weights 0123456789ab"


@pytest.fixture(scope="module")
def recorded_workspace(reference_path, bundle, batches, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Two monitoring runs (the unshifted batch, then a brighter one) recorded in one workspace."""
    root = tmp_path_factory.mktemp("history")
    workspace = root / "evidently"
    summaries = []
    for name in ("same", "brighter"):
        batch = _shifted_copy(batches, name, **SHIFTS[name][0]) if name in SHIFTS else batches / name
        summaries.append(_monitor(reference_path, bundle, batch, root / name, workspace=workspace))
    return workspace, summaries


@pytest.mark.slow
def test_monitoring_runs_build_a_history_in_the_workspace(recorded_workspace):
    from evidently.ui.workspace import Workspace

    workspace, summaries = recorded_workspace
    store = Workspace(str(workspace))
    (project,) = store.list_projects()
    assert {str(i) for i in store.list_runs(project.id)} == {s["evidently"]["snapshot_id"] for s in summaries}
    for summary in summaries:
        run = store.get_run(project.id, summary["evidently"]["snapshot_id"])
        batch = Path(summary["batch"]).name
        date = summary["created_at"][:10]
        assert run.tags == [
            f"batch:{batch}",
            f"model:{summary['model_version']}",
            f"date:{date}",
            "alarm" if summary["alarm"] else "no-alarm",
        ]
        assert run.metadata["batch"] == batch and run.metadata["model_fingerprint"] == summary["model_fingerprint"]
        assert run.metadata["alarm"] == ("yes" if summary["alarm"] else "no") and run.metadata["date"] == date
        assert run.name == summary["title"] and batch in summary["title"] and date in summary["title"]
        drifted = [name for name in _table_order(run.widgets) if summary["columns"][name]["drifted"]]
        assert (
            _table_order(run.widgets)[: len(drifted)]
            == drifted
            == sorted(summary["drifted_columns"], key=lambda n: summary["columns"][n]["score"])
        )
    assert [s["alarm"] for s in summaries] == [False, True]
    assert summaries[0]["model_version"].startswith("weights "), "an in-memory model is named by its weights"
    page = (workspace.parent / "brighter" / "drift_report.html").read_text(encoding="utf-8")
    assert f"<title>{html.escape(summaries[1]['title'])}</title>" in page


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get_json(url: str, payload: dict | None = None):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
@pytest.mark.integration  # `evidently ui` on loopback
def test_evidently_ui_lists_the_project_its_snapshots_and_dashboard(recorded_workspace, tmp_path):
    workspace, summaries = recorded_workspace
    port = _free_port()
    base = f"http://127.0.0.1:{port}/api"
    log = (tmp_path / "ui.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "evidently"),
            "ui",
            "--workspace",
            str(workspace),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                projects = _get_json(f"{base}/projects")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"evidently ui did not start: {(tmp_path / 'ui.log').read_text()[-2000:]}")
                time.sleep(1)
        (project,) = projects
        assert project["name"] == "skinrisk"
        snapshots = _get_json(f"{base}/projects/{project['id']}/snapshots")
        assert {s["id"] for s in snapshots} == {s["evidently"]["snapshot_id"] for s in summaries}
        assert sorted(s["metadata"]["alarm"] for s in snapshots) == ["no", "yes"]
        dashboard = _get_json(f"{base}/v2/dashboards/{project['id']}")
        assert [panel["title"] for panel in dashboard["panels"]] == PANELS
        share_panel = dashboard["panels"][0]
        series = _get_json(
            f"{base}/v2/snapshots/{project['id']}/data_series_batch",
            {
                "series_filter": [
                    {
                        "tags": [],
                        "metadata": {},
                        **{k: v for k, v in share_panel["values"][0].items() if k in ("metric", "metric_labels")},
                    }
                ]
            },
        )
        (line,) = series["series"]
        assert line["values"] == pytest.approx([s["drifted_share"] for s in summaries])
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
        log.close()

"""Drift monitoring: the reference profile, per-column drift of shifted batches, the alarm and retraining.

The reference is built from the session's synthetic training split with a tiny untrained model.
Batches are a second synthetic sample (another seed, same distribution) and shifted copies of it,
each written as a HAM10000 folder. Every shift test checks the shifted column drifts *and* that the
group it did not touch scores exactly as in the unshifted batch, so drift is attributed to its cause.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance, ImageFilter

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
    from tasks.monitor import image_statistics

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
    from tasks.monitor import _chi2_homogeneity

    rng = np.random.default_rng(0)
    reference = pd.Series(rng.choice(["back", "trunk", "face"], 400, p=[0.5, 0.4, 0.1]))
    same = pd.Series([*rng.choice(["back", "trunk", "face"], 199, p=[0.5, 0.4, 0.1]), "acral"])
    other = pd.Series(rng.choice(["back", "trunk", "face"], 200, p=[0.2, 0.3, 0.5]))
    assert not _chi2_homogeneity(reference, same, None, 0.05)[1], "one case of an unseen site is not drift"
    p_value, drifted = _chi2_homogeneity(reference, other, None, 0.05)
    assert drifted and p_value < 1e-6
    assert _chi2_homogeneity(pd.Series(["low"] * 50), pd.Series(["low"] * 20), None, 0.05) == (1.0, False)


def test_one_image_per_lesion_keeps_cases_without_a_lesion_id():
    from tasks.monitor import one_per_lesion

    ids = ["L1", "L1", "L2", "", "L3", "L3", "L3", ""]
    rows = one_per_lesion(ids, seed=0)
    kept = [ids[i] for i in rows]
    assert sorted(k for k in kept if k) == ["L1", "L2", "L3"]
    assert {3, 7} <= set(rows) and list(rows) == sorted(rows)


def test_a_cases_csv_is_checked_with_line_numbers(tmp_path):
    from tasks.monitor import read_batch

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
    from tasks.monitor import trigger_retraining

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
    from tasks.monitor import build_reference_profile

    out = tmp_path_factory.mktemp("reference") / "reference_profile.parquet"
    return build_reference_profile(model_path, processed_dir, out, MonitorParams(), raw_dir=raw_dir)


@pytest.fixture(scope="module")
def bundle(reference_path, tiny_model):
    """The model in memory (the same weights as the saved file), with the profile's encoder."""
    from tasks.monitor import ReferenceProfile

    return ReferenceProfile.load(reference_path).bundle(tiny_model)


@pytest.fixture(scope="module")
def batches(tmp_path_factory) -> Path:
    """A folder for batches, holding ``same/``: a fresh synthetic sample of the same distribution."""
    from tasks.synth import synthesize_ham10000

    root = tmp_path_factory.mktemp("batches")
    synthesize_ham10000(root / "same", n_images=BATCH_IMAGES, seed=BATCH_SEED, width=96, height=72, workers=1)
    return root


def _monitor(reference_path, bundle, batch: Path, out_dir: Path, **kwargs) -> dict:
    from tasks.monitor import monitor_batch

    kwargs.setdefault("track", False)
    kwargs.setdefault("retrain", False)
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
        summary = _monitor(reference_path, bundle, batches / "same", root / "monitoring", track=True, retrain=True)
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
    from tasks.monitor import ReferenceProfile, model_fingerprint

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

    from tasks.monitor import MONITORING_EXPERIMENT

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
            done[shift] = _monitor(reference_path, bundle, batch, tmp_path_factory.mktemp(shift), retrain=True)
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
    from tasks.monitor import read_batch

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
    from tasks.monitor import ReferenceProfile, column_drift, one_per_lesion, original_sizes, profile_batch, read_batch
    from tasks.preprocess import decode_images

    profile = ReferenceProfile.load(reference_path)
    cases = read_batch(batches / "same", tmp_path)
    frame = cases.frame.loc[cases.frame["age"].notna()]
    frame = frame.iloc[one_per_lesion(frame["lesion_id"], MonitorParams().seed)]
    paths = [cases.paths[i] for i in frame.index]
    frame = frame.reset_index(drop=True)
    current = profile_batch(profile, bundle, frame, decode_images(paths, 32, workers=1), original_sizes(paths))
    quick = column_drift(profile.table, current, profile.groups, MonitorParams())
    assert quick.drifted_columns == same_summary["drifted_columns"]
    for name, column in same_summary["columns"].items():
        assert quick.columns[name].score == pytest.approx(column["score"], rel=1e-6, abs=1e-12), name


@pytest.mark.slow
def test_a_reference_of_another_model_is_refused(reference_path, bundle, batches, tmp_path):
    import keras

    from tasks.evaluate import Bundle
    from tasks.monitor import monitor_batch

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
    )
    assert result["alarm"] and result["drifted_columns"]
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
    from tasks.monitor import monitor_batch

    with pytest.raises(DataError, match="not found"):
        monitor_batch(reference_path, bundle, tmp_path / "no-such-batch", tmp_path / "out", MonitorParams())
    store = tracking.client()  # this test's store (mlflow's global URI may be an earlier test's)
    assert not store.search_runs([e.experiment_id for e in store.search_experiments()])

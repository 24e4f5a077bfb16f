"""Registering the serving model, and what the served model does with raw cases.

The network is a tiny randomly initialised MobileNetV2 at 32 x 32: what is tested is the
plumbing (MLflow store, registry aliases, preprocessing inside the pyfunc, input errors), not
accuracy. Tests that log and register a model take several seconds each and are marked slow;
the input-validation and target tests run the pyfunc class directly and are fast.
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModelContext
from PIL import Image

from tasks import tracking
from tasks.clinical import ClinicalEncoder, parse_age
from tasks.errors import SkinriskError
from tasks.images import load_image, normalize_for_mobilenet
from tasks.model import build_model, load_model
from tasks.params import TrainParams
from tasks.schema import DIAGNOSES, RISK_LEVELS, PreprocessSummary
from tasks.serving import (
    OUTPUT_COLUMNS,
    RiskModel,
    example_input,
    image_to_base64,
    risk_signature,
    score_cases,
)
from tasks.stages.register import Registration, load_registered, register_model

IMAGE_SIZE = 32
PARAMS = TrainParams(weights="none", alpha=0.35, image_units=8, clinical_units=4, fusion_units=8)
RISK_MAP = {"high": ["mel"], "moderate": ["bcc", "akiec"], "low": ["nv", "bkl", "df", "vasc"]}
SUMMARY = PreprocessSummary(
    image_size=IMAGE_SIZE, risk_map=RISK_MAP, counts={}, lesions={}, n_images=0, missing_clinical="impute"
)
DATA_VERSION = "sha256:0123456789abcdef"
PROBABILITIES = ["p_low", "p_moderate", "p_high"]


# ---------------------------------------------------------------------------------------------
# Inputs


def image_file(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (60, 45)) -> bytes:
    """A small noisy image file: distinct per seed, so distinct cases score differently."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def cases() -> pd.DataFrame:
    """Three valid raw cases: JPEG and PNG, known and unknown age, every sex."""
    return pd.DataFrame(
        {
            "image": [
                image_to_base64(image_file(1)),
                image_to_base64(image_file(2, "PNG", (40, 40))),
                image_to_base64(image_file(3, "JPEG", (90, 60))),
            ],
            "age": [45.0, np.nan, 80.0],
            "sex": ["male", "female", "unknown"],
            "localization": ["back", "face", "lower extremity"],
        }
    )


def direct_keras(model, encoder: ClinicalEncoder, frame: pd.DataFrame, normalize: bool = True) -> np.ndarray:
    """The network's output computed by hand, as training prepares its inputs."""
    images = np.stack([load_image(base64.b64decode(text), IMAGE_SIZE) for text in frame["image"]])
    pixels = normalize_for_mobilenet(images) if normalize else images.astype(np.float32)
    clinical = encoder.transform(
        pd.DataFrame(
            {
                "age": [parse_age(a) for a in frame["age"]],
                "sex": frame["sex"],
                "localization": frame["localization"],
            }
        )
    )
    return model.predict({"image": pixels, "clinical": clinical}, verbose=0)


def input_sensitive(model, seed: int = 0):
    """Re-draw the random weights at He scale, with small random biases.

    Keras' default (Glorot) initialisation shrinks activations through the untrained 32 x 32
    MobileNetV2 to ~1e-10, so every case would score exactly 1/3 each and no comparison of
    outputs could fail. Still random weights, now with outputs that depend on every input.
    """
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if len(shape) >= 2:  # conv and dense kernels; a depthwise kernel's fan-in is its window
            window = shape[:2] if "depthwise" in variable.path else shape[:-1]
            std = np.sqrt(2 / int(np.prod(window)))
            variable.assign(rng.normal(0, std, shape).astype("float32"))
        elif variable.path.endswith("bias"):
            variable.assign(rng.normal(0, 0.1, shape).astype("float32"))
    return model


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """A processed dir (encoder.json, preprocess.json), a risk and a dx model, operating points."""
    root = tmp_path_factory.mktemp("artifacts")
    processed = root / "processed"
    processed.mkdir()
    encoder = ClinicalEncoder(age_mean=50, age_std=15, age_fill=50, missing_policy="impute")
    encoder.save(processed / "encoder.json")
    (processed / "preprocess.json").write_text(json.dumps(SUMMARY.to_json()), encoding="utf-8")

    paths = {"processed": processed}
    for target, n_classes in (("risk", len(RISK_LEVELS)), ("dx", len(DIAGNOSES))):
        model = input_sensitive(build_model(IMAGE_SIZE, encoder.n_features, n_classes, PARAMS))
        paths[f"{target}_model"] = root / f"{target}_model.keras"
        model.save(paths[f"{target}_model"])
        paths[f"{target}_op"] = root / f"{target}_operating_point.json"
        paths[f"{target}_op"].write_text(
            json.dumps({"target": target, "threshold": 0.3, "target_recall": 0.9}),
            encoding="utf-8",
        )
    return paths


@pytest.fixture(scope="module")
def keras_model(artifacts):
    return load_model(artifacts["risk_model"])


@pytest.fixture(scope="module")
def encoder(artifacts) -> ClinicalEncoder:
    return ClinicalEncoder.load(artifacts["processed"] / "encoder.json")


def loaded_risk_model(artifacts, target: str = "risk", model: str | None = None) -> RiskModel:
    """The pyfunc class loaded from the artifact files, without MLflow's store."""
    risk_model = RiskModel()
    context = PythonModelContext(
        artifacts={
            "model": str(artifacts[f"{model or target}_model"]),
            "encoder": str(artifacts["processed"] / "encoder.json"),
            "preprocess": str(artifacts["processed"] / "preprocess.json"),
            "operating_point": str(artifacts[f"{target}_op"]),
        },
        model_config=None,
    )
    risk_model.load_context(context)
    return risk_model


@pytest.fixture(scope="module")
def risk_model(artifacts) -> RiskModel:
    return loaded_risk_model(artifacts)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store in tmp_path, its artifacts under tmp_path/mlartifacts."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    return tracking.client()


@pytest.fixture
def run_id(store) -> str:
    return tracking.start_run("train", {"train.target": "risk"}, {"data_version": DATA_VERSION})


def register(artifacts, run_id: str, target: str = "risk", **kwargs) -> Registration:
    return register_model(
        artifacts[f"{target}_model"],
        artifacts["processed"],
        artifacts[f"{target}_op"],
        run_id,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# Registration


@pytest.mark.slow
def test_register_logs_to_the_run_registers_aliases_and_tags(artifacts, store, run_id, tmp_path) -> None:
    out_file = tmp_path / "models" / "registered.json"
    metrics = {"balanced_accuracy": 0.6123456789012345, "high_risk_recall": 0.9, "ece": 0.05}

    registration = register(artifacts, run_id, metrics=metrics, out_file=out_file)

    assert registration == Registration(
        name="skinrisk",
        version="1",
        alias="challenger",
        model_uri="models:/skinrisk/1",
        run_id=run_id,
    )
    assert json.loads(out_file.read_text(encoding="utf-8")) == {
        "name": "skinrisk",
        "version": "1",
        "alias": "challenger",
        "model_uri": "models:/skinrisk/1",
        "run_id": run_id,
    }
    assert (tmp_path / "mlflow.db").is_file()
    assert any((tmp_path / "mlartifacts").rglob("MLmodel")), "artifacts went outside tmp_path"

    version = store.get_model_version_by_alias("skinrisk", "challenger")
    assert str(version.version) == "1"
    assert version.run_id == run_id
    assert version.tags["run_id"] == run_id
    assert version.tags["data_version"] == DATA_VERSION
    assert version.tags["balanced_accuracy"] == "0.6123", "figures in tags are rounded to 4 decimals"
    assert version.tags["high_risk_recall"] == "0.9000"
    assert version.tags["ece"] == "0.0500"
    assert version.tags["threshold"] == "0.3000"

    # Descriptions: what the model predicts from what, and each version's figures, run and data
    model = store.get_registered_model("skinrisk")
    assert "Not a medical device" in model.description and "`localization`" in model.description
    for text in ("3-level balanced accuracy: 0.6123", "threshold (chosen on validation): 0.3000", run_id, DATA_VERSION):
        assert text in version.description, (text, version.description)
    assert "run `train`" in version.description

    # The run is addressed by id: it is still running and no run is left active in this thread.
    assert store.get_run(run_id).info.status == "RUNNING"
    assert mlflow.active_run() is None

    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/skinrisk/1")).read_text()
    assert f"mlflow=={mlflow.__version__}" in requirements.splitlines()
    assert any(line.startswith(("tensorflow-cpu==", "tensorflow==")) for line in requirements.splitlines())


@pytest.mark.slow
def test_registering_again_adds_a_version_and_moves_the_alias(artifacts, store, run_id) -> None:
    first = register(artifacts, run_id)
    tracking.end_run(run_id)
    store.update_registered_model("skinrisk", description="edited in the UI")

    second = register(artifacts, run_id)
    assert store.get_registered_model("skinrisk").description == "edited in the UI", "an edited one is kept"
    assert run_id in store.get_model_version("skinrisk", "2").description

    assert (first.version, second.version) == ("1", "2")
    assert second.model_uri == "models:/skinrisk/2"
    assert str(store.get_model_version_by_alias("skinrisk", "challenger").version) == "2"
    assert store.get_run(run_id).info.status == "FINISHED"  # an ended run stays ended
    with pytest.raises(SkinriskError, match=r"champion.*challenger -> version 2"):
        load_registered("models:/skinrisk@champion")


def test_loading_a_missing_model_or_alias_is_a_skinrisk_error(store) -> None:
    with pytest.raises(SkinriskError, match=r"models:/skinrisk@challenger.*skinrisk register"):
        load_registered("models:/skinrisk@challenger")


def test_register_refuses_missing_inputs_and_unknown_runs(artifacts, store, tmp_path) -> None:
    missing = tmp_path / "operating_point.json"
    with pytest.raises(SkinriskError, match=r"operating_point\.json \(made by `skinrisk evaluate`"):
        register_model(artifacts["risk_model"], artifacts["processed"], missing, "0" * 32)
    with pytest.raises(SkinriskError, match=r"run '0{32}' is not in the MLflow store"):
        register(artifacts, "0" * 32)
    with pytest.raises(SkinriskError, match=r"metric 'per_class' is dict, not a number"):
        register(artifacts, "0" * 32, metrics={"per_class": {"low": 0.5}})


# ---------------------------------------------------------------------------------------------
# The served model: preprocessing identical to training


@pytest.mark.slow
def test_served_model_scores_raw_cases_like_the_network_on_training_inputs(
    artifacts, store, run_id, keras_model, encoder
) -> None:
    frame = cases()
    direct = direct_keras(keras_model, encoder, frame)
    # The comparison can tell preprocessing apart: un-normalized pixels give other outputs.
    assert not np.allclose(direct_keras(keras_model, encoder, frame, normalize=False), direct)
    assert not np.allclose(direct_keras(keras_model, encoder, frame.assign(age=20.0)), direct)
    register(artifacts, run_id)

    served = load_registered("models:/skinrisk@challenger").predict(frame)

    assert list(served.columns) == list(OUTPUT_COLUMNS)
    np.testing.assert_allclose(served[PROBABILITIES].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served[PROBABILITIES].to_numpy(), direct, atol=1e-5)
    assert list(served["risk_level"]) == [RISK_LEVELS[i] for i in direct.argmax(axis=1)]
    assert list(served["refer"]) == list(direct[:, 2] >= 0.3)


def test_refer_follows_the_operating_point_threshold(artifacts, keras_model, encoder) -> None:
    frame = cases()
    p_high = direct_keras(keras_model, encoder, frame)[:, 2]
    threshold = float(np.median(p_high))  # refers exactly the cases at or above the median

    scored = score_cases(keras_model, encoder, SUMMARY, {"target": "risk", "threshold": threshold}, frame)

    assert list(scored["refer"]) == list(p_high >= threshold)
    assert scored["refer"].sum() == 2
    assert scored["refer"].dtype == bool


def test_example_input_matches_the_signature_and_scores(risk_model) -> None:
    signature = risk_signature()
    example = example_input(IMAGE_SIZE)

    scored = risk_model.predict(None, example)

    assert list(example.columns) == signature.inputs.input_names()
    assert list(scored.columns) == signature.outputs.input_names()
    assert scored["risk_level"].iloc[0] in RISK_LEVELS
    assert not signature.inputs.input_dict()["age"].required


def test_a_missing_age_column_means_unknown_ages(risk_model) -> None:
    frame = cases().assign(age=np.nan)

    with_nulls = risk_model.predict(None, frame)
    without_column = risk_model.predict(None, frame.drop(columns="age"))

    pd.testing.assert_frame_equal(with_nulls, without_column)


def test_a_dx_model_returns_three_summed_risk_probabilities(artifacts, encoder) -> None:
    dx_model = loaded_risk_model(artifacts, target="dx")
    frame = cases()
    diagnosis_probs = direct_keras(dx_model.model, encoder, frame)
    assert diagnosis_probs.shape == (3, len(DIAGNOSES))

    scored = dx_model.predict(None, frame)

    column = {dx: i for i, dx in enumerate(DIAGNOSES)}
    expected = np.stack(
        [diagnosis_probs[:, [column[dx] for dx in RISK_MAP[level]]].sum(axis=1) for level in RISK_LEVELS],
        axis=1,
    )
    np.testing.assert_allclose(scored[PROBABILITIES].to_numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(scored[PROBABILITIES].sum(axis=1), 1.0, atol=1e-5)


def test_a_model_that_does_not_match_its_operating_point_is_refused(artifacts) -> None:
    with pytest.raises(SkinriskError, match=r"7 outputs but the operating point's target is 'risk'"):
        loaded_risk_model(artifacts, target="risk", model="dx")


# ---------------------------------------------------------------------------------------------
# Bad inputs: one MlflowException (HTTP 400) naming row and field


BAD_CELLS = {
    "bad base64": ("image", "not base64 at all!", r"not valid base64"),
    "undecodable image": (
        "image",
        base64.b64encode(b"these bytes are no image").decode(),
        r"not a readable JPEG or PNG image",
    ),
    "truncated image": (
        "image",
        base64.b64encode(image_file(7)[:40]).decode(),
        r"not a readable JPEG or PNG image",
    ),
    "unknown localization": (
        "localization",
        "elbow",
        r"unknown localization 'elbow'; accepted: \[.*'back'.*'upper extremity'\]",
    ),
    "unknown sex": ("sex", "M", r"unknown sex 'M'; accepted: \['male', 'female', 'unknown'\]"),
    "missing sex": ("sex", None, r"missing; accepted: \['male', 'female', 'unknown'\]"),
    "age out of range": ("age", 130.0, r"age 130 is outside 0-100 years"),
    "age not a number": ("age", "forty", r"age 'forty' is not a number"),
}


def invalid(frame: pd.DataFrame, field: str, value) -> pd.DataFrame:
    """Two valid rows with ``field`` of row 1 replaced."""
    frame = frame.iloc[:2].copy()
    frame[field] = frame[field].astype(object)
    frame.at[1, field] = value
    return frame


@pytest.mark.parametrize("case", BAD_CELLS.keys())
def test_a_bad_cell_is_reported_with_its_row_and_field(risk_model, case) -> None:
    field, value, reason = BAD_CELLS[case]

    with pytest.raises(MlflowException) as raised:
        risk_model.predict(None, invalid(cases(), field, value))

    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"  # the server's HTTP 400
    assert raised.value.get_http_status_code() == 400
    message = raised.value.message
    assert "1 problem(s)" in message
    assert f"row 1, field '{field}'" in message
    assert "row 0" not in message
    assert raised.match(reason)


@pytest.mark.parametrize("column", ["image", "sex", "localization"])
def test_a_missing_column_is_named(risk_model, column) -> None:
    with pytest.raises(MlflowException, match=rf"missing column\(s\) \['{column}'\]") as raised:
        risk_model.predict(None, cases().drop(columns=column))
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


def test_all_rows_are_checked_and_at_most_ten_problems_quoted(risk_model) -> None:
    frame = pd.concat([cases()] * 4, ignore_index=True)  # 12 rows
    frame["image"] = "%%%"
    frame.loc[11, "localization"] = "elbow"

    with pytest.raises(MlflowException) as raised:
        risk_model.predict(None, frame)

    message = raised.value.message
    assert "13 problem(s)" in message
    assert message.count("field 'image'") == 10
    assert "... and 3 more" in message


def test_an_unknown_age_is_refused_when_training_dropped_such_cases(keras_model) -> None:
    strict = ClinicalEncoder(age_mean=50, age_std=15, age_fill=50, missing_policy="drop")
    operating_point = {"target": "risk", "threshold": 0.3}

    with pytest.raises(MlflowException, match=r"row 1, field 'age': missing.*give the age"):
        score_cases(keras_model, strict, SUMMARY, operating_point, cases())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_the_scoring_server_answers_json_requests_and_400_for_bad_input(artifacts, store, run_id, monkeypatch) -> None:
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    register(artifacts, run_id)
    served = load_registered("models:/skinrisk@challenger")
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")  # init() sets it; restore
    http = TestClient(scoring_server.init(served))
    frame = cases()
    expected = served.predict(frame)
    rows = json.loads(frame.to_json(orient="split", index=False))  # NaN -> null
    rows["data"][0][1] = 45  # an integer age is accepted over JSON

    answer = http.post("/invocations", json={"dataframe_split": rows})

    assert answer.status_code == 200, answer.text
    predictions = pd.DataFrame(answer.json()["predictions"])
    np.testing.assert_allclose(predictions[PROBABILITIES].to_numpy(), expected[PROBABILITIES].to_numpy(), atol=1e-6)
    assert list(predictions["refer"]) == list(expected["refer"])

    records = frame.iloc[:2].replace({np.nan: None}).to_dict(orient="records")
    records[1]["localization"] = "elbow"
    answer = http.post("/invocations", json={"dataframe_records": records})
    assert answer.status_code == 400
    assert answer.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "row 1, field 'localization': unknown localization 'elbow'" in answer.json()["message"]

    # A non-numeric age or a missing column never reaches the model: the signature rejects it.
    records[1].update(localization="back", age="forty")
    answer = http.post("/invocations", json={"dataframe_records": records})
    assert answer.status_code == 400
    assert "column age" in answer.json()["message"]
    missing_sex = [{k: v for k, v in records[0].items() if k != "sex"}]
    answer = http.post("/invocations", json={"dataframe_records": missing_sex})
    assert answer.status_code == 400
    assert "missing inputs ['sex']" in answer.json()["message"]

    # `skinrisk serve`: the same server, its 400 answers without MLflow's quote of the request.
    from tasks.serving import scoring_app

    quiet = TestClient(scoring_app(served))
    image_start = records[0]["image"][:16]
    for bad, expected in (
        (dict(localization="elbow"), "row 1, field 'localization'"),
        (dict(age="forty"), "column age"),
    ):
        broken = [records[0], {**records[1], "localization": "back", "age": 50, **bad}]
        answer = quiet.post("/invocations", json={"dataframe_records": broken})
        assert answer.status_code == 400
        assert expected in answer.json()["message"] and image_start not in answer.text, answer.text
    assert quiet.post("/invocations", json={"dataframe_records": records[:1]}).status_code == 200

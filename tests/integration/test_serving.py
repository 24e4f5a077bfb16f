"""`mlflow models serve` on loopback answers the documented request, and refuses bad ones with 4xx."""

import base64
import os
import sys
from pathlib import Path

import pytest
import requests

from tasks.schema import raw_image_path
from tests.support import free_port, server_process

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
def served(trained, learnable, mlflow_store, tmp_path):
    from tasks.stages.register import register_model
    from tasks.tracking import client, start_run

    out, result, _ = trained
    run_id = start_run("serve-test", {}, {})
    version = register_model(
        Path(result.model_path), learnable / "processed", out / "models" / "operating_point.json", run_id
    )
    client().set_registered_model_alias("skinrisk", "champion", version.version)

    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        "models:/skinrisk@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    url = f"http://127.0.0.1:{port}"
    with server_process(command, env, f"{url}/ping", tmp_path / "serve.log"):
        yield url


def _request(url: str, record: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", json={"dataframe_records": [record]}, timeout=60)


def test_served_model_answers_the_documented_request_and_refuses_bad_ones(served, learnable):
    import pandas as pd

    case = pd.read_csv(learnable / "processed" / "cases.csv").iloc[0]
    image = base64.b64encode(raw_image_path(learnable / "raw", case["image_id"]).read_bytes()).decode()
    good = {"image": image, "age": 55.0, "sex": "female", "localization": "back"}

    answer = _request(served, good)
    assert answer.status_code == 200, answer.text
    prediction = answer.json()["predictions"][0]
    assert set(prediction) == {"p_low", "p_moderate", "p_high", "risk_level", "refer"}
    assert abs(prediction["p_low"] + prediction["p_moderate"] + prediction["p_high"] - 1) < 1e-4
    assert prediction["risk_level"] in ("low", "moderate", "high")

    for change, fragment in (
        ({"image": "not base64 !!"}, "base64"),
        ({"localization": "elbow"}, "elbow"),
        ({"age": 130.0}, "130"),
    ):
        answer = _request(served, {**good, **change})
        assert 400 <= answer.status_code < 500, (change, answer.status_code, answer.text)
        assert fragment in answer.text, answer.text

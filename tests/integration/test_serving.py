"""`mlflow models serve` on loopback answers the documented request, and refuses bad ones with 4xx."""

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tasks.schema import raw_image_path

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(trained, learnable, mlflow_store, tmp_path):
    from tasks.register import register_model
    from tasks.tracking import client, start_run

    out, result, _ = trained
    run_id = start_run("serve-test", {}, {})
    version = register_model(
        Path(result.model_path), learnable / "processed", out / "models" / "operating_point.json", run_id
    )
    client().set_registered_model_alias("skinrisk", "champion", version.version)

    port = _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [
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
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert server.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(1)
    else:
        pytest.fail("the scoring server did not come up:\n" + (tmp_path / "serve.log").read_text())
    yield url
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    log.close()


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

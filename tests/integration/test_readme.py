"""The README's commands, run as written after its first command (the main job), in a fresh folder.

Each block is taken from README.md itself (found by its first command), its placeholders filled
with test files (a placeholder the README no longer has fails the test), and run by bash. Blocks
that need what a test machine lacks (Docker, a PostgreSQL server set up by `make servers`, the
Dataverse download, the dvc experiment queue's full trainings) are covered elsewhere:
tests/integration/test_team_servers.py, tests/code/test_download.py, tests/integration/test_pipeline.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tasks import paths
from tests.support import PROJECT_ROOT, free_port, tiny_params_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BIN = Path(sys.executable).parent


def readme_block(first_command: str) -> str:
    """The ```bash block of README.md whose first line starts with ``first_command``."""
    text = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        if block.startswith(first_command):
            return block
    raise AssertionError(f"README.md has no bash block starting with {first_command!r}")


def filled(block: str, placeholders: dict[str, str]) -> str:
    for placeholder, value in placeholders.items():
        assert placeholder in block, f"the README block no longer has {placeholder!r}:\n{block}"
        block = block.replace(placeholder, value)
    return block


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A folder where the README's first command (`make run`: `skinrisk pipeline`) has run."""
    root = tmp_path_factory.mktemp("readme")
    params = tiny_params_file(root / "params.yaml")
    gates = {"min_high_risk_auc": 0.0, "min_high_risk_recall": 0.0, "max_ece": 1.0, "min_balanced_accuracy": 0.0}
    text = params.read_text()
    for key, value in gates.items():  # a tiny model on 160 images: the gates are not what is tested here
        text = re.sub(rf"(\n  {key}:) [^\n]*", rf"\1 {value}", text)
    params.write_text(text)
    env = _env(root)
    done = subprocess.run(
        [str(BIN / "skinrisk"), "pipeline"], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "promotion gates passed" in done.stdout + done.stderr, "the main job ends with a champion"
    return root


def _env(root: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "SKINRISK_LOCK_DIR": str(root / "locks")}
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):  # the defaults, as on a fresh machine
        env.pop(name, None)
    return env


def bash(block: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=cwd,
        env=_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _incoming(project: Path) -> tuple[Path, Path]:
    """New cases as a clinic would send them: a folder of photos and a cases CSV."""
    photos = project / "photos"
    photos.mkdir(exist_ok=True)
    cases = pd.read_csv(project / paths.PREFECT_PROCESSED_DIR / "cases.csv").query("split == 'test'").head(6)
    rows = []
    for image_id, age, sex, site in cases[["image_id", "age", "sex", "localization"]].itertuples(index=False):
        shutil.copy(project / "data" / "raw" / "images" / f"{image_id}.jpg", photos / f"{image_id}.jpg")
        rows.append({"image": f"{image_id}.jpg", "age": age, "sex": sex, "localization": site})
    pd.DataFrame(rows).to_csv(project / "new_cases.csv", index=False)
    return photos, project / "new_cases.csv"


def test_triage_as_written(project):
    photos, cases = _incoming(project)
    block = filled(readme_block("skinrisk triage"), {"new_cases.csv": cases.name, "photos/": f"{photos.name}/"})
    done = bash(block, project)
    assert done.returncode == 0, done.stderr
    queue = pd.read_csv(project / "queue.csv")
    assert len(queue) == 6 and {"rank", "p_high", "risk_level", "refer", "action"} <= set(queue.columns)


def test_explain_a_case_as_written(project):
    image = next((project / "data" / "raw" / "images").glob("*.jpg"))
    shutil.copy(image, project / "lesion.jpg")
    done = bash(readme_block("skinrisk explain --model"), project)
    assert done.returncode == 0, done.stderr
    assert (project / "case" / "explanation.json").exists()


def test_external_evaluation_as_written(project):
    block = filled(readme_block("skinrisk evaluate --model"), {"OTHER_CLINIC_DIR": "data/external/synthetic"})
    done = bash(block, project)
    assert done.returncode == 0, done.stderr
    assert (project / "external.json").exists()


def test_registry_commands_as_written(project):
    show, promote, rollback = readme_block("skinrisk registry show").strip().splitlines()
    assert bash(show, project).returncode == 0
    done = bash(promote, project)
    assert done.returncode == 0, done.stderr
    done = bash(rollback, project)  # one version only: nothing to roll back to, said in one line
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_serving_and_the_curl_call_as_written(project):
    serve, curl = readme_block("skinrisk serve").split("curl", 1)
    port = str(free_port())
    # the server in the foreground of its own shell here (the README starts it with `&`)
    serve, curl = serve.strip().removesuffix("&").replace("5001", port), "curl" + curl.replace("5001", port)
    image = next((project / "data" / "raw" / "images").glob("*.jpg"))
    shutil.copy(image, project / "lesion.jpg")
    server = subprocess.Popen(
        ["bash", "-c", serve],
        cwd=project,
        env=_env(project),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            probe = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/ping"], capture_output=True)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, "the scoring server never answered /ping"
            time.sleep(1)
        done = bash(curl, project, timeout=120)
        assert done.returncode == 0, done.stderr
        prediction = json.loads(done.stdout)["predictions"][0]
        assert set(prediction) == {"p_low", "p_moderate", "p_high", "risk_level", "refer"}
    finally:
        with contextlib.suppress(ProcessLookupError):  # a server that failed to start is gone already
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

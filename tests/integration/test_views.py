"""What a person sees in each view, opened in a real headless browser on loopback.

One tiny pipeline (the project's own ``dvc repro`` on the TINY params of tests/support.py, then one
``skinrisk monitor`` of a batch and ``dvc plots show``) produces every view's data once; each test
then opens one view as a person would: the MLflow UI (the run's page and the registered model), the
Great Expectations Data Docs, the Evidently UI and the DVC plots page. Pages get no network beyond
loopback (file pages none at all), so what renders here renders offline. Each test leaves a
screenshot per view in its tmp folder (``pytest --basetemp DIR`` keeps them somewhere findable).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from tests.support import PROJECT_ROOT, free_port, server_process, tiny_params_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BIN = Path(sys.executable).parent
# The test figures a person compares runs on (tasks/tracking.py EXPERIMENT_DESCRIPTION's headline)
HEADLINE = ("test_high_risk_roc_auc", "test_triage.high_risk_recall", "test_balanced_accuracy", "test_ece")
TIMEOUT_MS = 60_000  # a UI's first page load, with its bundle, on a busy 2-core machine


@dataclass(frozen=True)
class Pipeline:
    project: Path  # a copy of the project after `dvc repro` and one monitored batch
    tracking_uri: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Pipeline:
    """The project's stages run once at TINY size in a copy of the project (as test_pipeline.py's
    ``dvc repro`` test does), one batch monitored into the Evidently workspace, the plots page written."""
    project = tmp_path_factory.mktemp("views") / "project"
    project.mkdir()
    for name in ("dvc.yaml", "tasks", "gx"):
        source = PROJECT_ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, project / name)
    # the project's DVC config, with the offline plots template it names
    shutil.copytree(PROJECT_ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "*.local"))
    params = tiny_params_file(project / "params.yaml")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PYTHONPATH": str(PROJECT_ROOT),
        "MLFLOW_TRACKING_URI": uri,
    }

    def run(*command: str) -> None:
        done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    run("git", "init", "-q")
    run("skinrisk", "data", "synth", "--params", str(params), "--out", "synthetic")
    run("skinrisk", "data", "import", "synthetic", "--params", str(params))
    run(
        "dvc", "repro", "register"
    )  # every stage up to the registered challenger (the promotion gate shows nothing here)
    run("skinrisk", "monitor", "--batch", "synthetic", "--no-retrain")  # a snapshot in reports/evidently
    run("dvc", "plots", "show", "-o", "plots")
    return Pipeline(project, uri, env)


def _offline(page, *allowed: str) -> list[str]:
    """Abort every request but file pages and ``allowed`` URL prefixes; returns the console's errors."""
    page.route(
        "**/*",
        lambda route: (
            route.continue_()
            if route.request.url.startswith(("file:", *allowed))
            else route.abort("internetdisconnected")
        ),
    )
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


def _screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)


# --------------------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_ui(pipeline, tmp_path_factory) -> str:
    """`mlflow server` on the pipeline's SQLite store (artifacts where the runs put them)."""
    port = free_port()
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", pipeline.tracking_uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = tmp_path_factory.mktemp("mlflow-ui") / "server.log"
    with server_process(command, pipeline.env, f"http://127.0.0.1:{port}/health", log):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def registered(pipeline):
    """The challenger version the pipeline registered, and its run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=pipeline.tracking_uri, registry_uri=pipeline.tracking_uri)
    version = client.get_model_version_by_alias("skinrisk", "challenger")
    return version, client.get_run(version.run_id)


def test_mlflow_run_page_shows_the_test_figures(mlflow_ui, registered, pipeline, page, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    _, run = registered
    _offline(page, mlflow_ui)
    page.goto(f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}", timeout=TIMEOUT_MS)
    # the run's name says who ran it, on which data, and when
    short_version = run.data.tags["data_version"].split(":")[1][:8]
    assert re.fullmatch(rf"dvc-{short_version}-\d{{8}}-\d{{4}}", run.info.run_name), run.info.run_name
    page.get_by_role("heading", name=run.info.run_name).wait_for(timeout=TIMEOUT_MS)
    metrics = page.get_by_role("table").filter(has_text="test_high_risk_roc_auc")
    metrics.wait_for(timeout=TIMEOUT_MS)
    metrics.get_by_text(HEADLINE[0], exact=True).scroll_into_view_if_needed()
    _screenshot(page, tmp_path, "mlflow-run")
    for key in HEADLINE:
        row = metrics.get_by_role("row").filter(has=page.get_by_text(key, exact=True))
        assert row.count() == 1, f"{key} is not in the run page's metrics table"
        shown = row.inner_text().split()  # name, value, the logged model it belongs to
        assert shown[0] == key and float(shown[1]) == pytest.approx(run.data.metrics[key]), shown
    # the validation of the data this run trained on: its verdict among the tags, its Data Docs in the artifacts
    assert page.get_by_text("data_validation", exact=True).count() >= 1
    assert run.data.tags["data_validation"] == "passed"
    client = MlflowClient(tracking_uri=pipeline.tracking_uri)
    assert "data_docs/index.html" in {a.path for a in client.list_artifacts(run.info.run_id, "data_docs")}


def test_mlflow_registry_shows_the_registered_version(mlflow_ui, registered, page, tmp_path) -> None:
    version, run = registered
    _offline(page, mlflow_ui)
    page.goto(f"{mlflow_ui}/#/models/skinrisk", timeout=TIMEOUT_MS)
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version.version}"))
    row.wait_for(timeout=TIMEOUT_MS)
    _screenshot(page, tmp_path, "mlflow-model")
    assert "challenger" in row.inner_text() and run.info.run_id in row.inner_text(), row.inner_text()


# ------------------------------------------------------------------------- Great Expectations


# A success icon on the page is drawn in Font Awesome, and that font has loaded
# (polled: Playwright does not wait for a promise a polled function returns, so no `await` in it)
ICON_FONT_LOADED = """() => {
    const drawn = [...document.querySelectorAll("i.fa-check-circle")].filter(e => e.checkVisibility());
    return drawn.some(e => getComputedStyle(e, "::before").fontFamily.startsWith('"Font Awesome'))
        && [...document.fonts].some(f => f.family.includes("Font Awesome") && f.status === "loaded");
}"""


def test_data_docs_render_offline_with_each_checkpoint_and_its_success(pipeline, page, tmp_path) -> None:
    """GX's own index table (jQuery, bootstrap-table, Font Awesome shipped with the site, nothing from a
    CDN): one row per checkpoint with its success icon, each linking to its result page."""
    index = pipeline.project / "reports" / "gx" / "data_docs" / "local_site" / "index.html"
    errors = _offline(page)
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    page.goto(index.as_uri())
    rows = page.get_by_role("row").filter(has_text="skinrisk-validate")
    rows.first.wait_for(timeout=TIMEOUT_MS)
    # bootstrap-table may draw its rows again after the first paint (its filter extension does, later on a
    # busy machine), and a replaced icon has no style at all: wait until a drawn icon shows the shipped
    # Font Awesome glyph and its web font has loaded from the site (no network, so from static/vendor/)
    page.wait_for_function(ICON_FONT_LOADED, timeout=TIMEOUT_MS)
    _screenshot(page, tmp_path, "data-docs")
    assert rows.count() == 3, rows.all_inner_texts()
    assert page.locator("#skinrisk-static-index").is_hidden(), "the scripts ran, so GX's table stands"
    assert page.locator("i.fa-check-circle.text-success").count() == 3
    for checkpoint in ("raw_metadata", "raw_ages", "raw_images"):
        page.goto(index.as_uri())
        rows.filter(has_text=checkpoint).locator("td").nth(1).click()  # the run time: the row opens its result
        page.get_by_text(f"Expectation Suite: {checkpoint}").wait_for(timeout=TIMEOUT_MS)
        _screenshot(page, tmp_path, f"data-docs-{checkpoint}")
        assert page.get_by_text("Status: Succeeded").is_visible()
        unsuccessful = page.get_by_role("row").filter(has_text="Unsuccessful Expectations")
        assert unsuccessful.inner_text().split()[-1] == "0", unsuccessful.inner_text()
    assert not errors and not failed, (errors, failed)


# ------------------------------------------------------------------------------------ Evidently


@pytest.fixture(scope="module")
def evidently_ui(pipeline, tmp_path_factory) -> str:
    """`evidently ui` on the workspace the monitored batch went to."""
    port = free_port()
    workspace = pipeline.project / "reports" / "evidently"
    command = [str(BIN / "evidently"), "ui", "--workspace", str(workspace), "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path_factory.mktemp("evidently-ui") / "server.log"
    with server_process(command, pipeline.env, f"http://127.0.0.1:{port}/api/projects", log):
        yield f"http://127.0.0.1:{port}"


def test_evidently_project_shows_the_dashboard_and_the_snapshot(evidently_ui, page, tmp_path) -> None:
    import requests

    from tasks.stages.monitor import DASHBOARD_COLUMNS

    (project,) = requests.get(f"{evidently_ui}/api/projects", timeout=10).json()
    (snapshot,) = requests.get(f"{evidently_ui}/api/projects/{project['id']}/snapshots", timeout=10).json()
    _offline(page, evidently_ui)
    page.goto(f"{evidently_ui}/projects/{project['id']}", timeout=TIMEOUT_MS)
    titles = [
        "Share of drifted columns",
        "Drifted columns",
        *(f"Drift of {label}" for label in DASHBOARD_COLUMNS.values()),
    ]
    for title in titles:
        page.get_by_text(title, exact=True).wait_for(timeout=TIMEOUT_MS)
    page.wait_for_load_state("networkidle")
    _screenshot(page, tmp_path, "evidently-dashboard")
    # each panel plots the batch: one point at the snapshot's time (shown in the browser's time zone)
    when = datetime.fromisoformat(snapshot["metadata"]["created_at"]).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    assert page.get_by_text(when, exact=True).count() == len(titles), when

    page.get_by_role("tab", name="Reports").click()
    listed = page.get_by_role("row").filter(has_text=snapshot["id"])
    listed.wait_for(timeout=TIMEOUT_MS)
    _screenshot(page, tmp_path, "evidently-reports")
    assert "Drift of batch synthetic" in listed.inner_text() and "batch:synthetic" in listed.inner_text()


# ------------------------------------------------------------------------------------ DVC plots

# What a page shows in a canvas: how many distinct colours (a blank or failed plot has one or two).
_CANVAS_COLOURS = """canvas => {
    const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    const colours = new Set();
    for (let i = 0; i < pixels.length; i += 16) colours.add(pixels.slice(i, i + 4).join());
    return colours.size;
}"""


def test_dvc_plots_render_offline(pipeline, page, tmp_path) -> None:
    """`dvc plots show`'s page with no network at all: the Vega plots draw (Vega is inlined) and the
    image plots load."""
    errors = _offline(page)
    page.goto((pipeline.project / "plots" / "index.html").as_uri())
    plots = page.locator("div.vega-embed")
    expect_count = 2  # dvc.yaml: the confusion matrix (test) and the training curves
    page.wait_for_function(
        f"document.querySelectorAll('div.vega-embed canvas, div.vega-embed svg.marks').length >= {expect_count}"
    )
    _screenshot(page, tmp_path, "dvc-plots")
    assert plots.count() == expect_count
    for plot in plots.all():
        drawn = plot.locator("canvas, svg.marks").first
        assert drawn.bounding_box()["width"] > 200 and drawn.bounding_box()["height"] > 200
        if drawn.evaluate("node => node.tagName") == "CANVAS":
            assert drawn.evaluate(_CANVAS_COLOURS) > 10, "a blank plot"
    for image in page.locator("img").all():  # reports/confusion_matrix.png, reports/reliability.png
        assert image.evaluate("img => img.complete && img.naturalWidth") > 100, image.get_attribute("src")
    assert page.locator("img").count() == 2
    assert not errors, errors

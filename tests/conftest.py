"""Shared fixtures: a small synthetic HAM10000 sample, imported and preprocessed once per session.

Tests never need ../shared: they generate their data. Tests on the real sample are marked
``real_data`` and skip (visibly, with the reason) where it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from tests.support import REAL_SAMPLE


@pytest.fixture(scope="session")
def synthetic_source(tmp_path_factory) -> Path:
    """A synthetic sample in the Kaggle layout: 280 images, 96 x 72 pixels."""
    from tasks.synth import synthesize_ham10000

    out = tmp_path_factory.mktemp("synthetic") / "ham10000"
    synthesize_ham10000(out, n_images=280, seed=11, width=96, height=72)
    return out


@pytest.fixture(scope="session")
def raw_dir(synthetic_source, tmp_path_factory) -> Path:
    """The synthetic sample imported into the canonical raw layout (read-only by convention)."""
    from tasks.ingest import import_dataset

    raw = tmp_path_factory.mktemp("import") / "raw"
    import_dataset(synthetic_source, raw, progress=False)
    return raw


@pytest.fixture(scope="session")
def processed_dir(raw_dir, tmp_path_factory) -> Path:
    """The raw sample preprocessed at 32 x 32 pixels."""
    from tasks.params import PreprocessParams
    from tasks.stages.preprocess import preprocess

    out = tmp_path_factory.mktemp("processed") / "processed"
    preprocess(raw_dir, out, PreprocessParams(image_size=32, workers=1))
    return out


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store in tmp_path (cwd moves there so artifacts land there too)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture
def real_sample() -> Path:
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"real HAM10000 sample not found at {REAL_SAMPLE} (only on the team machines and CI)")
    return REAL_SAMPLE


@pytest.fixture(scope="session")
def learnable(tmp_path_factory) -> Path:
    """A larger synthetic sample (600 images) preprocessed at 48 x 48: enough test lesions for a
    meaningful comparison with the majority-class baseline. Returns the folder holding raw/ and
    processed/."""
    from tasks.ingest import import_dataset
    from tasks.params import PreprocessParams
    from tasks.stages.preprocess import preprocess
    from tasks.synth import synthesize_ham10000

    root = tmp_path_factory.mktemp("learnable")
    synthesize_ham10000(root / "source", n_images=600, seed=5, width=64, height=48)
    import_dataset(root / "source", root / "raw", progress=False)
    preprocess(root / "raw", root / "processed", PreprocessParams(image_size=48))
    return root


@pytest.fixture(scope="session")
def trained(learnable, tmp_path_factory):
    """A tiny model trained and evaluated on ``learnable``: (output folder, TrainResult, metrics)."""
    from tasks.params import EvaluateParams
    from tasks.stages.evaluate import evaluate
    from tasks.stages.train import train
    from tests.support import tiny_train_params

    out = tmp_path_factory.mktemp("trained")
    params = tiny_train_params(head_epochs=12, finetune_epochs=1, early_stopping_patience=5)
    result = train(learnable / "processed", out / "models", out / "reports", params)
    metrics = evaluate(
        Path(result.model_path),
        learnable / "processed",
        out / "reports",
        out / "models",
        EvaluateParams(bootstrap_resamples=200),
    )
    return out, result, metrics


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright; skips visibly where Debian's Chromium is absent
    (``apt-get install chromium``; ``.ci/run`` installs it).

    Module-scoped: Playwright's sync API keeps an event loop running in the main thread while it
    is open, and a later test that calls ``asyncio.run`` (Evidently's storage) fails under it."""
    from tests.support import chromium_executable

    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium on PATH: apt-get install chromium (or set SKINRISK_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser page (its own context: no cookies or storage shared between tests)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()

"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_SAMPLE = PROJECT_ROOT.parent / "shared" / "data" / "ham10000-200px"
IMAGENET_CACHE = PROJECT_ROOT.parent / "shared" / "weights" / "keras"


def tiny_train_params(**overrides):
    """A model small enough to train in seconds on two CPU cores."""
    from tasks.params import AugmentParams, TrainParams

    values = dict(
        weights="none",
        alpha=0.35,
        image_units=16,
        clinical_units=8,
        fusion_units=16,
        dropout=0.1,
        batch_size=32,
        head_epochs=3,
        finetune_epochs=1,
        learning_rate=3e-3,
        finetune_learning_rate=1e-3,
        augment=AugmentParams(rotation=0.05, zoom=0.05, brightness=0.05, contrast=0.05),
    )
    values.update(overrides)
    return TrainParams(**values)


# A pipeline small enough to run end to end in about a minute on two cores.
TINY = {
    "data": {"synthetic_images": 160, "synthetic_width": 96, "synthetic_height": 72},
    "validate": {"min_image_side": 16},
    "preprocess": {"image_size": 32, "workers": 1},
    "train": {
        "weights": "none",
        "alpha": 0.35,
        "image_units": 16,
        "clinical_units": 8,
        "fusion_units": 16,
        "head_epochs": 2,
        "finetune_epochs": 1,
        "learning_rate": 0.003,
    },
    "evaluate": {"bootstrap_resamples": 100},
}


def tiny_params_file(path: Path) -> Path:
    """The project's params.yaml with TINY applied, written to ``path``."""
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def free_port() -> int:
    """A TCP port free on loopback right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(command: list[str], env: dict, health_url: str, log_path: Path, timeout_s: float = 240):
    """Start ``command`` in its own session, wait until ``health_url`` answers 200, stop it on exit."""
    import os
    import signal
    import subprocess
    import time

    import pytest
    import requests

    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                assert server.poll() is None, f"{command[:4]} exited:\n{log_path.read_text()}"
                try:
                    if requests.get(health_url, timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{health_url} did not answer within {timeout_s:.0f} s:\n{log_path.read_text()}")
                time.sleep(1)
            yield server
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def chromium_executable() -> str | None:
    """Debian's Chromium (``apt-get install chromium``), which the browser tests drive through
    Playwright: Playwright's own browser download needs the internet. None where it is absent."""
    import os
    import shutil

    for candidate in (os.environ.get("SKINRISK_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None

"""`dvc plots show` renders offline: the page carries Vega itself instead of loading it from a CDN."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DVC = Path(sys.executable).with_name("dvc")


@pytest.fixture
def plots_page(tmp_path: Path) -> str:
    """The page `dvc plots show` writes for this project's DVC config and a small training history."""
    if not DVC.exists():
        pytest.skip(f"dvc not installed beside {sys.executable}")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    shutil.copytree(ROOT / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    (tmp_path / "training_history.csv").write_text("epoch,loss,val_loss\n1,1.0,0.9\n2,0.8,0.7\n3,0.6,0.65\n")
    subprocess.run(
        [str(DVC), "plots", "show", "training_history.csv", "-y", "loss", "-o", "plots"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    return (tmp_path / "plots" / "index.html").read_text(encoding="utf-8")


def test_dvc_plots_load_no_script_from_the_network(plots_page: str) -> None:
    remote = re.findall(r"<script[^>]+src=[\"']https?://[^\"']+", plots_page)
    assert not remote, f"the plots page loads {remote}: blank offline"
    assert "skinrisk: DVC plots" in plots_page, "not the project's template (.dvc/config plots.html_template)"
    for library in ("vega ", "vega-lite ", "vega-embed "):
        assert f"/* {library}" in plots_page, f"{library.strip()} is not inlined"
    assert "vegaEmbed(" in plots_page and '"val_loss"' in plots_page  # the plot itself is there


def test_dvc_s_default_page_would_need_the_network(tmp_path: Path) -> None:
    """The check above can fail: DVC's own page loads Vega from a CDN."""
    from dvc_render.vega import VegaRenderer

    assert re.search(r"<script src=\"https://", VegaRenderer.SCRIPTS)

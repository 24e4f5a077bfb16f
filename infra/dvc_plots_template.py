"""Build .dvc/plots/offline.html: DVC's plots page with Vega, Vega-Lite and Vega-Embed inlined.

`dvc plots show` loads those libraries from a CDN by default, so offline its Vega plots (the
confusion matrix, the training curves) are blank. `.dvc/config` points `plots.html_template` at
this page instead, which carries the libraries from their npm packages. Run it (with npm) to move
to other versions; the output is committed, so users need neither npm nor a network.

    python infra/dvc_plots_template.py [--vega 5.33.1 --vega-lite 5.23.0 --vega-embed 6.29.0]
"""

from __future__ import annotations

import argparse
import subprocess
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / ".dvc" / "plots" / "offline.html"
# DVC's own page uses vega 5, vega-lite 5 and vega-embed 6 (dvc_render.vega.VegaRenderer.SCRIPTS).
DEFAULTS = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>skinrisk: DVC plots</title>
    <!-- Offline: {versions} from their npm packages, inlined (DVC's own page loads them from a
         CDN). Built by infra/dvc_plots_template.py. -->
    {scripts}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    <h1>skinrisk: DVC plots</h1>
    {{plot_divs}}
</body>
</html>
"""


def minified_build(package: str, version: str, workdir: Path) -> str:
    """``build/<package>.min.js`` of ``package@version``, fetched with ``npm pack``."""
    name = (
        subprocess.run(
            ["npm", "pack", f"{package}@{version}", "--silent"], cwd=workdir, check=True, capture_output=True, text=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    with tarfile.open(workdir / name) as archive:
        member = archive.extractfile(f"package/build/{package}.min.js")
        assert member is not None, f"{package}@{version} has no build/{package}.min.js"
        return member.read().decode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for package, version in DEFAULTS.items():
        parser.add_argument(f"--{package}", default=version)
    args = parser.parse_args()
    versions = {package: getattr(args, package.replace("-", "_")) for package in DEFAULTS}
    with tempfile.TemporaryDirectory() as tmp:
        scripts = "\n".join(
            f"<script>/* {package} {version} (npm) */\n{minified_build(package, version, Path(tmp))}\n</script>"
            for package, version in versions.items()
        )
    listed = ", ".join(f"{package} {version}" for package, version in versions.items())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(PAGE.format(versions=listed, scripts=scripts), encoding="utf-8")
    print(f"{OUT}: {OUT.stat().st_size:,} bytes ({listed})")


if __name__ == "__main__":
    main()

"""Default locations of the pipeline's data and outputs, relative to the project root (cwd).

Stage functions take explicit paths; only the CLI and the flows fall back on these.
"""

from pathlib import Path

DATA_DIR = Path("data")
RAW_DIR = DATA_DIR / "raw"  # immutable, DVC-tracked: written only by `skinrisk data import`
SYNTHETIC_DIR = DATA_DIR / "external" / "synthetic"  # the embedded default sample (Kaggle layout)
DOWNLOAD_DIR = DATA_DIR / "external" / "ham10000"
PROCESSED_DIR = DATA_DIR / "processed"
REPORTS_DIR = Path("reports")
MODELS_DIR = Path("models")
PARAMS_FILE = Path("params.yaml")
LOG_FILE = Path("logs") / "skinrisk.log"  # every log record of the last command (the console shows few)
METRICS_FILE = "metrics.json"  # the evaluate stage's every figure, in REPORTS_DIR (register reads it)

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
# Prefect runs, ad hoc (`skinrisk pipeline`, `make run`) and scheduled (prefect.yaml), write their
# processed data, models and reports here, not into DVC's outputs above: the checkout's `dvc status`
# stays clean after them. Both orchestrators share data/raw, the MLflow store and the Evidently workspace.
PREFECT_WORKSPACE = Path("workspace") / "prefect"
PREFECT_PROCESSED_DIR = PREFECT_WORKSPACE / "processed"
PREFECT_MODELS_DIR = PREFECT_WORKSPACE / "models"
PREFECT_REPORTS_DIR = PREFECT_WORKSPACE / "reports"
METRICS_FILE = "metrics.json"  # the evaluate stage's every figure, in REPORTS_DIR (register reads it)
TRAIN_INFO_FILE = "train.json"  # the train stage's result (MLflow run id, epochs, temperature), in MODELS_DIR


def latest_processed_dir() -> Path:
    """DVC's processed data if `dvc repro` made it, else the Prefect workspace's (after `make run` only)."""
    for folder in (PROCESSED_DIR, PREFECT_PROCESSED_DIR):
        if (folder / "cases.csv").exists():
            return folder
    return PROCESSED_DIR

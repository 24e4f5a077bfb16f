"""The scored model: a saved model with the preprocessing it was trained with, its loaders, and the
batched predictor that every stage scoring images uses (evaluate, explain, monitor, promote, triage).

Stages import it; it imports no stage.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.clinical import ClinicalEncoder
from tasks.decision import called_levels, level_prior
from tasks.errors import SkinriskError
from tasks.schema import PROCESSED_SUMMARY_FILE, RISK_LEVELS, PreprocessSummary, read_preprocess_summary, risk_level_of

# Written by the evaluate stage beside the model; logged with it as an MLflow model's artifact.
OPERATING_POINT_FILE = "operating_point.json"


@dataclass(frozen=True)
class Bundle:
    """What scoring needs besides the images: the model and the preprocessing it was trained with."""

    model: object  # keras.Model
    encoder: ClinicalEncoder
    summary: PreprocessSummary
    operating_point: dict | None  # {"target", "threshold", "target_recall"}

    @property
    def target(self) -> str:
        return "risk" if self.model.output_shape[-1] == len(RISK_LEVELS) else "dx"

    @property
    def prior(self) -> np.ndarray | None:
        """The training split's share of each risk level (see :mod:`tasks.decision`)."""
        return level_prior(self.summary)

    def called_levels(self, probs: np.ndarray) -> np.ndarray:
        """The risk level called for each row of risk probabilities (:func:`tasks.decision.called_levels`)."""
        return called_levels(probs, self.prior)


def bundle_from_files(model_path: Path, processed_dir: Path, operating_point_file: Path | None = None) -> Bundle:
    """A saved ``.keras`` model with the encoder and preprocess summary of its processed data folder,
    and the operating point of ``operating_point_file`` when that file exists."""
    from tasks.model import load_model
    from tasks.schema import ENCODER_FILE

    point = None
    if operating_point_file is not None and Path(operating_point_file).exists():
        point = json.loads(Path(operating_point_file).read_text())
    return Bundle(
        model=load_model(Path(model_path)),
        encoder=ClinicalEncoder.load(Path(processed_dir) / ENCODER_FILE),
        summary=read_preprocess_summary(Path(processed_dir)),
        operating_point=point,
    )


def _keras_file(artifacts: Path, model_uri: str) -> Path:
    """The one ``.keras`` file of a downloaded MLflow model's ``artifacts`` folder."""
    found = sorted(artifacts.glob("*.keras"))
    if not found:
        raise SkinriskError(
            f"MLflow model {model_uri} has no .keras file in {artifacts}: give a model logged by "
            "`skinrisk register` or the path of a saved model.keras"
        )
    return found[0]


def is_model_uri(model: str | Path) -> bool:
    """Whether ``model`` is an MLflow model URI (``models:/``, ``runs:/``, ``s3://``...), not a file path."""
    text = str(model)
    return "://" in text or text.startswith(("models:/", "runs:/"))


def load_bundle(model: str, processed_dir: Path, model_dir: Path) -> Bundle:
    """A saved model path (with its processed data folder) or an MLflow model URI."""
    if is_model_uri(model):
        import mlflow

        from tasks.model import load_model
        from tasks.schema import ENCODER_FILE
        from tasks.tracking import client

        client()  # points mlflow at the configured tracking URI
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
        except Exception as exc:
            raise SkinriskError(f"cannot fetch MLflow model {model}: {exc}") from exc
        artifacts = local / "artifacts"
        return Bundle(
            model=load_model(_keras_file(artifacts, model)),
            encoder=ClinicalEncoder.load(artifacts / ENCODER_FILE),
            summary=PreprocessSummary.read(artifacts / PROCESSED_SUMMARY_FILE),
            operating_point=json.loads((artifacts / OPERATING_POINT_FILE).read_text()),
        )
    return bundle_from_files(Path(model), Path(processed_dir), Path(model_dir) / OPERATING_POINT_FILE)


def predict_risk(
    bundle: Bundle, images: np.ndarray, clinical: np.ndarray, batch_size: int = 64, *, progress_bar: bool = True
) -> np.ndarray:
    """Risk-level probabilities (N x 3) for uint8 images and encoded clinical features, in batches
    (with a progress bar on a terminal unless ``progress_bar`` is off, as in the scoring server)."""
    from tasks.images import normalize_for_mobilenet
    from tasks.metrics import risk_probabilities
    from tasks.shards import progress

    outputs = [
        bundle.model.predict(
            {
                "image": normalize_for_mobilenet(images[s : s + batch_size]),
                "clinical": clinical[s : s + batch_size],
            },
            verbose=0,
        )
        for s in progress(range(0, len(images), batch_size), "score" if progress_bar else None, unit="batch")
    ]
    probs = np.concatenate(outputs) if outputs else np.zeros((0, bundle.model.output_shape[-1]))
    return risk_probabilities(probs, bundle.target, bundle.summary.diagnoses, bundle.summary.risk_map)


def score_images(bundle: Bundle, frame: pd.DataFrame, image_paths: list[Path]) -> np.ndarray:
    """Risk probabilities for raw cases: image files plus parsed ``age``, ``sex``, ``localization``.

    Images are decoded at the model's own input size and the clinical fields go through the
    model's own encoder, so models trained on different data are scored on equal terms.
    """
    from tasks.images import decode_images

    images = decode_images(list(image_paths), bundle.summary.image_size)
    return predict_risk(bundle, images, bundle.encoder.transform(frame))


def risk_labels(bundle: Bundle, diagnoses: pd.Series) -> np.ndarray:
    """Risk-level indices of diagnoses under the model's own risk mapping."""
    level_of = risk_level_of(bundle.summary.risk_map, bundle.summary.diagnoses)
    return diagnoses.map(level_of).map(RISK_LEVELS.index).to_numpy()


def json_safe(value):
    """NaN and infinities (undefined figures, e.g. recall of an absent class) become null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

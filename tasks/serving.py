"""Serving: the MLflow pyfunc that scores raw cases (image file + age, sex, site) to risk levels.

The served model takes what a clinic has, not what the network eats: the image file's bytes
(base64) and the clinical fields as recorded. ``score_cases`` is the whole scoring path as a plain
function, callable without MLflow; ``RiskModel`` only loads the artifacts and calls it. Cases are
decoded, checked and encoded (the encoder fitted in training) and scored (``predict_risk``) as in
batch triage, explain and the triage page, so a served prediction equals the pipeline's own.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from PIL import Image, ImageDraw

from tasks.clinical import ClinicalEncoder, is_blank
from tasks.errors import DataError, SkinriskError
from tasks.images import load_image
from tasks.schema import RISK_LEVELS, PreprocessSummary

INPUT_COLUMNS: tuple[str, ...] = ("image", "age", "sex", "localization")
# ``age`` may be left out altogether (unknown for every row), as the signature allows.
REQUIRED_COLUMNS: tuple[str, ...] = ("image", "sex", "localization")
PROBABILITY_COLUMNS: tuple[str, ...] = tuple(f"p_{level}" for level in RISK_LEVELS)
OUTPUT_COLUMNS: tuple[str, ...] = (*PROBABILITY_COLUMNS, "risk_level", "refer")
TARGETS: tuple[str, ...] = ("risk", "dx")
MAX_REPORTED_PROBLEMS = 10
PREDICT_BATCH_SIZE = 64

# Artifact keys of the logged pyfunc (``tasks.stages.register`` logs them under these names).
MODEL_ARTIFACT = "model"
ENCODER_ARTIFACT = "encoder"
PREPROCESS_ARTIFACT = "preprocess"
OPERATING_POINT_ARTIFACT = "operating_point"
ARTIFACTS = (MODEL_ARTIFACT, ENCODER_ARTIFACT, PREPROCESS_ARTIFACT, OPERATING_POINT_ARTIFACT)

_DATA_URL_PREFIX = re.compile(r"^data:[\w/.+-]*;base64,", re.IGNORECASE)
_HIGH = RISK_LEVELS.index("high")


def invalid_input(message: str) -> MlflowException:
    """The error for a bad request: the scoring server answers it with HTTP 400."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def risk_signature() -> ModelSignature:
    """Raw inputs (base64 image file, age, sex, site) -> three risk probabilities and a decision."""
    inputs = Schema(
        [
            ColSpec("string", "image"),
            ColSpec("double", "age", required=False),
            ColSpec("string", "sex"),
            ColSpec("string", "localization"),
        ]
    )
    outputs = Schema(
        [
            *(ColSpec("double", name) for name in PROBABILITY_COLUMNS),
            ColSpec("string", "risk_level"),
            ColSpec("boolean", "refer"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def image_to_base64(source: Path | bytes) -> str:
    """The ``image`` field of a request: base64 of an image file (or of its bytes)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return base64.b64encode(data).decode("ascii")


def example_input(image_size: int) -> pd.DataFrame:
    """One valid request row: a small synthetic dermoscopy-like JPEG and plausible fields."""
    size = max(16, int(image_size))
    image = Image.new("RGB", (size, size), (224, 172, 150))  # skin tone
    margin = size // 4
    ImageDraw.Draw(image).ellipse((margin, margin, size - margin, size - margin), fill=(110, 70, 50))  # a brown lesion
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return pd.DataFrame(
        {"image": [image_to_base64(buffer.getvalue())], "age": [45.0], "sex": ["female"], "localization": ["back"]}
    )


def read_operating_point(path: Path) -> dict[str, Any]:
    """``operating_point.json`` (``target``, ``threshold``, ``target_recall``), checked."""
    path = Path(path)
    if not path.exists():
        raise SkinriskError(f"operating point {path} not found: run `skinrisk evaluate` first")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SkinriskError(f"operating point {path} is not valid JSON: {exc}") from exc
    return check_operating_point(payload, where=str(path))


def check_operating_point(payload: Mapping[str, Any], where: str = "operating point") -> dict:
    """The operating point with its fields checked (the P(high) referral threshold in [0, 1])."""
    missing = [key for key in ("target", "threshold") if key not in payload]
    if missing:
        raise SkinriskError(f"{where}: missing {missing}; expected target, threshold, target_recall")
    if payload["target"] not in TARGETS:
        raise SkinriskError(f"{where}: target {payload['target']!r} is not one of {list(TARGETS)}")
    threshold = payload["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise SkinriskError(f"{where}: threshold {threshold!r} is not a number")
    if not 0.0 <= float(threshold) <= 1.0:
        raise SkinriskError(f"{where}: threshold {threshold} is not a probability in [0, 1]")
    return {**payload, "threshold": float(threshold)}


def check_model_outputs(model, summary: PreprocessSummary, target: str) -> None:
    """Refuse a model whose output width does not match the operating point's target."""
    n_outputs = int(model.output_shape[-1])
    expected = len(RISK_LEVELS) if target == "risk" else len(summary.diagnoses)
    if n_outputs != expected:
        raise SkinriskError(
            f"the model has {n_outputs} outputs but the operating point's target is {target!r}, "
            f"which needs {expected}: the model and operating_point.json come from different runs"
        )


def _image_bytes(value: object) -> bytes:
    """The file bytes of a base64 ``image`` cell; ValueError says what is wrong with it."""
    if is_blank(value):
        raise ValueError("missing: expected the base64 of a JPEG or PNG file")
    if not isinstance(value, str):
        raise ValueError(f"a {type(value).__name__}, expected a base64 string of a JPEG or PNG file")
    # A data URL prefix and line breaks (base64 is often wrapped at 76 columns) are harmless.
    text = "".join(_DATA_URL_PREFIX.sub("", value.strip()).split())
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not valid base64 ({exc}); send base64 of the image file's bytes") from None
    if not data:
        raise ValueError("base64 of zero bytes; send the image file's bytes")
    return data


def _decode_image(value: object, image_size: int) -> np.ndarray:
    data = _image_bytes(value)
    try:
        return load_image(data, image_size)
    except (DataError, Image.DecompressionBombError) as exc:
        reason = str(exc.__cause__ or exc).split(" <_io.")[0]  # drop the buffer's repr
        raise ValueError(f"{len(data)} bytes that are not a readable JPEG or PNG image ({reason})") from None


def prepare_cases(frame: pd.DataFrame, encoder: ClinicalEncoder, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw cases -> (uint8 images N x S x S x 3, encoded clinical features), as in training.

    Every row and field is checked before anything is scored; problems are reported together
    (the first :data:`MAX_REPORTED_PROBLEMS`) in one ``MlflowException`` naming row and field.
    Rows are numbered from 0 in request order.
    """
    if not isinstance(frame, pd.DataFrame):
        try:
            frame = pd.DataFrame(frame)
        except (TypeError, ValueError) as exc:
            raise invalid_input(
                f"expected a table with columns {list(INPUT_COLUMNS)}, got {type(frame).__name__}"
            ) from exc
    missing_columns = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing_columns:
        raise invalid_input(
            f"missing column(s) {missing_columns}; the input needs columns "
            f"{list(INPUT_COLUMNS)} (age may be null, or left out when unknown for every row)"
        )

    n = len(frame)
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    ages = np.full(n, math.nan)
    sexes: list[str] = ["unknown"] * n
    sites: list[str] = ["unknown"] * n
    problems: list[str] = []
    age_column = frame["age"] if "age" in frame.columns else pd.Series([None] * n)

    cells = zip(frame["image"], age_column, frame["sex"], frame["localization"], strict=True)
    for row, (image, age, sex, site) in enumerate(cells):
        try:
            images[row] = _decode_image(image, image_size)
        except ValueError as exc:
            problems.append(f"row {row}, field 'image': {exc}")
        ages[row], wrong = encoder.problems(age, sex, site)
        problems.extend(f"row {row}, field '{name}': {problem}" for name, problem in wrong.items())
        if not wrong:
            sexes[row], sites[row] = sex, site

    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise invalid_input(
            f"invalid input: {len(problems)} problem(s); rows are numbered from 0 in request "
            "order:\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
        )

    return images, encoder.transform(pd.DataFrame({"age": ages, "sex": sexes, "localization": sites}))


def score_cases(
    model, encoder: ClinicalEncoder, summary: PreprocessSummary, operating_point: Mapping[str, Any], frame: pd.DataFrame
) -> pd.DataFrame:
    """Raw cases -> ``p_low``, ``p_moderate``, ``p_high``, ``risk_level`` and ``refer``.

    ``model`` is the trained Keras model, ``summary`` its ``preprocess.json`` (image size,
    diagnoses, risk map) and ``operating_point`` the validation-chosen P(high) threshold with
    the model's target (``risk``: three outputs; ``dx``: seven, summed per risk level). A case is
    referred when ``p_high >= threshold``. The output keeps the input's index.
    """
    from tasks.scored_model import Bundle, predict_risk

    operating_point = check_operating_point(operating_point)
    check_model_outputs(model, summary, operating_point["target"])
    bundle = Bundle(model=model, encoder=encoder, summary=summary, operating_point=operating_point)
    images, clinical = prepare_cases(frame, encoder, summary.image_size)
    probs = predict_risk(bundle, images, clinical, PREDICT_BATCH_SIZE, progress_bar=False).astype(np.float64)

    index = frame.index if isinstance(frame, pd.DataFrame) else None
    result = pd.DataFrame(probs, columns=list(PROBABILITY_COLUMNS), index=index)
    result["risk_level"] = [RISK_LEVELS[i] for i in bundle.called_levels(probs)]
    result["refer"] = probs[:, _HIGH] >= operating_point["threshold"]
    return result


class RiskModel(mlflow.pyfunc.PythonModel):
    """The registered model: raw cases in, risk probabilities and a referral decision out.

    Artifacts: ``model`` (``.keras``), ``encoder`` (``encoder.json``), ``preprocess``
    (``preprocess.json``) and ``operating_point`` (``operating_point.json``).
    """

    def load_context(self, context) -> None:
        from tasks.model import load_model

        artifacts = context.artifacts
        missing = [key for key in ARTIFACTS if key not in artifacts]
        if missing:
            raise SkinriskError(f"the logged model lacks artifact(s) {missing}: register it again")
        self.summary = PreprocessSummary.read(Path(artifacts[PREPROCESS_ARTIFACT]))
        self.encoder = ClinicalEncoder.load(Path(artifacts[ENCODER_ARTIFACT]))
        self.operating_point = read_operating_point(Path(artifacts[OPERATING_POINT_ARTIFACT]))
        self.model = load_model(Path(artifacts[MODEL_ARTIFACT]))
        check_model_outputs(self.model, self.summary, self.operating_point["target"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Score a table with columns image (base64), age, sex, localization; see score_cases."""
        return score_cases(self.model, self.encoder, self.summary, self.operating_point, model_input)


# MLflow's scoring server wraps every error of a request in a repr of the request's table
# ("Failed to predict data '<table>'. \nError: ..." and "Failed to enforce schema of data
# '<table>' with schema '...'. Error: ..."), quoting the start of the base64 image and the
# clinical fields back to the caller. The text after the last such wrapper is the error itself.
_REQUEST_ECHO = re.compile(r"^Failed to (?:predict|enforce schema of) data .*?'\.\s*Error: ", re.DOTALL)


def without_request_echo(message: str) -> str:
    """An error message without MLflow's quote of the request it answers."""
    while (match := _REQUEST_ECHO.match(message)) is not None:
        message = message[match.end() :]
    return message


def scoring_app(model):
    """MLflow's scoring server (``/invocations``, ``/ping``, ``/health``, ``/version``) for the pyfunc
    ``model``, its 400 answers without the quote of the request (see :data:`_REQUEST_ECHO`)."""
    from fastapi.responses import JSONResponse
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(model)

    @app.middleware("http")
    async def no_request_echo(request, call_next):
        response = await call_next(request)
        if response.status_code != 400:
            return response
        body = b"".join([chunk async for chunk in response.body_iterator])
        try:
            payload = json.loads(body)
        except ValueError:
            return JSONResponse({"message": "bad request"}, status_code=400)
        if isinstance(payload.get("message"), str):
            payload["message"] = without_request_echo(payload["message"])
        payload.pop("stack_trace", None)  # the server's traceback quotes the request too
        return JSONResponse(payload, status_code=400)

    return app

"""The explain stage: Grad-CAM heatmaps for the image and SHAP values for the clinical variables.

Computation is kept apart from rendering, as in keras-io's ``grad_cam`` example:
:func:`make_gradcam_heatmap` and :func:`clinical_shap` return arrays and dicts; the ``*_figure``
functions and :func:`save_overlay` draw them.

What is explained is always a risk level; for a model with one output per diagnosis (``dx``
target) a level's probability is the sum of its diagnoses' (:func:`level_assignment`).

SHAP explains ``age``, ``sex`` and ``localization`` with the image held fixed.
``shap.KernelExplainer`` sees them as numbers (categories as vocabulary indices, an unknown age as
:data:`MISSING_AGE_CODE`), encoded through the fitted :class:`~tasks.clinical.ClinicalEncoder`
inside the model function, so each variable gets one SHAP value however many one-hot columns it
spans. With three variables every coalition is enumerated: the values are exact Shapley values,
and ``base_value`` plus their sum equals the model's output.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

# Headless rendering: the pipeline runs on servers and in workers without a display.
matplotlib.use("Agg")

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
from PIL import Image

from tasks.atomic import atomic_directory, atomic_path, write_json
from tasks.clinical import ClinicalEncoder
from tasks.errors import DataError, SkinriskError
from tasks.model import LAST_CONV_LAYER, POOLED_LAYER
from tasks.params import ExplainParams
from tasks.schema import RISK_LEVELS
from tasks.shards import progress

SHAP_VARIABLES: tuple[str, ...] = ("age", "sex", "localization")
MISSING_AGE_CODE = -1.0  # an unknown age in SHAP's numeric space (ages are 0-100)
# SHAP values are in log-odds: additive, and readable when a confident model's probability
# saturates (in probability, the waterfall of a 0.9999998 case is an axis offset and no bars).
SHAP_UNIT = "log-odds: log(P / (1 - P)) of the explained level's calibrated probability P"
PLOT_DPI = 120
HEATMAP_CMAP = "jet"

GRADCAM_DIR = "gradcam"
GRID_FILE = "gradcam_grid.png"
SHAP_SUMMARY_FILE = "shap_summary.png"
SHAP_VALUES_FILE = "shap_values.csv"
EXPLANATIONS_FILE = "explanations.json"
CASE_GRADCAM_FILE = "gradcam.png"
CASE_SHAP_FILE = "shap.png"
CASE_EXPLANATION_FILE = "explanation.json"

_HIGH = RISK_LEVELS.index("high")
_PREDICT_CHUNK = 256

# ---------------------------------------------------------------------------------------------
# Grad-CAM: computation


class _EagerThenTraced:
    """Runs ``function`` eagerly for its first calls and as a traced ``tf.function`` after that.

    Tracing a pass through MobileNetV2 costs as much as several eager calls (about 3 to 5): a
    one-off explanation (the CLI) should not pay it, a batch of them (the stage, a server) should.
    """

    EAGER_CALLS = 3

    def __init__(self, function: Callable) -> None:
        import tensorflow as tf

        self._eager = function
        self._traced = tf.function(function, reduce_retracing=True)
        self._calls = 0

    def __call__(self, *args):
        self._calls += 1
        return self._eager(*args) if self._calls <= self.EAGER_CALLS else self._traced(*args)


# Built once per (model, layer, mode); see _EagerThenTraced for when they are traced.
_GRADCAM_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NEG_LARGE = -1e30  # log(0) in the masked log-sum-exp: finite, so gradients stay finite


def _grad_model(model, layer_name: str, from_logits: bool):
    """(inputs -> [``layer_name``'s output, the model's output], whether that output is logits).

    For logits the model is cloned sharing every layer, its softmax ``Dense`` applied without the
    softmax on its live weights (so training after the clone shows). Models with no single
    softmax ``Dense``, or that cannot be cloned, give their probabilities.
    """
    import keras

    try:
        conv = model.get_layer(layer_name)
    except ValueError:
        raise SkinriskError(
            f"the model has no layer {layer_name!r} to take Grad-CAM from (explain.gradcam_layer); "
            f"models built by tasks.model.build_model have MobileNetV2's, e.g. {LAST_CONV_LAYER!r}"
        ) from None
    softmax_calls: list = []
    captured: dict[str, Any] = {}

    def call(layer, *args, **kwargs):
        if isinstance(layer, keras.layers.Dense) and layer.get_config().get("activation") == "softmax":
            softmax_calls.append(layer)
            logits = keras.ops.matmul(args[0], layer.kernel)
            return logits if layer.bias is None else logits + layer.bias
        output = layer(*args, **kwargs)
        if layer.name == layer_name:
            captured["conv"] = output
        return output

    if from_logits:
        try:
            twin = keras.models.clone_model(
                model, clone_function=lambda layer: layer, call_function=call, recursive=True
            )
        except Exception:  # unusual graphs (subclassed layers): fall back to differentiating probabilities
            pass
        else:
            if len(softmax_calls) == 1 and "conv" in captured:
                return keras.Model(twin.inputs, [captured["conv"], twin.outputs[0]]), True
    return keras.Model(model.inputs, [conv.output, model.output]), False


def _gradcam_function(model, layer_name: str, from_logits: bool) -> _EagerThenTraced:
    import tensorflow as tf

    built = _GRADCAM_FUNCTIONS.setdefault(model, {})
    if (layer_name, from_logits) in built:
        return built[layer_name, from_logits]
    grad_model, use_logits = _grad_model(model, layer_name, from_logits)

    def gradcam(image, clinical, assignment, index):
        with tf.GradientTape() as tape:
            conv_output, outputs = grad_model({"image": image, "clinical": clinical}, training=False)
            if use_logits:
                probabilities = tf.nn.softmax(outputs[0])
                # Each class's logit: log sum_k assignment[k, j] * exp(logit_k), a masked
                # log-sum-exp (for a one-diagnosis class, that diagnosis' own logit).
                weighted = tf.where(
                    assignment > 0,
                    outputs[0][:, None] + tf.math.log(tf.maximum(assignment, 1e-30)),
                    _NEG_LARGE,
                )
                scores = tf.reduce_logsumexp(weighted, axis=0)
            else:
                probabilities = outputs[0]
                scores = tf.linalg.matvec(assignment, probabilities, transpose_a=True)
            # The class logits rank the classes as their probabilities do.
            chosen = tf.where(index < 0, tf.argmax(scores, output_type=tf.int32), index)
            explained = tf.gather(scores, chosen)
        grads = tape.gradient(explained, conv_output)
        # Channel importance: the gradient averaged over the feature map (Selvaraju et al., 2017).
        channel_weights = tf.reduce_mean(grads, axis=(0, 1, 2))
        heatmap = tf.nn.relu(tf.reduce_sum(conv_output[0] * channel_weights, axis=-1))
        return tf.math.divide_no_nan(heatmap, tf.reduce_max(heatmap)), probabilities, chosen

    built[layer_name, from_logits] = _EagerThenTraced(gradcam)
    return built[layer_name, from_logits]


def _gradcam(
    model,
    image: np.ndarray,
    clinical: np.ndarray,
    assignment: np.ndarray,
    index: int | None,
    last_conv_layer_name: str,
    from_logits: bool,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(heatmap at conv resolution in [0, 1], output probabilities, explained column), one pass.

    Column ``j`` of ``assignment`` (outputs x explained classes) says which outputs make up
    class ``j``; ``index`` None explains the most probable class.
    """
    image = np.asarray(image, dtype=np.float32)
    clinical = np.asarray(clinical, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be one normalized H x W x 3 array, got shape {image.shape}")
    if clinical.ndim != 1:
        raise ValueError(f"clinical must be one case's feature vector (F,), got shape {clinical.shape}")
    assignment = np.asarray(assignment, dtype=np.float32)
    n_outputs = int(model.output_shape[-1])
    if assignment.shape[0] != n_outputs:
        raise ValueError(f"the assignment has {assignment.shape[0]} rows for a model with {n_outputs} outputs")
    if index is not None and not 0 <= index < assignment.shape[1]:
        raise ValueError(f"index {index} is outside 0..{assignment.shape[1] - 1}")
    import tensorflow as tf

    heatmap, outputs, chosen = _gradcam_function(model, last_conv_layer_name, from_logits)(
        tf.constant(image[None]),
        tf.constant(clinical[None]),
        tf.constant(assignment),
        tf.constant(-1 if index is None else index, dtype=tf.int32),
    )
    return heatmap.numpy(), outputs.numpy().astype(np.float64), int(chosen)


def make_gradcam_heatmap(
    model,
    image: np.ndarray,
    clinical: np.ndarray,
    *,
    last_conv_layer_name: str = LAST_CONV_LAYER,
    class_index: int | None = None,
    from_logits: bool = True,
) -> np.ndarray:
    """Grad-CAM heatmap (conv resolution, values in [0, 1]) of one model output.

    ``image`` is one normalized H x W x 3 image, ``clinical`` its encoded features (F,).
    ``class_index`` indexes the model's own outputs (diagnoses for a ``dx`` model); None means
    the predicted output. To explain a risk level of any model use :func:`risk_level_gradcam`.
    An all-zero map means no part of the image raised that output.

    ``from_logits`` (as keras-io's example, which strips the softmax): differentiate the class
    logit. A confident softmax saturates: its gradient underflows to zero, or is left with only
    "what would lower the other classes", which points away from the lesion. Models without a
    softmax ``Dense``, or ``from_logits=False``, differentiate the probability itself.
    """
    n_outputs = int(model.output_shape[-1])
    heatmap, _, _ = _gradcam(model, image, clinical, np.eye(n_outputs), class_index, last_conv_layer_name, from_logits)
    return heatmap


def level_assignment(n_outputs: int, diagnoses: Sequence[str], risk_map: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Model outputs -> risk levels as an ``n_outputs x 3`` 0/1 matrix (identity for ``risk`` models)."""
    from tasks.metrics import risk_probabilities

    if n_outputs == len(RISK_LEVELS):
        return np.eye(len(RISK_LEVELS))
    # Row i is the risk split of a case that is certainly diagnosis i.
    return risk_probabilities(np.eye(n_outputs), "dx", diagnoses, risk_map).astype(np.float64)


def bundle_assignment(bundle) -> np.ndarray:
    """:func:`level_assignment` for a :class:`tasks.scored_model.Bundle`."""
    return level_assignment(int(bundle.model.output_shape[-1]), bundle.summary.diagnoses, bundle.summary.risk_map)


@dataclass(frozen=True)
class RiskGradCam:
    heatmap: np.ndarray  # conv resolution, [0, 1]
    risk_probabilities: np.ndarray  # (3,), RISK_LEVELS order
    level_index: int  # the explained risk level


def risk_level_gradcam(
    model,
    image: np.ndarray,
    clinical: np.ndarray,
    assignment: np.ndarray,
    *,
    level_index: int | None = None,
    last_conv_layer_name: str = LAST_CONV_LAYER,
    from_logits: bool = True,
) -> RiskGradCam:
    """Grad-CAM of a risk level (the predicted level when ``level_index`` is None), from the one
    forward pass that also gives the prediction.

    ``assignment`` is :func:`level_assignment`. A ``dx`` model's level score is its diagnoses'
    summed probability, or with ``from_logits`` (see :func:`make_gradcam_heatmap`) its logit: the
    log of the diagnoses' summed ``exp(logit)``, the summed probability before the softmax's
    shared normalisation. A ``risk`` model's is the level's own probability or logit.
    """
    assignment = np.asarray(assignment, dtype=np.float64)
    heatmap, outputs, chosen = _gradcam(
        model, image, clinical, assignment, level_index, last_conv_layer_name, from_logits
    )
    return RiskGradCam(heatmap=heatmap, risk_probabilities=outputs @ assignment, level_index=chosen)


def upsample_heatmap(heatmap: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a heatmap to ``size`` (side, or (height, width)), kept in [0, 1]."""
    height, width = (size, size) if isinstance(size, int) else size
    field = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
    resized = np.asarray(field.resize((int(width), int(height)), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(resized, 0.0, 1.0)


def heatmap_stats(heatmap: np.ndarray, size: int | tuple[int, int]) -> dict[str, Any]:
    """Where the heat is, as fractions of the image (x right, y down), on the upsampled map."""
    field = upsample_heatmap(heatmap, size).astype(np.float64)
    stats: dict[str, Any] = {"conv_resolution": list(np.shape(heatmap)), "empty": not field.any()}
    if stats["empty"]:
        return stats
    height, width = field.shape
    xs, ys = np.meshgrid((np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height)  # pixel centres
    peak = np.unravel_index(np.argmax(field), field.shape)
    return {
        **stats,
        "peak_xy": [round(float(xs[peak]), 4), round(float(ys[peak]), 4)],
        "centroid_xy": [round(float(np.average(xs, weights=field)), 4), round(float(np.average(ys, weights=field)), 4)],
        "area_above_half": round(float((field >= 0.5).mean()), 4),
    }


# ---------------------------------------------------------------------------------------------
# Grad-CAM: rendering


def render_overlay(image_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The image with the heatmap blended on top in the jet colormap (uint8, image's size)."""
    image = np.asarray(image_uint8)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image_uint8 must be an H x W x 3 uint8 array, got {image.shape} {image.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    jet = matplotlib.colormaps[HEATMAP_CMAP](upsample_heatmap(heatmap, image.shape[:2]))[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * jet
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def colour_bar_label(level: str | None) -> str:
    """What the overlay's colours mean: the heatmap is normalized to its own peak."""
    explained = f"P({level} risk)" if level else "P(predicted level)"
    return f"Grad-CAM: relative contribution to {explained}"


def _add_colour_bar(fig, axes, level: str | None, **kwargs) -> None:
    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0.0, 1.0), cmap=HEATMAP_CMAP)
    bar = fig.colorbar(mappable, ax=axes, ticks=[0.0, 0.5, 1.0], **kwargs)
    bar.set_label(colour_bar_label(level), fontsize=8)
    bar.ax.tick_params(labelsize=7)


def overlay_figure(overlay: np.ndarray, level: str | None = None):
    """A figure of one rendered overlay (:func:`render_overlay`) with its labelled colour bar."""
    height, width = overlay.shape[:2]
    fig, ax = plt.subplots(figsize=(4.6, 3.6 * height / width), layout="constrained")
    ax.imshow(overlay)
    ax.axis("off")
    _add_colour_bar(fig, ax, level, fraction=0.06, pad=0.02)
    return fig


def save_overlay(
    image_uint8: np.ndarray, heatmap: np.ndarray, path: Path, alpha: float = 0.4, *, level: str | None = None
) -> np.ndarray:
    """Write :func:`render_overlay` with its colour bar as a PNG (atomically); returns the overlay."""
    overlay = render_overlay(image_uint8, heatmap, alpha)
    _save_figure(overlay_figure(overlay, level), Path(path))
    return overlay


@dataclass(frozen=True)
class CaseView:
    """One explained case as the grid shows it."""

    image_id: str
    image: np.ndarray  # uint8 H x W x 3
    overlay: np.ndarray  # uint8 H x W x 3
    predicted_level: str
    probabilities: Mapping[str, float]  # risk level -> probability
    true_level: str | None = None


def _save_figure(fig, path: Path) -> None:
    # Figures are made with layout="constrained": bbox_inches="tight" would draw them twice,
    # a third of a single case's explanation time.
    try:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=PLOT_DPI)
    finally:
        plt.close(fig)


def case_grid_figure(cases: Sequence[CaseView], *, per_row: int = 3):
    """A grid of cases, each as image and overlay, titled with true and predicted level, with
    one colour bar for every overlay (each map is normalized to its own peak)."""
    if not cases:
        raise ValueError("no cases to draw")
    per_row = max(1, min(per_row, len(cases)))
    rows = math.ceil(len(cases) / per_row)
    fig, axes = plt.subplots(
        rows, 2 * per_row, figsize=(4.2 * per_row, 2.6 * rows + 0.6), squeeze=False, layout="constrained"
    )
    for ax in axes.ravel():
        ax.axis("off")
    for k, case in enumerate(cases):
        row, column = divmod(k, per_row)
        ax_image, ax_overlay = axes[row, 2 * column], axes[row, 2 * column + 1]
        ax_image.imshow(case.image)
        ax_overlay.imshow(case.overlay)
        probabilities = " ".join(f"{level[0].upper()} {case.probabilities[level]:.2f}" for level in RISK_LEVELS)
        verdict = "" if case.true_level is None else ("  ✓" if case.true_level == case.predicted_level else "  ✗")
        true_text = "?" if case.true_level is None else case.true_level
        ax_image.set_title(f"{case.image_id}\ntrue {true_text}, predicted {case.predicted_level}{verdict}", fontsize=8)
        ax_overlay.set_title(f"Grad-CAM ({case.predicted_level})\n{probabilities}", fontsize=8)
    _add_colour_bar(fig, axes, None, location="bottom", fraction=0.04 / rows, shrink=0.5, aspect=40)
    return fig


# ---------------------------------------------------------------------------------------------
# SHAP for the clinical variables: computation


class RiskPredictor:
    """SHAP's model function: ``predictor(image, clinical)`` gives the N x 3 risk-level
    probabilities (float64) of one normalized H x W x 3 image with N rows of encoded features.

    For a model built by :func:`tasks.model.build_model` the image embedding is computed once per
    image and only the fusion head runs per row: the network's own computation (dropout is off
    at inference), many times faster than re-running the backbone for every coalition. The split
    is checked against the whole model on first use; other models run whole, the image repeated.
    """

    def __init__(self, model, assignment: np.ndarray) -> None:
        # A weak reference: predictors are cached per model, and must not keep it alive.
        model_ref = weakref.ref(model)
        self.assignment = np.asarray(assignment, dtype=np.float64)
        self._embedding: tuple[np.ndarray, Any] | None = None  # (image, its embedding)
        self._checked = False
        self._model_fn = _EagerThenTraced(lambda inputs: model_ref()(inputs, training=False))
        try:
            from tasks.model import embedding_model, head_of

            model.get_layer(POOLED_LAYER)
            head, embed = head_of(model), embedding_model(model)
        except (ValueError, KeyError, AttributeError):
            self._head_fn = self._embed_fn = None
        else:
            self._head_fn = _EagerThenTraced(lambda inputs: head(inputs, training=False))
            self._embed_fn = _EagerThenTraced(lambda image: embed(image, training=False))

    def _predict(self, image: np.ndarray, clinical: np.ndarray, *, split: bool) -> np.ndarray:
        import tensorflow as tf

        rows = tf.constant(clinical)
        if not split:
            images = tf.repeat(tf.constant(image[None]), rows.shape[0], axis=0)
            return np.asarray(self._model_fn({"image": images, "clinical": rows}))
        if self._embedding is None or not np.array_equal(self._embedding[0], image):
            self._embedding = (image.copy(), self._embed_fn(tf.constant(image[None])))
        return np.asarray(self._head_fn([tf.repeat(self._embedding[1], rows.shape[0], axis=0), rows]))

    def __call__(self, image: np.ndarray, clinical: np.ndarray) -> np.ndarray:
        image = np.ascontiguousarray(image, dtype=np.float32)
        clinical = np.ascontiguousarray(clinical, dtype=np.float32)
        if self._head_fn is not None and not self._checked:
            self._checked = True
            split = self._predict(image, clinical[:1], split=True)
            if not np.allclose(split, self._predict(image, clinical[:1], split=False), atol=1e-5):
                self._head_fn = self._embed_fn = None  # not the graph assumed: run the model whole
        outputs = [
            self._predict(image, clinical[start : start + _PREDICT_CHUNK], split=self._head_fn is not None)
            for start in range(0, len(clinical), _PREDICT_CHUNK)
        ]
        return np.concatenate(outputs).astype(np.float64) @ self.assignment


_PREDICTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def risk_predictor(model, assignment: np.ndarray) -> RiskPredictor:
    """A :class:`RiskPredictor` for ``model``, reused while the model lives."""
    assignment = np.asarray(assignment, dtype=np.float64)
    predictor = _PREDICTORS.get(model)
    if predictor is None or not np.array_equal(predictor.assignment, assignment):
        predictor = _PREDICTORS[model] = RiskPredictor(model, assignment)
    return predictor


def _raw_frame(raw_clinical: Mapping[str, Any] | Sequence[Any] | pd.Series) -> pd.DataFrame:
    if isinstance(raw_clinical, Mapping | pd.Series):
        age, sex, site = (raw_clinical[name] for name in SHAP_VARIABLES)
    else:
        age, sex, site = raw_clinical
    age = math.nan if age is None else float(age)
    return pd.DataFrame({"age": [age], "sex": [sex], "localization": [site]})


def _vocabularies(encoder: ClinicalEncoder) -> dict[str, Sequence[str]]:
    return {"sex": encoder.sexes, "localization": encoder.localizations}


def encode_raw(frame: pd.DataFrame, encoder: ClinicalEncoder) -> np.ndarray:
    """Raw ``age, sex, localization`` rows -> N x 3 SHAP codes (age in years, vocabulary indices)."""
    codes = [frame["age"].astype(float).fillna(MISSING_AGE_CODE).to_numpy()]
    for column, vocabulary in _vocabularies(encoder).items():
        unknown = sorted(set(frame[column]) - set(vocabulary))
        if unknown:
            raise DataError(f"unknown {column} value(s) {unknown}; accepted: {list(vocabulary)}")
        codes.append(pd.Categorical(frame[column], categories=vocabulary).codes)
    return np.column_stack(codes).astype(np.float64)


def decode_raw(codes: np.ndarray, encoder: ClinicalEncoder) -> pd.DataFrame:
    """The inverse of :func:`encode_raw` (an age code below 0 is an unknown age, NaN)."""
    codes = np.asarray(codes, dtype=np.float64)
    raw = {"age": np.where(codes[:, 0] < 0, math.nan, codes[:, 0])}
    for k, (column, vocabulary) in enumerate(_vocabularies(encoder).items(), start=1):
        raw[column] = np.asarray(vocabulary, dtype=object)[np.rint(codes[:, k]).astype(int)]
    return pd.DataFrame(raw)


def log_odds(probabilities: np.ndarray, class_index: int) -> np.ndarray:
    """log(P / (1 - P)) of column ``class_index`` of N x K probabilities, as float64.

    ``1 - P`` is taken as the other columns' sum, not by subtraction: a float32 softmax keeps a
    tiny probability's relative precision, but rounds a confident one to exactly 1.0. The odds
    are bounded by float32's smallest normal number (about +-87 log-odds).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    explained = probabilities[:, class_index]
    rest = np.delete(probabilities, class_index, axis=1).sum(axis=1)
    floor = float(np.finfo(np.float32).tiny)
    return np.log(np.maximum(explained, floor)) - np.log(np.maximum(rest, floor))


def clinical_shap(
    predict_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    image: np.ndarray,
    raw_clinical: Mapping[str, Any] | Sequence[Any] | pd.Series,
    background_raw: pd.DataFrame,
    encoder: ClinicalEncoder,
    class_index: int,
    *,
    background_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Exact SHAP values of ``age``, ``sex`` and ``localization`` for one case, image held fixed.

    ``predict_fn(image, clinical)`` returns N x K probabilities for one normalized image and an
    N x F matrix of encoded features (e.g. a :class:`RiskPredictor`); column ``class_index`` is
    explained, in log-odds (:func:`log_odds`). ``raw_clinical`` is ``(age, sex, site)`` or a
    mapping with keys ``age``, ``sex``, ``localization`` (age None or NaN when unknown).
    ``background_raw`` holds raw rows of the same three columns; more than ``background_size``
    rows are sampled down with ``seed``. An unknown age follows the encoder's policy: imputed
    (with its missing flag) under ``impute``; refused under ``drop``, and background rows without
    an age are left out.

    Returns ``unit`` (:data:`SHAP_UNIT`), ``base_value`` (mean log-odds over the background),
    ``values`` (variable -> SHAP value), ``output`` (the case's log-odds: ``base_value +
    sum(values)``), ``probability`` (the case's probability of the class), ``class_index`` and
    ``background_size``.
    """
    import shap

    case = _raw_frame(raw_clinical)
    encoder.check(*case.iloc[0])
    background = background_raw.loc[:, list(SHAP_VARIABLES)].reset_index(drop=True)
    if encoder.missing_policy == "drop":
        background = background.loc[background["age"].notna()].reset_index(drop=True)
    if background.empty:
        raise DataError("the SHAP background holds no usable case (age, sex, localization)")
    if background_size is not None and len(background) > background_size:
        background = background.sample(n=background_size, random_state=seed).reset_index(drop=True)
    x = encode_raw(case, encoder)
    image = np.ascontiguousarray(image, dtype=np.float32)

    def probabilities(codes: np.ndarray) -> np.ndarray:
        features = encoder.transform(decode_raw(codes, encoder))
        return np.asarray(predict_fn(image, features), dtype=np.float64)

    def explained_output(codes: np.ndarray) -> np.ndarray:
        return log_odds(probabilities(codes), class_index)

    explainer = shap.KernelExplainer(
        explained_output, encode_raw(background, encoder), feature_names=list(SHAP_VARIABLES)
    )
    # Three variables: 2**3 - 2 coalitions, all enumerated (nsamples is capped there), and no
    # L1 feature selection, so the regression returns the exact Shapley values.
    values = np.asarray(explainer.shap_values(x, l1_reg=False, silent=True), dtype=np.float64).reshape(-1)
    case_probabilities = probabilities(x)
    return {
        "unit": SHAP_UNIT,
        "base_value": float(np.asarray(explainer.expected_value).reshape(-1)[0]),
        "values": {name: float(v) for name, v in zip(SHAP_VARIABLES, values, strict=True)},
        "output": float(log_odds(case_probabilities, class_index)[0]),
        "probability": float(case_probabilities[0, class_index]),
        "class_index": int(class_index),
        "background_size": len(background),
    }


def training_background(processed_dir: Path, size: int, seed: int) -> pd.DataFrame:
    """``size`` training cases' raw ``age, sex, localization`` from ``cases.csv``, sampled with ``seed``."""
    from tasks.schema import CASES_FILE

    path = Path(processed_dir) / CASES_FILE
    if not path.exists():
        raise DataError(f"{path} not found: run `skinrisk preprocess` first")
    cases = pd.read_csv(path, usecols=["split", *SHAP_VARIABLES], keep_default_na=False, na_values={"age": [""]})
    train = cases.loc[cases["split"] == "train", list(SHAP_VARIABLES)].reset_index(drop=True)
    if train.empty:
        raise DataError(f"{path} has no training rows to draw the SHAP background from")
    if len(train) > size:
        train = train.sample(n=size, random_state=seed).reset_index(drop=True)
    return train


def neutral_background(encoder: ClinicalEncoder) -> pd.DataFrame:
    """A reference population when no training data is at hand: every sex x site, at median age.

    SHAP values against it read as "compared with a median-aged patient (the encoder's
    ``age_fill``, the training median), averaged evenly over every sex and site". It needs only
    the encoder, so it works for a registered model without its processed data; pass
    :func:`training_background` instead to compare with the training population.
    """
    rows = [(encoder.age_fill, sex, site) for sex in encoder.sexes for site in encoder.localizations]
    return pd.DataFrame(rows, columns=list(SHAP_VARIABLES))


# ---------------------------------------------------------------------------------------------
# SHAP: rendering


def _display_value(name: str, value: Any) -> str:
    if name == "age":
        return "unknown" if pd.isna(value) else f"{value:g}"
    return str(value)


def _axis_in_plain_numbers(fig) -> None:
    # No "1e-9+9.999998e-1" offset on any axis: ticks say the log-odds plainly.
    for ax in fig.axes:
        formatter = ax.xaxis.get_major_formatter()
        if isinstance(formatter, matplotlib.ticker.ScalarFormatter):
            formatter.set_useOffset(False)
            formatter.set_scientific(False)


def _probability_text(probability: float) -> str:
    if probability > 0.9999:
        return "> 0.9999"
    return "< 0.0001" if probability < 0.0001 else f"= {probability:.4f}"


def case_shap_figure(result: Mapping[str, Any], raw_clinical: Mapping[str, Any], *, level: str):
    """``shap.plots.waterfall`` of one case: from the base value, each variable's push, to the
    case's log-odds of P(``level`` risk)."""
    import shap

    names = list(SHAP_VARIABLES)
    explanation = shap.Explanation(
        values=np.array([result["values"][name] for name in names], dtype=np.float64),
        base_values=float(result["base_value"]),
        data=np.array([_display_value(name, raw_clinical[name]) for name in names], dtype=object),
        feature_names=names,
    )
    fig = plt.figure(layout="constrained")
    shap.plots.waterfall(explanation, show=False)
    _axis_in_plain_numbers(fig)
    # The waterfall's own axis is the first; its twins only label E[f(X)] and f(x), the E[f(X)] one
    # under the ticks, where the axis label would overprint it: the label goes below that.
    fig.axes[0].set_xlabel(f"log-odds of P({level} risk), image held fixed (0: even odds)", fontsize=10, labelpad=22)
    probability = result.get("probability")
    shown = "" if probability is None else f"; this case P({level} risk) {_probability_text(probability)}"
    fig.suptitle(f"Clinical variables' SHAP values{shown}", fontsize=10)
    return fig


def shap_summary_figure(table: pd.DataFrame):
    """``shap.plots.bar`` of mean |SHAP| (log-odds of P(predicted level)) per variable: all cases,
    then by predicted level."""
    import shap

    explanation = shap.Explanation(
        values=table[[f"shap_{name}" for name in SHAP_VARIABLES]].to_numpy(dtype=np.float64),
        feature_names=list(SHAP_VARIABLES),
    )
    cohorts = {"all cases": explanation}
    for level in RISK_LEVELS:
        rows = (table["predicted_level"] == level).to_numpy()
        if rows.any():
            cohorts[f"predicted {level}"] = explanation[rows]
    fig, ax = plt.subplots(layout="constrained")
    shap.plots.bar(cohorts, ax=ax, show=False)
    fig.set_size_inches(7, 1.5 + 0.35 * len(SHAP_VARIABLES) * len(cohorts))
    _axis_in_plain_numbers(fig)
    ax.set_xlabel("mean |SHAP value|, log-odds of P(predicted level)", fontsize=10)
    ax.set_title("Clinical variables' influence, image held fixed", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# Stage: the test split


def select_cases(
    y_true: np.ndarray, probs: np.ndarray, predicted: np.ndarray, cases_per_level: int, confidently_wrong: int
) -> list[tuple[int, str]]:
    """(index, reason) of the cases to show, in order, given the called levels ``predicted``.

    Per true level, its most confident correct predictions (``correct``), topped up with the
    level's other cases by P(true level) where too few are correct (``top_up``); then the most
    confident wrong predictions not already chosen (``confidently_wrong``).
    """
    y_true, predicted = np.asarray(y_true), np.asarray(predicted)
    confidence = probs[np.arange(len(predicted)), predicted]
    chosen: list[tuple[int, str]] = []
    for level in range(len(RISK_LEVELS)):
        members = np.flatnonzero(y_true == level)
        by_confidence = members[np.argsort(-probs[members, level], kind="stable")]
        correct = [int(i) for i in by_confidence if predicted[i] == level][:cases_per_level]
        chosen += [(i, "correct") for i in correct]
        others = [int(i) for i in by_confidence if predicted[i] != level]
        chosen += [(i, "top_up") for i in others[: cases_per_level - len(correct)]]
    taken = {i for i, _ in chosen}
    wrong = np.flatnonzero(predicted != y_true)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    chosen += [(int(i), "confidently_wrong") for i in wrong if int(i) not in taken][:confidently_wrong]
    return chosen


def _probabilities_dict(probs: np.ndarray) -> dict[str, float]:
    return {level: round(float(p), 6) for level, p in zip(RISK_LEVELS, probs, strict=True)}


def explain_test_cases(
    model_path: Path,
    processed_dir: Path,
    out_dir: Path,
    params: ExplainParams,
    *,
    run_id: str | None = None,
) -> dict:
    """Explain chosen test cases (Grad-CAM + SHAP) and summarise SHAP over the test split.

    Writes ``out_dir`` atomically: ``gradcam/<image_id>.png`` per chosen case (see
    :func:`select_cases`), ``gradcam_grid.png``, ``shap_summary.png`` and ``shap_values.csv``
    over up to ``params.shap_cases`` test cases (sampled with ``params.seed``), and
    ``explanations.json``. SHAP integrates over ``params.shap_background`` training cases.
    With ``run_id`` the folder is logged to that MLflow run under ``explain/``.
    """
    from tasks.dataset import load_split
    from tasks.images import normalize_for_mobilenet
    from tasks.model import calibrated_single_view, single_view
    from tasks.schema import CASES_FILE
    from tasks.scored_model import bundle_from_files, json_safe, predict_risk

    processed_dir, out_dir = Path(processed_dir), Path(out_dir)
    bundle = bundle_from_files(Path(model_path), processed_dir)
    test = load_split(processed_dir, "test")
    cases = pd.read_csv(processed_dir / CASES_FILE, keep_default_na=False, na_values={"age": [""]})
    raw_test = cases.set_index("image_id").loc[test.image_id, list(SHAP_VARIABLES)].reset_index(drop=True)
    probs = predict_risk(bundle, test.images, test.clinical)
    predicted = bundle.called_levels(probs)
    assignment = bundle_assignment(bundle)
    # Grad-CAM on the single view (the map is the same at any temperature); SHAP on the calibrated
    # single view; the probabilities shown are the saved model's (every view, calibrated).
    single = single_view(bundle.model)
    predictor = risk_predictor(calibrated_single_view(bundle.model), assignment)
    background = training_background(processed_dir, params.shap_background, params.seed)

    def levels(i: int) -> dict[str, str]:
        return {"true_level": RISK_LEVELS[int(test.risk[i])], "predicted_level": RISK_LEVELS[int(predicted[i])]}

    @functools.cache  # the chosen cases are often among the summary's
    def shap_of(i: int) -> dict:
        image = normalize_for_mobilenet(test.images[i])
        return clinical_shap(
            predictor, image, raw_test.iloc[i], background, bundle.encoder, int(predicted[i]), seed=params.seed
        )

    rng = np.random.default_rng(params.seed)
    summary_indices = np.sort(rng.choice(len(test), size=min(params.shap_cases, len(test)), replace=False))
    shap_rows = []
    for i in map(int, progress(summary_indices, "SHAP", unit="case")):
        result = shap_of(i)
        shap_rows.append(
            {
                "image_id": str(test.image_id[i]),
                **levels(i),
                **raw_test.iloc[i].to_dict(),
                "base_value": result["base_value"],
                **{f"shap_{name}": result["values"][name] for name in SHAP_VARIABLES},
                "output": result["output"],
                "probability": result["probability"],
            }
        )
    shap_table = pd.DataFrame(shap_rows)

    chosen = select_cases(test.risk, probs, predicted, params.cases_per_level, params.confidently_wrong)
    explained: list[dict] = []
    views: list[CaseView] = []
    with atomic_directory(out_dir) as staging:
        for i, reason in chosen:
            image_id, level = str(test.image_id[i]), RISK_LEVELS[int(predicted[i])]
            probabilities = _probabilities_dict(probs[i])
            cam = risk_level_gradcam(
                single,
                normalize_for_mobilenet(test.images[i]),
                test.clinical[i],
                assignment,
                level_index=int(predicted[i]),
                last_conv_layer_name=params.gradcam_layer,
            )
            overlay_path = staging / GRADCAM_DIR / f"{image_id}.png"
            overlay = save_overlay(test.images[i], cam.heatmap, overlay_path, params.overlay_alpha, level=level)
            explained.append(
                {
                    "image_id": image_id,
                    "reason": reason,
                    **levels(i),
                    "probabilities": probabilities,
                    "clinical": raw_test.iloc[i].to_dict(),
                    "shap": shap_of(i),
                    "gradcam": heatmap_stats(cam.heatmap, test.images.shape[1:3]),
                }
            )
            views.append(CaseView(image_id, test.images[i], overlay, probabilities=probabilities, **levels(i)))
        _save_figure(case_grid_figure(views), staging / GRID_FILE)
        _save_figure(shap_summary_figure(shap_table), staging / SHAP_SUMMARY_FILE)
        with atomic_path(staging / SHAP_VALUES_FILE) as tmp:
            shap_table.to_csv(tmp, index=False)
        report = json_safe(
            {
                "target": bundle.target,
                "n_test_images": len(test),
                "cases": explained,
                "shap_summary": {
                    "unit": SHAP_UNIT,
                    "n_cases": len(shap_table),
                    "background_size": len(background),
                    "mean_abs": {name: float(shap_table[f"shap_{name}"].abs().mean()) for name in SHAP_VARIABLES},
                },
                "params": params.model_dump(),
            }
        )
        write_json(staging / EXPLANATIONS_FILE, report)

    if run_id:
        from tasks.tracking import log_artifacts

        log_artifacts(run_id, [out_dir], artifact_path="explain")
    return report


# ---------------------------------------------------------------------------------------------
# One case, from the clinic's fields


def validate_case(encoder: ClinicalEncoder, age: float | str | None, sex: str, site: str) -> dict[str, Any]:
    """The raw clinical fields, checked by the model's encoder (:meth:`ClinicalEncoder.check`)."""
    return {"age": encoder.check(age, sex, site), "sex": sex, "localization": site}


def explain_case(
    bundle,
    image: Path,
    age: float | None,
    sex: str,
    site: str,
    out_dir: Path,
    params: ExplainParams,
    *,
    background: pd.DataFrame | None = None,
) -> dict:
    """Score and explain one case: risk probabilities, Grad-CAM overlay, clinical SHAP values.

    ``bundle`` is a :class:`tasks.scored_model.Bundle` (e.g. from ``load_bundle``). Writes
    ``out_dir/gradcam.png``, ``out_dir/shap.png`` and ``out_dir/explanation.json`` (each
    atomically) and returns the JSON's content. The explained level is the predicted one.
    ``background`` holds raw ``age, sex, localization`` rows for SHAP (e.g.
    :func:`training_background`); without it :func:`neutral_background` is used.
    """
    from tasks.images import load_image, normalize_for_mobilenet
    from tasks.model import calibrated_single_view, single_view
    from tasks.scored_model import json_safe, predict_risk

    image = Path(image)
    raw = validate_case(bundle.encoder, age, sex, site)
    if not image.is_file():
        raise DataError(f"image {image} not found (or not a file): give the path of a JPEG or PNG file")
    pixels = load_image(image, bundle.summary.image_size)
    normalized = normalize_for_mobilenet(pixels)
    clinical = bundle.encoder.transform(pd.DataFrame([raw]))[0]

    assignment = bundle_assignment(bundle)
    # The probabilities are the saved model's (every test-time view, calibrated), as served;
    # Grad-CAM explains the predicted level on the single view, SHAP its calibrated probability.
    probabilities = predict_risk(bundle, pixels[None], clinical[None])[0]
    predicted = int(bundle.called_levels(probabilities[None])[0])
    cam = risk_level_gradcam(
        single_view(bundle.model),
        normalized,
        clinical,
        assignment,
        level_index=predicted,
        last_conv_layer_name=params.gradcam_layer,
    )
    level = RISK_LEVELS[predicted]
    if background is None:
        background_source = "neutral: median training age with every sex and site"
        background = neutral_background(bundle.encoder)
    else:
        background_source = f"given: {len(background)} case(s)"
    shap_result = clinical_shap(
        risk_predictor(calibrated_single_view(bundle.model), assignment),
        normalized,
        raw,
        background,
        bundle.encoder,
        cam.level_index,
        background_size=params.shap_background,
        seed=params.seed,
    )

    payload: dict[str, Any] = {
        "image": str(image),
        "clinical": raw,
        "probabilities": _probabilities_dict(probabilities),
        "risk_level": level,
        "explained_level": level,
        "shap": {**shap_result, "background": background_source},
        "gradcam": heatmap_stats(cam.heatmap, pixels.shape[:2]),
    }
    if bundle.operating_point:
        threshold = float(bundle.operating_point["threshold"])
        payload["threshold"] = threshold
        payload["refer"] = bool(probabilities[_HIGH] >= threshold)
    payload = json_safe(payload)

    out_dir = Path(out_dir)
    save_overlay(pixels, cam.heatmap, out_dir / CASE_GRADCAM_FILE, params.overlay_alpha, level=level)
    _save_figure(case_shap_figure(shap_result, raw, level=level), out_dir / CASE_SHAP_FILE)
    write_json(out_dir / CASE_EXPLANATION_FILE, payload)
    return payload

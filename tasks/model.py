"""The multimodal risk model: a MobileNetV2 image branch and a dense clinical branch, fused.

The backbone is built on the outer model's image input (``input_tensor=``), so its layers,
``out_relu`` included, sit in the outer graph where Grad-CAM can reach them.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from pathlib import Path

import keras
from keras import layers

from tasks.errors import SkinriskError
from tasks.params import TrainParams

LAST_CONV_LAYER = "out_relu"  # MobileNetV2's last convolutional activation (Grad-CAM target)
POOLED_LAYER = "image_pool"  # the pooled image embedding (monitoring, SMOTE head phase)
OUTPUT_LAYER = "probabilities"
AUX_OUTPUT_LAYER = "dx_probabilities"  # the auxiliary diagnosis head (training only)
BASE_MODEL = "skinrisk"  # the single-view model inside the saved inference model
_IMAGENET_SIZES = (96, 128, 160, 192, 224)


# The no-top MobileNetV2 ImageNet weights (alpha 1.0) travel with the project, so `weights:
# imagenet` means the same file on every machine, online or not (tasks/weights/README.md: source,
# licence). Convolution weights do not depend on the input size: one file serves every size.
BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "mobilenet_v2_1.0_no_top.h5"
BUNDLED_WEIGHTS_SHA256 = "71e4c4ec4aa24c9c951b9265d6de42e1336dcf614c2214fa6a989208615e232c"
BUNDLED_ALPHA = 1.0


def bundled_weights() -> Path:
    """The bundled weights file, verified against its sha256; a clear error if missing or altered."""
    path = BUNDLED_WEIGHTS
    fix = "restore it from the repository (`git checkout -- tasks/weights`) or reinstall skinrisk"
    if not path.is_file():
        raise SkinriskError(
            f"the bundled MobileNetV2 ImageNet weights {path} are missing (expected sha256 "
            f"{BUNDLED_WEIGHTS_SHA256}): {fix}"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != BUNDLED_WEIGHTS_SHA256:
        raise SkinriskError(
            f"the bundled MobileNetV2 ImageNet weights {path} are corrupt: sha256 {digest}, expected "
            f"{BUNDLED_WEIGHTS_SHA256}; {fix}"
        )
    return path


def imagenet_weights_file(alpha: float, image_size: int) -> Path:
    """Where Keras keeps (or would download) the no-top ImageNet weights for this shape."""
    rows = image_size if image_size in _IMAGENET_SIZES else 224
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    return home / "models" / f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"


def _backbone(image_input, params: TrainParams, image_size: int) -> keras.Model:
    """MobileNetV2 on ``image_input`` with ``train.weights``: ImageNet's (bundled, Keras' cache or its
    download), a weights file's, or random ones."""
    weights: str | None = params.weights
    if weights == "none":
        weights = None
    elif weights == "imagenet" and params.alpha == BUNDLED_ALPHA:
        weights = str(bundled_weights())
    elif weights == "imagenet":  # other widths: Keras' cache, or its download
        cached = imagenet_weights_file(params.alpha, image_size)
        if cached.exists():  # read KERAS_HOME now: Keras itself reads it only once, at import
            weights = str(cached)
    elif not Path(weights).exists():
        raise SkinriskError(f"train.weights={weights!r}: no such file; use 'imagenet', 'none' or a weights file path")
    try:
        # input_shape alongside input_tensor, or Keras assumes 224 x 224 for the weights file name.
        return keras.applications.MobileNetV2(
            input_tensor=image_input,
            input_shape=(image_size, image_size, 3),
            include_top=False,
            weights=weights,
            alpha=params.alpha,
        )
    except Exception as exc:  # a failed download or an unreadable file: Keras and h5py raise many types
        if weights is None:
            raise
        if weights != "imagenet":
            raise SkinriskError(f"cannot load backbone weights from {weights}: {exc}") from exc
        raise SkinriskError(
            f"MobileNetV2 ImageNet weights (alpha {params.alpha}) could not be loaded: {exc}. "
            f"Keras looks for {cached}; put the file there, point KERAS_HOME at a folder whose "
            "models/ holds it (on the team machines: KERAS_HOME=../shared/weights/keras), "
            "give train.weights a weights file path, or set train.weights=none to train from "
            "random weights on purpose."
        ) from exc


def build_model(
    image_size: int, n_clinical: int, n_classes: int, params: TrainParams, *, aux_classes: int = 0
) -> keras.Model:
    """The fused single-view model: inputs ``image`` (normalized to [-1, 1]) and ``clinical``;
    softmax out (and, with ``aux_classes``, the auxiliary diagnosis softmax as a second output)."""
    keras.utils.set_random_seed(params.seed)
    image_input = keras.Input((image_size, image_size, 3), name="image")
    clinical_input = keras.Input((n_clinical,), name="clinical")

    backbone = _backbone(image_input, params, image_size)
    # A pretrained backbone is frozen for the head phase; a random one must learn from the start
    # (frozen, its BatchNorm layers in inference mode would pass on next to nothing).
    backbone.trainable = params.weights == "none"
    if params.weights == "none":
        # Keras' MobileNetV2 tracks BatchNorm statistics with momentum 0.999, tuned for ImageNet's
        # million steps; from scratch on a few thousand images they would stay at their initial
        # values, and inference would run on statistics the weights never saw.
        for layer in backbone.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = 0.9
    image = layers.GlobalAveragePooling2D(name=POOLED_LAYER)(backbone.output)
    head = fusion_head(n_clinical, n_classes, params, embedding_size=int(image.shape[-1]), aux_classes=aux_classes)
    outputs = head([image, clinical_input])
    return keras.Model([image_input, clinical_input], outputs, name=BASE_MODEL)


def fusion_head(
    n_clinical: int, n_classes: int, params: TrainParams, embedding_size: int, *, aux_classes: int = 0
) -> keras.Model:
    """Everything after the pooled image embedding: image dense, clinical branch, fusion.

    A model of its own so the head can also be run on cached embeddings (SHAP with the image
    held fixed, monitoring). With ``aux_classes`` it has a second softmax, ``AUX_OUTPUT_LAYER``
    over the diagnoses, trained beside the risk levels (an auxiliary task) and not served.
    """
    embedding = keras.Input((embedding_size,), name="image_embedding")
    clinical = keras.Input((n_clinical,), name="clinical_features")
    x = layers.Dropout(params.dropout, name="image_dropout")(embedding)
    x = layers.Dense(params.image_units, activation="relu", name="image_dense")(x)
    c = layers.Dense(params.clinical_units, activation="relu", name="clinical_dense_1")(clinical)
    c = layers.Dense(max(2, params.clinical_units // 2), activation="relu", name="clinical_dense_2")(c)
    fused = layers.Concatenate(name="fusion")([x, c])
    fused = layers.Dense(params.fusion_units, activation="relu", name="fusion_dense")(fused)
    fused = layers.Dropout(params.dropout, name="fusion_dropout")(fused)
    outputs = [layers.Dense(n_classes, activation="softmax", name=OUTPUT_LAYER)(fused)]
    if aux_classes:
        outputs.append(layers.Dense(aux_classes, activation="softmax", name=AUX_OUTPUT_LAYER)(fused))
    return keras.Model([embedding, clinical], outputs if aux_classes else outputs[0], name="fusion_head")


def head_of(model: keras.Model) -> keras.Model:
    """The fusion head (embedding + clinical -> probabilities), its served output only."""
    head = single_view(model).get_layer("fusion_head")
    if len(head.outputs) > 1:
        return keras.Model(head.inputs, head.outputs[0], name="fusion_head_served")
    return head


def _with_head(model: keras.Model, head: keras.Model) -> keras.Model:
    """``model``'s backbone and pooled embedding feeding ``head`` (weights shared)."""
    pooled = model.get_layer(POOLED_LAYER).output
    return keras.Model(model.inputs, head([pooled, model.inputs[1]]), name=BASE_MODEL)


def served_output(model: keras.Model) -> keras.Model:
    """The training model without its auxiliary output: the single-view model that is served.

    The auxiliary softmax is left out of the graph entirely (not only of the outputs), so the
    served model has one softmax ``Dense``, which Grad-CAM's logit twin relies on.
    """
    if len(model.outputs) == 1:
        return model
    head = model.get_layer("fusion_head")
    return _with_head(model, keras.Model(head.inputs, head.outputs[0], name="fusion_head"))


_CALIBRATED_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def calibrated_single_view(model: keras.Model) -> keras.Model:
    """The single-view model with the saved model's temperature inside its fusion head: what SHAP
    explains (the clinical variables' effect on the calibrated probabilities, image fixed).

    Built once per loaded model, so the explainers' traced functions are reused across cases.
    """
    temperature = scoring_settings(model)["temperature"]
    if temperature == 1.0:  # nothing to build (and a cached base could keep its key alive)
        return single_view(model)
    if model not in _CALIBRATED_VIEWS:
        base = single_view(model)
        head = head_of(base)
        calibrated = Temperature(temperature, name="temperature")(head.output)
        _CALIBRATED_VIEWS[model] = _with_head(base, keras.Model(head.inputs, calibrated, name="fusion_head"))
    return _CALIBRATED_VIEWS[model]


def single_view(model: keras.Model) -> keras.Model:
    """The single-view model (where ``out_relu`` and the pooled embedding live) of a saved model.

    A model saved by the train stage wraps it in test-time views and temperature scaling
    (:func:`inference_model`); a bare model (tests, older versions) is its own single view.
    """
    try:
        inner = model.get_layer(BASE_MODEL)
    except ValueError:
        return model
    return inner if isinstance(inner, keras.Model) else model


def set_finetune(model: keras.Model, from_block: int) -> int:
    """Make MobileNetV2 blocks ``from_block``.. and the last conv trainable; returns their count.

    BatchNormalization layers stay frozen (inference statistics), as is usual when fine-tuning
    with small batches.
    """
    trainable, started = 0, False
    for layer in model.layers:
        started = started or layer.name.startswith(f"block_{from_block}_")
        if not layer.name.startswith(("block_", "Conv", "expanded_conv", "bn_Conv", "out_relu")):
            continue  # not the backbone's (the inputs, the pooling, the fusion head)
        layer.trainable = started and not isinstance(layer, layers.BatchNormalization)
        trainable += int(layer.trainable and bool(layer.weights))
    return trainable


def embedding_model(model: keras.Model) -> keras.Model:
    """Image -> pooled backbone embedding (single view), sharing the trained weights."""
    model = single_view(model)
    return keras.Model(model.get_layer("image").output, model.get_layer(POOLED_LAYER).output)


def sparse_focal_loss(gamma: float, n_classes: int):
    """Focal loss (Lin et al., 2017) on integer labels, to down-weight easy majority cases."""
    focal = keras.losses.CategoricalFocalCrossentropy(gamma=gamma, alpha=1.0)

    def loss(y_true, y_pred):
        y_true = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), n_classes)
        return focal(y_true, y_pred)

    return loss


# ---------------------------------------------------------------------------------------------
# The saved inference model: test-time views and temperature scaling inside the graph, so every
# caller (evaluate, serving, triage, explain, monitoring, promotion) scores the same probabilities.

TTA_VIEWS = {"none": 1, "flips": 4, "dihedral": 8}


@keras.saving.register_keras_serializable(package="skinrisk")
class TestTimeViews(layers.Layer):
    """Image batch (B, H, W, C) -> the views stacked on the batch axis (V * B, H, W, C).

    ``flips``: as is, mirrored left-right, top-bottom, and both (a 180-degree turn);
    ``dihedral``: those and their transposes (the 90-degree turns and the diagonal mirrors).
    Dermoscopic images have no up or left, so each view is as valid as the original.
    """

    def __init__(self, views: str = "flips", **kwargs) -> None:
        super().__init__(**kwargs)
        if views not in TTA_VIEWS:
            raise ValueError(f"views must be one of {sorted(TTA_VIEWS)}, got {views!r}")
        self.views = views

    def call(self, images):
        ops = keras.ops
        stack = [images]
        if self.views != "none":
            stack += [ops.flip(images, axis=2), ops.flip(images, axis=1), ops.flip(ops.flip(images, axis=1), axis=2)]
        if self.views == "dihedral":
            stack += [ops.transpose(view, (0, 2, 1, 3)) for view in stack]
        return ops.concatenate(stack, axis=0)

    def get_config(self) -> dict:
        return {**super().get_config(), "views": self.views}


class _PerViewLayer(layers.Layer):
    """A layer that knows how many test-time views are stacked on the batch axis."""

    def __init__(self, n_views: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_views = int(n_views)

    def get_config(self) -> dict:
        return {**super().get_config(), "n_views": self.n_views}


@keras.saving.register_keras_serializable(package="skinrisk")
class RepeatViews(_PerViewLayer):
    """Clinical batch (B, F) -> repeated once per view, in the order of :class:`TestTimeViews`."""

    def call(self, features):
        return keras.ops.tile(features, (self.n_views, 1))


@keras.saving.register_keras_serializable(package="skinrisk")
class ViewMean(_PerViewLayer):
    """(V * B, K) probabilities -> their mean over the V views (B, K)."""

    def call(self, probs):
        ops = keras.ops
        return ops.mean(ops.reshape(probs, (self.n_views, -1, ops.shape(probs)[-1])), axis=0)


@keras.saving.register_keras_serializable(package="skinrisk")
class Temperature(layers.Layer):
    """Temperature scaling (Guo et al., 2017) of softmax outputs: ``softmax(log(p) / T)``.

    ``log(softmax(z)) = z - logsumexp(z)``, so this equals ``softmax(z / T)`` of the logits.
    """

    def __init__(self, temperature: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def call(self, probs):
        ops = keras.ops
        return ops.softmax(ops.log(ops.clip(probs, 1e-12, 1.0)) / self.temperature, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "temperature": self.temperature}


def _views_of(base: keras.Model, views: str):
    """New ``image`` and ``clinical`` inputs and ``base``'s single-view probabilities of every
    test-time view of them, stacked on the batch axis (V * B, K)."""
    image = keras.Input(base.inputs[0].shape[1:], name="image")
    clinical = keras.Input(base.inputs[1].shape[1:], name="clinical")
    image_views = TestTimeViews(views, name="test_time_views")(image)
    clinical_views = RepeatViews(TTA_VIEWS[views], name="repeat_views")(clinical)
    return image, clinical, base([image_views, clinical_views])


def stacked_view_model(base: keras.Model, views: str) -> keras.Model:
    """``base`` over every test-time view, not averaged: what the temperature is fitted on."""
    image, clinical, probs = _views_of(base, views)
    return keras.Model([image, clinical], probs)


def inference_model(base: keras.Model, views: str = "flips", temperature: float = 1.0) -> keras.Model:
    """``base`` (single view) scored over its test-time views, each temperature-scaled, averaged."""
    image, clinical, probs = _views_of(base, views)
    probs = Temperature(temperature, name="temperature")(probs)
    probs = ViewMean(TTA_VIEWS[views], name=OUTPUT_LAYER)(probs)
    return keras.Model([image, clinical], probs, name="skinrisk_inference")


def scoring_settings(model: keras.Model) -> dict:
    """``{"views", "temperature"}`` of a saved model (``none`` and 1.0 for a bare one)."""
    try:
        views = model.get_layer("test_time_views").views
        temperature = model.get_layer("temperature").temperature
    except ValueError:
        return {"views": "none", "temperature": 1.0}
    return {"views": views, "temperature": temperature}


def load_model(path: Path) -> keras.Model:
    """A saved ``.keras`` model, for inference (not compiled)."""
    path = Path(path)
    if not path.exists():
        raise SkinriskError(f"model file {path} not found: run `skinrisk train` first")
    return keras.models.load_model(path, compile=False)

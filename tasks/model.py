"""The multimodal risk model: a MobileNetV2 image branch and a dense clinical branch, fused.

The backbone is built on the outer model's image input (``input_tensor=``), so its layers,
``out_relu`` included, sit in the outer graph where Grad-CAM can reach them.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
from keras import layers

from tasks.errors import SkinriskError
from tasks.params import TrainParams

LAST_CONV_LAYER = "out_relu"  # MobileNetV2's last convolutional activation (Grad-CAM target)
POOLED_LAYER = "image_pool"  # the pooled image embedding (monitoring, SMOTE head phase)
OUTPUT_LAYER = "probabilities"
_IMAGENET_SIZES = (96, 128, 160, 192, 224)


def imagenet_weights_file(alpha: float, image_size: int) -> Path:
    """Where Keras keeps (or would download) the no-top ImageNet weights for this shape."""
    rows = image_size if image_size in _IMAGENET_SIZES else 224
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    return home / "models" / f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"


def _backbone(image_input, params: TrainParams, image_size: int) -> keras.Model:
    weights = params.weights
    # input_shape alongside input_tensor, or Keras assumes 224 x 224 for the weights file name.
    shape = (image_size, image_size, 3)
    if weights == "none":
        return keras.applications.MobileNetV2(
            input_tensor=image_input,
            input_shape=shape,
            include_top=False,
            weights=None,
            alpha=params.alpha,
        )
    if weights == "imagenet":
        cached = imagenet_weights_file(params.alpha, image_size)
        if cached.exists():  # read KERAS_HOME now: Keras itself reads it only once, at import
            return _load_backbone_weights(image_input, shape, params.alpha, cached)
        try:
            return keras.applications.MobileNetV2(
                input_tensor=image_input,
                input_shape=shape,
                include_top=False,
                weights="imagenet",
                alpha=params.alpha,
            )
        except Exception as exc:  # offline download failures surface as many exception types
            raise SkinriskError(
                f"MobileNetV2 ImageNet weights (alpha {params.alpha}) could not be loaded: {exc}. "
                f"Keras looks for {cached}; put the file there, point KERAS_HOME at a folder whose "
                "models/ holds it (on the team machines: KERAS_HOME=../shared/weights/keras), "
                "give train.weights a weights file path, or set train.weights=none to train from "
                "random weights on purpose."
            ) from exc
    path = Path(weights)
    if not path.exists():
        raise SkinriskError(f"train.weights={weights!r}: no such file; use 'imagenet', 'none' or a weights file path")
    return _load_backbone_weights(image_input, shape, params.alpha, path)


def _load_backbone_weights(image_input, shape: tuple[int, int, int], alpha: float, path: Path) -> keras.Model:
    backbone = keras.applications.MobileNetV2(
        input_tensor=image_input, input_shape=shape, include_top=False, weights=None, alpha=alpha
    )
    try:
        backbone.load_weights(str(path))
    except Exception as exc:
        raise SkinriskError(f"cannot load backbone weights from {path}: {exc}") from exc
    return backbone


def build_model(image_size: int, n_clinical: int, n_classes: int, params: TrainParams) -> keras.Model:
    """The fused model: inputs ``image`` (normalized to [-1, 1]) and ``clinical``; softmax out."""
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
    head = fusion_head(n_clinical, n_classes, params, embedding_size=int(image.shape[-1]))
    outputs = head([image, clinical_input])
    return keras.Model([image_input, clinical_input], outputs, name="skinrisk")


def fusion_head(n_clinical: int, n_classes: int, params: TrainParams, embedding_size: int) -> keras.Model:
    """Everything after the pooled image embedding: image dense, clinical branch, fusion.

    A model of its own so the head can also be trained on cached embeddings (SMOTE phase).
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
    outputs = layers.Dense(n_classes, activation="softmax", name=OUTPUT_LAYER)(fused)
    return keras.Model([embedding, clinical], outputs, name="fusion_head")


def head_of(model: keras.Model) -> keras.Model:
    return model.get_layer("fusion_head")


def set_finetune(model: keras.Model, from_block: int) -> int:
    """Make MobileNetV2 blocks ``from_block``.. and the last conv trainable; returns their count.

    BatchNormalization layers stay frozen (inference statistics), as is usual when fine-tuning
    with small batches.
    """
    trainable = 0
    started = False
    for layer in model.layers:
        if layer.name == "fusion_head":
            continue
        if layer.name.startswith(f"block_{from_block}_"):
            started = True
        is_backbone = layer.name.startswith(("block_", "Conv", "expanded_conv", "bn_Conv", "out_relu"))
        if not is_backbone:
            continue
        layer.trainable = started and not isinstance(layer, layers.BatchNormalization)
        trainable += int(layer.trainable and bool(layer.weights))
    return trainable


def embedding_model(model: keras.Model) -> keras.Model:
    """Image -> pooled backbone embedding, sharing the trained weights."""
    return keras.Model(model.get_layer("image").output, model.get_layer(POOLED_LAYER).output)


def sparse_focal_loss(gamma: float, n_classes: int):
    """Focal loss (Lin et al., 2017) on integer labels, to down-weight easy majority cases."""
    focal = keras.losses.CategoricalFocalCrossentropy(gamma=gamma, alpha=1.0)

    def loss(y_true, y_pred):
        y_true = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), n_classes)
        return focal(y_true, y_pred)

    return loss


def load_model(path: Path) -> keras.Model:
    """A saved ``.keras`` model, for inference (not compiled)."""
    path = Path(path)
    if not path.exists():
        raise SkinriskError(f"model file {path} not found: run `skinrisk train` first")
    return keras.models.load_model(path, compile=False)

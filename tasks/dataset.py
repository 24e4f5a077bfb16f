"""The training input pipeline: processed arrays -> normalized, augmented ``tf.data`` batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.errors import DataError
from tasks.params import AugmentParams

IMAGES_FILE = "images.npy"  # every preprocessed image; each split's .npz names its rows


@dataclass(frozen=True)
class SplitArrays:
    """One split of the preprocess output, in memory."""

    images: np.ndarray  # uint8, N x S x S x 3
    clinical: np.ndarray  # float32, N x F
    risk: np.ndarray  # int64 index into RISK_LEVELS
    dx: np.ndarray  # int64 index into DIAGNOSES
    image_id: np.ndarray  # str

    def __len__(self) -> int:
        return len(self.image_id)

    def labels(self, target: str) -> np.ndarray:
        """Class indices for the model's target (``risk`` levels or ``dx`` diagnoses)."""
        return self.risk if target == "risk" else self.dx


def load_split(processed_dir: Path, split: str) -> SplitArrays:
    """Load one split of the preprocess output (``<split>.npz`` and its rows of ``images.npy``).

    Output of earlier versions, with the images inside ``<split>.npz``, loads too.
    """
    path = Path(processed_dir) / f"{split}.npz"
    if not path.exists():
        raise DataError(f"{path} not found: run `skinrisk preprocess` first")
    with np.load(path, allow_pickle=False) as data:
        fields = {key: data[key] for key in SplitArrays.__dataclass_fields__ if key in data.files}
        rows = data["image_rows"] if "image_rows" in data.files else None
    if rows is not None:
        images_path = Path(processed_dir) / IMAGES_FILE
        if not images_path.exists():
            raise DataError(
                f"{images_path} not found: the preprocess output is incomplete; rerun `skinrisk preprocess`"
            )
        stored = np.load(images_path, mmap_mode="r")
        if len(rows) and rows.max() >= len(stored):
            raise DataError(
                f"{path} names row {rows.max()} of {images_path}, which holds {len(stored)}: "
                "the files come from different preprocess runs; rerun `skinrisk preprocess`"
            )
        fields["images"] = stored[rows]  # a copy in memory: the file stays closed to writes
    missing = set(SplitArrays.__dataclass_fields__) - set(fields)
    if missing:
        raise DataError(f"{path} lacks {sorted(missing)}: not a preprocess output; rerun `skinrisk preprocess`")
    arrays = SplitArrays(**fields)
    if len(arrays) == 0:
        raise DataError(f"{path} holds no images: the {split} split is empty")
    return arrays


def build_augmenter(params: AugmentParams, seed: int):
    """Random geometric and photometric changes for training images in [0, 255]."""
    import keras

    layers: list = []
    if params.flip:
        layers.append(keras.layers.RandomFlip("horizontal_and_vertical", seed=seed))
    if params.rotation:
        layers.append(keras.layers.RandomRotation(params.rotation, fill_mode="reflect", seed=seed + 1))
    if params.zoom:
        layers.append(keras.layers.RandomZoom(params.zoom, fill_mode="reflect", seed=seed + 2))
    if params.brightness:
        layers.append(keras.layers.RandomBrightness(params.brightness, value_range=(0, 255), seed=seed + 3))
    if params.contrast:
        layers.append(keras.layers.RandomContrast(params.contrast, seed=seed + 4))
    return keras.Sequential(layers, name="augment") if layers else None


def make_dataset(
    arrays: SplitArrays,
    labels: np.ndarray,
    *,
    batch_size: int,
    training: bool,
    augment: AugmentParams | None = None,
    seed: int = 0,
    sample_weights: np.ndarray | None = None,
):
    """Batches of ``({"image": x, "clinical": c}, y[, w])`` with MobileNetV2 normalization.

    Training batches are shuffled (reshuffled each epoch) and augmented; evaluation batches keep
    the stored order and are never augmented. Augmentation runs batched on the uint8 arrays in
    memory, in parallel with the model step (prefetch).
    """
    import tensorflow as tf

    tensors: tuple = ({"image": arrays.images, "clinical": arrays.clinical}, labels)
    if sample_weights is not None:
        tensors = (*tensors, sample_weights.astype(np.float32))
    dataset = tf.data.Dataset.from_tensor_slices(tensors)
    if training:
        dataset = dataset.shuffle(len(arrays), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=False)
    augmenter = build_augmenter(augment, seed) if (training and augment is not None) else None

    def prepare(features, *rest):
        images = tf.cast(features["image"], tf.float32)
        if augmenter is not None:
            images = tf.clip_by_value(augmenter(images, training=True), 0.0, 255.0)
        if training and augment is not None and augment.rot90:
            # Transposing half the (square) images, after the random flips, gives every one of the
            # eight quarter-turn and mirror views with equal chance.
            transpose = tf.random.uniform([tf.shape(images)[0]], seed=seed + 5) < 0.5
            images = tf.where(transpose[:, None, None, None], tf.transpose(images, (0, 2, 1, 3)), images)
        images = images / 127.5 - 1.0  # as tasks.images.normalize_for_mobilenet
        return ({"image": images, "clinical": features["clinical"]}, *rest)

    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training)
    return dataset.prefetch(tf.data.AUTOTUNE)

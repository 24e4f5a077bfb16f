"""Images as model input, identically for training, serving and explaining: the decoding in
``tasks.decoding`` (which the decoding workers import without NumPy), as NumPy arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.decoding import resized_pixels


def load_image(source: Path | bytes, size: int) -> np.ndarray:
    """Decode an image file (or its bytes) to an RGB ``uint8`` array of shape (size, size, 3).

    See ``tasks.decoding`` for how: the whole frame, antialiased bilinear resize, large JPEGs
    decoded at a reduced DCT scale first.
    """
    return np.frombuffer(resized_pixels(source, size), dtype=np.uint8).reshape(size, size, 3)


def decode_shard(paths: list[str], size: int) -> np.ndarray:
    """``paths`` decoded and resized to ``size``, stacked into one uint8 array, in order (what a
    Dask worker returns)."""
    return np.stack([load_image(Path(p), size) for p in paths])


def normalize_for_mobilenet(images: np.ndarray) -> np.ndarray:
    """Scale uint8 pixels to [-1, 1], the range MobileNetV2 was trained on."""
    return images.astype(np.float32) / 127.5 - 1.0

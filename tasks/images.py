"""Decoding dermoscopic images into model input, identically for training, serving and explaining."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tasks.errors import DataError

Image.MAX_IMAGE_PIXELS = 100_000_000  # real dermoscopy is large; refuse only absurd sizes


def load_image(source: Path | bytes, size: int) -> np.ndarray:
    """Decode an image file (or its bytes) to an RGB ``uint8`` array of shape (size, size, 3).

    The whole frame is resized to a square (no crop: lesions are centred but not always small).
    JPEGs are decoded at a reduced DCT scale when they are much larger than ``size``, which is
    several times faster and, followed by the antialiased resize, visually the same.
    """
    return np.asarray(resized_image(source, size), dtype=np.uint8)


def resized_image(source: Path | bytes, size: int) -> Image.Image:
    """What :func:`load_image` returns, still as a Pillow image (``tobytes()`` is its pixels)."""
    where = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise DataError(f"cannot open image {where}: {exc.strerror}") from exc
    try:
        with handle, Image.open(handle) as image:
            image.draft("RGB", (size, size))
            image.load()
            # convert() copies even when the mode is already RGB (most JPEGs): skip that copy
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return rgb.resize((size, size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image {where}: {exc}") from exc


def normalize_for_mobilenet(images: np.ndarray) -> np.ndarray:
    """Scale uint8 pixels to [-1, 1], the range MobileNetV2 was trained on."""
    return images.astype(np.float32) / 127.5 - 1.0

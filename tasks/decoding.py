"""Decoding an image file into model-input pixels: the work the decoding workers do.

Pillow and the standard library only, so a worker process starts in a tenth of a second (NumPy
alone takes 0.15-0.25 s to import); ``tasks.images`` wraps it in NumPy for every other path.

Pixels: the whole frame (no crop: lesions are centred but not always small), resized to a square
with Pillow's antialiased bilinear filter; a JPEG at least twice ``size`` is decoded at the reduced
DCT scale Pillow's ``draft`` chooses, several times faster and, after that resize, visually the same.
A colour JPEG skips ``Image.open``, which parses every marker segment in Python, and goes straight
to the same libjpeg decoder with the same arguments: the same pixels (``tests/code/test_images.py``
compares them byte for byte), a fifth of the decoding time saved. Anything else (PNG, TIFF,
grayscale or CMYK JPEGs, corrupt ones) goes through ``Image.open``, which also words the errors.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tasks.errors import DataError

Image.MAX_IMAGE_PIXELS = 100_000_000  # real dermoscopy is large; refuse only absurd sizes

# Start-of-frame markers of the Huffman-coded 8-bit JPEGs Pillow decodes: baseline, extended, progressive
START_OF_FRAME = (0xC0, 0xC1, 0xC2)
START_OF_SCAN = 0xDA
STANDALONE_MARKERS = frozenset([0x01, 0xD8, *range(0xD0, 0xD8)])  # no length field follows


def resized_pixels(source: str | Path | bytes, size: int) -> bytes:
    """An image file (or its bytes) decoded and resized to ``size`` x ``size``, as raw RGB bytes
    (row by row, ``size * size * 3``). Raises :class:`DataError` naming the file when it cannot be
    read or decoded."""
    if isinstance(source, bytes):
        data, where = source, "image bytes"
    else:
        where = str(source)
        try:
            with open(source, "rb", buffering=0) as handle:  # unbuffered: one copy, half the time
                data = handle.readall()
        except OSError as exc:
            raise DataError(f"cannot open image {where}: {exc.strerror}") from exc
    image = _jpeg_decoded(data, size) or _pillow_decoded(data, size, where)
    return image.resize((size, size), Image.Resampling.BILINEAR).tobytes()


def draft_scale(width: int, height: int, size: int) -> int:
    """The DCT scale denominator Pillow's ``JpegImageFile.draft(mode, (size, size))`` decodes at."""
    fits = min(width // size, height // size)
    return next(scale for scale in (8, 4, 2, 1) if fits >= scale or scale == 1)


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` from a JPEG's start-of-frame segment, walking the marker
    segments as libjpeg does; ``None`` when ``data`` is not such a JPEG or the walk goes wrong."""
    if not data.startswith(b"\xff\xd8"):
        return None
    position, end = 2, len(data) - 9
    while position < end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
        elif marker in STANDALONE_MARKERS:
            position += 2
        elif marker in START_OF_FRAME:
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            return width, height, data[position + 9]
        elif marker == START_OF_SCAN:  # a scan before any frame: not a JPEG Pillow would open
            return None
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


def _jpeg_decoded(data: bytes, size: int) -> Image.Image | None:
    """A colour JPEG decoded as ``Image.open`` + ``draft("RGB", (size, size))`` would decode it;
    ``None`` for anything else, and for any failure (``Image.open`` then decides and words it)."""
    frame = jpeg_frame(data)
    if frame is None:
        return None
    width, height, components = frame
    if components != 3 or not 0 < width * height <= Image.MAX_IMAGE_PIXELS:
        return None
    scale = draft_scale(width, height, size)
    scaled = (-(-width // scale), -(-height // scale))
    try:
        # the decoder Image.open sets up for an RGB JPEG: mode, rawmode, jpegmode, scale, draft flag
        return Image.frombytes("RGB", scaled, data, "jpeg", "RGB", "", scale, 0)
    except (OSError, ValueError, SyntaxError):
        return None


def decode_error_reason(exc: BaseException) -> str:
    """Why Pillow could not decode bytes, without the in-memory buffer's repr it puts in the message."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file Pillow can read (no JPEG, PNG or other known format)"
    return str(exc)


def _pillow_decoded(data: bytes, size: int, where: str) -> Image.Image:
    """``data`` decoded by ``Image.open`` as an RGB image, at the JPEG draft scale for ``size``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (size, size))
            image.load()
            # convert() copies even when the mode is already RGB: skip that copy
            return image if image.mode == "RGB" else image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image {where}: {decode_error_reason(exc)}") from exc


def decode_shard_into(shard: tuple[int, list[str]], size: int, out: str, offset: int) -> int:
    """Decode ``shard = (first_row, paths)`` straight into rows of the ``.npy`` file ``out``,
    whose array data starts ``offset`` bytes into the file.

    The file is shared by all workers (each writes its own rows with ``pwrite``, so threads of one
    process need no lock either), and no pixels travel back to the caller: at HAM10000 scale that
    copy cost as much as the decoding. Each image is written as soon as it is decoded, while its
    bytes are still in the CPU cache: a memory map was slower (faulting in a fresh file page by page
    cost a third of the decoding time), and so was one ``pwritev`` per shard (a fifth slower: the
    shard's rows left the cache before they were written). Returns the rows written.
    """
    first, paths = shard
    row_bytes = size * size * 3
    descriptor = os.open(out, os.O_WRONLY)
    try:
        for row, path in enumerate(paths, start=first):
            os.pwrite(descriptor, resized_pixels(path, size), offset + row * row_bytes)
    finally:
        os.close(descriptor)
    return len(paths)


_shard_counter = None  # in a worker process started by tasks.stages.preprocess.ImageDecoding: the shared counter


def share_shard_counter(counter) -> None:
    """Process-pool initializer: keep the shared shard counter for :func:`decode_claimed_shards`."""
    global _shard_counter
    _shard_counter = counter


def decode_claimed_shards(shards: list[tuple[int, list[str]]], size: int, out: str, offset: int, counter=None) -> int:
    """Decode shards into ``out`` (see :func:`decode_shard_into`), claiming each from a counter
    shared by all the decoding workers (``counter``, or the one this worker process was started
    with), until none is left. Returns the images decoded.

    Claiming keeps every worker busy to the end, whenever it joined: the caller's own thread joins
    once its other work is done. A failure exhausts the counter first, so the others stop after
    their current shard instead of decoding the rest for nothing.
    """
    counter = _shard_counter if counter is None else counter
    decoded = 0
    while True:
        with counter.get_lock():
            index = counter.value
            counter.value = index + 1
        if index >= len(shards):
            return decoded
        try:
            decoded += decode_shard_into(shards[index], size, out, offset)
        except BaseException:
            with counter.get_lock():
                counter.value = len(shards)
            raise

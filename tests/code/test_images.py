"""The fast JPEG path gives Pillow's pixels byte for byte, and everything else still decodes (or fails
with the file named) as Pillow decides."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from tasks.decoding import _jpeg_decoded, draft_scale
from tasks.errors import DataError
from tasks.images import load_image


def pillow_reference(data: bytes, size: int) -> np.ndarray:
    """The decoding this project used before the fast path: Pillow alone."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR))


def textured(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Gradients plus noise: detail at every scale, so a different IDCT or resize would show."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    noise = np.random.default_rng(seed).integers(-40, 40, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str = "JPEG", mode: str = "RGB", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("width", "height", "subsampling", "progressive", "size"),
    [
        (width, height, subsampling, progressive, size)
        for (width, height), subsampling, progressive, size in itertools.product(
            [(600, 450), (601, 449), (200, 150), (97, 131), (2000, 1500)], [0, 1, 2], [False, True], [32, 128]
        )
    ],
)
def test_fast_jpeg_path_gives_pillows_pixels(width, height, subsampling, progressive, size):
    data = encoded(textured(width, height), quality=90, subsampling=subsampling, progressive=progressive)
    assert _jpeg_decoded(data, size) is not None  # the fast path is what is compared here
    ours = load_image(data, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    assert ours.tobytes() == pillow_reference(data, size).tobytes()


def test_fast_path_walks_past_exif_icc_comments_and_restart_markers():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: ignored by both paths, as before
    data = encoded(
        textured(300, 225),
        quality=85,
        exif=exif.tobytes(),
        icc_profile=bytes(range(256)) * 300,  # spans two APP2 segments
        comment=b"dermoscope 7",
        restart_marker_rows=2,
    )
    assert _jpeg_decoded(data, 128) is not None
    assert load_image(data, 128).tobytes() == pillow_reference(data, 128).tobytes()


@pytest.mark.parametrize(
    ("fmt", "mode"), [("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("TIFF", "RGB")]
)
def test_other_images_take_pillows_path(fmt, mode):
    data = encoded(textured(120, 90), fmt, mode)
    assert _jpeg_decoded(data, 64) is None
    assert load_image(data, 64).tobytes() == pillow_reference(data, 64).tobytes()


@pytest.mark.parametrize("width", [16, 127, 128, 255, 256, 511, 512, 1023, 1024, 1025, 4000])
@pytest.mark.parametrize("size", [32, 128])
def test_draft_scale_is_the_one_pillow_chooses(width, size):
    image = Image.open(io.BytesIO(encoded(textured(width, max(8, width * 3 // 4)))))
    image.draft("RGB", (size, size))
    scale = draft_scale(width, max(8, width * 3 // 4), size)
    assert image.size == (-(-width // scale), -(-max(8, width * 3 // 4) // scale))


def test_corrupt_and_truncated_jpegs_fail_naming_the_file(tmp_path):
    data = encoded(textured(200, 150))
    truncated = tmp_path / "ISIC_truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot decode image .*ISIC_truncated\.jpg.*truncated"):
        load_image(truncated, 64)
    garbage = tmp_path / "ISIC_garbage.jpg"
    garbage.write_bytes(b"\xff\xd8" + bytes(range(256)) * 8)
    with pytest.raises(DataError, match=r"cannot decode image .*ISIC_garbage\.jpg"):
        load_image(garbage, 64)
    with pytest.raises(DataError, match="cannot decode image image bytes"):
        load_image(b"not an image", 64)
    with pytest.raises(DataError, match=r"cannot open image .*ISIC_missing\.jpg"):
        load_image(tmp_path / "ISIC_missing.jpg", 64)


def test_every_real_sample_image_gives_pillows_pixels(real_sample):
    paths = sorted(real_sample.glob("HAM10000_images_part_*/*.jpg"))
    assert len(paths) > 7000
    for path in paths:
        data = path.read_bytes()
        assert load_image(path, 128).tobytes() == pillow_reference(data, 128).tobytes(), path.name


def test_decoding_workers_and_the_cli_module_start_light():
    """A spawned decoding worker imports ``tasks.decoding`` and re-imports the ``skinrisk`` script
    (``tasks.cli``): neither may pull in NumPy or pydantic, which would add 0.2 s to every worker."""
    import subprocess
    import sys

    probe = "import sys, tasks.cli, tasks.decoding; print(sorted({'numpy', 'pydantic', 'pandas'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

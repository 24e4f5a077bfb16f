"""A synthetic HAM10000-shaped dataset in the Kaggle layout, for demos, tests and CI without data.

The sample mimics what the pipeline meets in the real release: the published class imbalance,
several images per lesion (so leakage-safe grouped splits matter), class-dependent clinical
metadata with blanks and ``unknown`` values, and 600x450 JPEGs. Each lesion is drawn with a
class-dependent look (colour, size, border, internal structures) that a small CNN can learn but
that overlaps between classes, and ``synthetic_truth.csv`` says where it is, so that Grad-CAM
tests can check that a heatmap points at the lesion.

Everything derives from ``seed``: the metadata and lesion looks from one stream, each image's
view and pixel noise from its own ``(seed, image number)`` stream, so the output is byte-identical
whatever the number of worker processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image

from tasks.atomic import atomic_directory
from tasks.errors import SkinriskError
from tasks.schema import DIAGNOSES, METADATA_COLUMNS, PUBLISHED_DX_COUNTS
from tasks.shards import chunks, map_shards

if TYPE_CHECKING:
    import pandas as pd

Key = TypeVar("Key")

METADATA_FILE = "HAM10000_metadata.csv"
IMAGES_PART_1 = "HAM10000_images_part_1"
IMAGES_PART_2 = "HAM10000_images_part_2"
TRUTH_FILE = "synthetic_truth.csv"
TRUTH_COLUMNS: tuple[str, ...] = ("image_id", "center_x", "center_y", "radius_x", "radius_y")

MIN_IMAGES = 2 * len(DIAGNOSES)  # two images of every class
MIN_SIDE = 32
FIRST_IMAGE_NUMBER = 24306  # ISIC_0024306 is the first image of the real release
JPEG_QUALITY = 90

# The real CSV lists lesions grouped by diagnosis in this order; mimicking it keeps code honest
# about shuffling before it splits.
_ROW_ORDER: tuple[str, ...] = ("bkl", "nv", "df", "mel", "vasc", "bcc", "akiec")

# Images per lesion in the real release (1: 74%, 2: 19%, 3: 6%, 4+: 1%).
_IMAGES_PER_LESION: dict[int, float] = {1: 0.74, 2: 0.19, 3: 0.06, 4: 0.007, 5: 0.002, 6: 0.001}

# Share of images per dx_type within each diagnosis, as published (histopathology for all
# malignancies; follow-up only for naevi; confocal only for benign keratoses).
_DX_TYPE_SHARES: dict[str, dict[str, float]] = {
    "akiec": {"histo": 1.0},
    "bcc": {"histo": 1.0},
    "bkl": {"histo": 0.69, "consensus": 0.245, "confocal": 0.065},
    "df": {"histo": 0.55, "consensus": 0.45},
    "mel": {"histo": 1.0},
    "nv": {"follow_up": 0.55, "histo": 0.375, "consensus": 0.075},
    "vasc": {"histo": 0.5, "consensus": 0.5},
}

# Age (years) mean and spread per diagnosis in the real release; ages are multiples of 5.
_AGE_MEAN_SD: dict[str, tuple[float, float]] = {
    "akiec": (66.5, 11.5),
    "bcc": (67.0, 13.5),
    "bkl": (64.5, 14.0),
    "df": (53.5, 13.0),
    "mel": (60.5, 15.5),
    "nv": (46.5, 15.0),
    "vasc": (53.5, 19.0),
}
_MAX_AGE = 85  # the release caps ages at 85

# Relative frequency of each body site per diagnosis in the real release ("unknown" is drawn
# separately, at its overall rate).
_LOCALIZATION_WEIGHTS: dict[str, dict[str, float]] = {
    "akiec": {
        "face": 35, "lower extremity": 20, "upper extremity": 20, "back": 7, "scalp": 6,
        "chest": 5, "hand": 2, "abdomen": 2, "neck": 2, "ear": 1,
    },
    "bcc": {
        "back": 34, "face": 22, "lower extremity": 12, "chest": 9, "upper extremity": 9,
        "scalp": 4, "neck": 3, "trunk": 3, "abdomen": 2, "foot": 1,
    },
    "bkl": {
        "face": 29, "back": 19, "lower extremity": 17, "upper extremity": 9, "chest": 7,
        "trunk": 5, "abdomen": 5, "scalp": 4, "neck": 3, "hand": 1, "ear": 1,
    },
    "df": {"lower extremity": 68, "upper extremity": 23, "abdomen": 4, "back": 3, "foot": 2},
    "mel": {
        "back": 29, "upper extremity": 19, "lower extremity": 16, "face": 10, "abdomen": 6,
        "chest": 6, "trunk": 5, "foot": 3, "neck": 3, "ear": 2, "scalp": 1,
    },
    "nv": {
        "lower extremity": 23, "back": 22, "trunk": 19, "abdomen": 12, "upper extremity": 10,
        "foot": 4, "chest": 3, "face": 1.5, "neck": 1, "hand": 1, "scalp": 1, "genital": 1,
        "ear": 0.5, "acral": 0.2,
    },
    "vasc": {
        "abdomen": 23, "trunk": 19, "lower extremity": 17, "back": 15, "chest": 6,
        "upper extremity": 6, "face": 6, "hand": 5, "neck": 2, "scalp": 1,
    },
}  # fmt: skip

# Overall rates of missing values in the real release, applied per lesion.
_BLANK_AGE_RATE = 0.005
_UNKNOWN_SEX_RATE = 0.006
_UNKNOWN_LOCALIZATION_RATE = 0.023
_MALE_SHARE = 0.537  # among patients of known sex


@dataclass(frozen=True)
class _DxLook:
    """How lesions of one diagnosis are drawn: the learnable, class-dependent signal."""

    body: tuple[float, float, float]  # RGB of the lesion body
    accent: tuple[float, float, float]  # RGB of its internal structures
    radius: float  # mean radius, as a fraction of the shorter image side
    irregularity: float  # depth of border notches, as a fraction of the radius
    rim: float  # width of the fading rim, as a fraction of the radius
    core_darkening: float  # how much darker the centre is than the rim
    asymmetry: float  # how far the darkest point sits off centre, as a fraction of the radius
    pattern: str  # internal structure, see _pattern_field
    pattern_strength: float


# Loosely after dermoscopy: brown reticular naevi; dark, large, irregular, multicoloured
# melanomas with blue-grey blotches; tan "stuck-on" keratoses with fissures; pink BCCs with
# blue-grey ovoid nests; red, scaly actinic keratoses; red-purple vascular lacunae; and small
# dermatofibromas with a pale central scar. Browns overlap on purpose so that colour alone is
# not enough to separate every class.
_DX_LOOKS: dict[str, _DxLook] = {
    "nv": _DxLook((150, 92, 70), (100, 58, 42), 0.20, 0.04, 0.10, 0.25, 0.05, "network", 0.55),
    "mel": _DxLook((98, 62, 62), (70, 80, 110), 0.29, 0.16, 0.06, 0.40, 0.30, "blotches", 0.75),
    "bkl": _DxLook((160, 116, 88), (112, 76, 56), 0.25, 0.08, 0.05, 0.10, 0.10, "streaks", 0.55),
    "bcc": _DxLook((180, 110, 126), (88, 94, 122), 0.21, 0.08, 0.12, 0.10, 0.10, "dots", 0.85),
    "akiec": _DxLook((188, 100, 96), (232, 206, 198), 0.19, 0.10, 0.22, 0.10, 0.10, "scales", 0.7),
    "vasc": _DxLook((160, 52, 78), (104, 22, 52), 0.14, 0.04, 0.05, 0.15, 0.05, "lacunae", 0.8),
    "df": _DxLook((150, 96, 80), (210, 178, 166), 0.15, 0.05, 0.25, 0.0, 0.05, "scar", 0.8),
}
_SKIN: tuple[float, float, float] = (218.0, 164.0, 152.0)
_SKIN_TONE_SHIFT: tuple[float, float, float] = (1.0, 1.25, 1.35)  # darker skin: more so in G, B
_MAX_RADIUS = 0.37  # of the shorter side, so that even a large lesion sits well inside the frame
_MARGIN = 0.06  # of the shorter side, kept between the lesion's ellipse and the frame
# Skin blotches: (knots down, knots across, contrast) of each octave.
_TEXTURE_OCTAVES: tuple[tuple[int, int, float], ...] = ((4, 5, 0.05), (9, 12, 0.025))


@dataclass(frozen=True)
class _LesionLook:
    """One lesion's appearance, shared by all its images."""

    dx: str
    body: tuple[float, float, float]
    accent: tuple[float, float, float]
    skin: tuple[float, float, float]
    radius_x: float  # fraction of the shorter image side
    radius_y: float
    position: tuple[float, float]  # where in the allowed range of centres, each in [0, 1]
    border_amplitudes: tuple[float, ...]  # harmonics 2, 3, ... of the border notches
    border_phases: tuple[float, ...]
    core_offset: tuple[float, float]  # darkest point, in lesion radii from the centre
    blobs: tuple[tuple[float, float, float], ...]  # (u, v, sigma) in lesion radii
    stripe_angle: float
    stripe_frequency: float


@dataclass(frozen=True)
class _ImageSpec:
    """Everything needed to draw one image, so that workers need no other state."""

    relative_path: str
    seed: int
    number: int  # image number from 0, which seeds its pixel noise
    width: int
    height: int
    look: _LesionLook
    center_x: float  # pixels
    center_y: float
    radius_x: float
    radius_y: float
    rotation: float  # radians, of the border notches and internal structures
    brightness: float
    tint: tuple[float, float, float]
    vignette: float


def synthesize_ham10000(
    out_dir: Path,
    *,
    n_images: int,
    seed: int,
    width: int = 600,
    height: int = 450,
    workers: int = 0,
) -> pd.DataFrame:
    """Write a synthetic HAM10000 sample in the Kaggle layout and return its metadata table.

    ``out_dir`` receives ``HAM10000_metadata.csv`` (columns as the real release, blank ages
    included), ``HAM10000_images_part_1/`` and ``_part_2/`` with ``ISIC_XXXXXXX.jpg`` images of
    ``width`` x ``height`` pixels, and ``synthetic_truth.csv`` giving each lesion's ellipse
    (``center_x, center_y, radius_x, radius_y`` in pixels). The directory appears complete or not
    at all, and replaces a previous one only on success. Classes follow :func:`class_counts`, each
    in at least two lesions (three from 50 images on) so that a grouped split can hold every class.
    ``workers`` (0: one process per core) never changes the files. The returned table has ``age``
    as float with NaN for blanks, as ``pd.read_csv`` would read it.
    """
    # Imported here, not at the top: worker processes import this module to draw images, and
    # pandas would add seconds to each one's start.
    import pandas as pd

    _check_arguments(n_images=n_images, seed=seed, width=width, height=height, workers=workers)
    rows, looks = _plan_metadata(n_images, seed)
    specs = _plan_images([row["image_id"] for row in rows], looks, seed=seed, width=width, height=height)
    metadata = pd.DataFrame(rows, columns=list(METADATA_COLUMNS)).astype({"age": "float64"})
    truth = pd.DataFrame(
        [(Path(s.relative_path).stem, s.center_x, s.center_y, s.radius_x, s.radius_y) for s in specs],
        columns=list(TRUTH_COLUMNS),
    )
    with atomic_directory(Path(out_dir)) as staging:
        (staging / IMAGES_PART_1).mkdir()
        (staging / IMAGES_PART_2).mkdir()
        _render_all(specs, staging, workers=workers or os.cpu_count() or 1)
        metadata.to_csv(staging / METADATA_FILE, index=False, lineterminator="\n")
        truth.to_csv(staging / TRUTH_FILE, index=False, float_format="%.2f", lineterminator="\n")
    return metadata


def class_counts(n_images: int) -> dict[str, int]:
    """Images per class: published proportions by largest remainder, summing to ``n_images``.

    Every class gets at least two images (three from 50 images on), taken from the largest
    classes, so that even a tiny sample contains every class and can be split by lesion.
    """
    total = sum(PUBLISHED_DX_COUNTS.values())
    quotas = {dx: n_images * count / total for dx, count in PUBLISHED_DX_COUNTS.items()}
    counts = {dx: math.floor(q) for dx, q in quotas.items()}
    # Ties broken by the published order (largest class first) so the result is deterministic.
    by_remainder = sorted(quotas, key=lambda dx: quotas[dx] - counts[dx], reverse=True)
    for dx in by_remainder[: n_images - sum(counts.values())]:
        counts[dx] += 1
    floor = 3 if n_images >= 50 else 2
    for dx in PUBLISHED_DX_COUNTS:
        while counts[dx] < floor:
            donor = max(counts, key=lambda d: counts[d])
            counts[donor] -= 1
            counts[dx] += 1
    return counts


def _check_arguments(*, n_images: int, seed: int, width: int, height: int, workers: int) -> None:
    if n_images < MIN_IMAGES:
        raise SkinriskError(
            f"a synthetic sample needs at least {MIN_IMAGES} images (two of each of the "
            f"{len(DIAGNOSES)} classes); got n_images={n_images}"
        )
    if width < MIN_SIDE or height < MIN_SIDE:
        raise SkinriskError(
            f"synthetic images must be at least {MIN_SIDE}x{MIN_SIDE} pixels; got width={width}, height={height}"
        )
    if seed < 0:
        raise SkinriskError(f"the seed must be a non-negative integer; got seed={seed}")
    if workers < 0:
        raise SkinriskError(f"workers must be 0 (one per core) or more; got workers={workers}")


def _plan_metadata(n_images: int, seed: int) -> tuple[list[dict[str, Any]], list[_LesionLook]]:
    """Draw the metadata rows (grouped by lesion) and the look of each row's lesion."""
    rng = np.random.default_rng([seed, 0])
    lesion_dx: list[str] = []
    lesion_sizes: list[int] = []
    for dx, count in sorted(class_counts(n_images).items(), key=lambda i: _ROW_ORDER.index(i[0])):
        sizes = _lesion_sizes(count, rng)
        lesion_dx += [dx] * len(sizes)
        lesion_sizes += sizes
    n_lesions = len(lesion_sizes)

    lesion_numbers = rng.choice(max(7_700, 2 * n_lesions), size=n_lesions, replace=False)
    dx_types = [_choose(rng, _DX_TYPE_SHARES[dx]) for dx in lesion_dx]
    ages: list[float] = [float(np.clip(5 * round(rng.normal(*_AGE_MEAN_SD[dx]) / 5), 0, _MAX_AGE)) for dx in lesion_dx]
    sexes = ["male" if rng.random() < _MALE_SHARE else "female" for _ in lesion_dx]
    sites = [_choose(rng, _LOCALIZATION_WEIGHTS[dx]) for dx in lesion_dx]
    # Missing values as exact quotas of lesions rather than coin flips, so that a sample of a few
    # hundred lesions reliably contains some, at the real rates.
    for index in _quota(rng, n_lesions, _BLANK_AGE_RATE):
        ages[index] = math.nan
    for index in _quota(rng, n_lesions, _UNKNOWN_SEX_RATE):
        sexes[index] = "unknown"
    for index in _quota(rng, n_lesions, _UNKNOWN_LOCALIZATION_RATE):
        sites[index] = "unknown"

    # Image ids are dealt out at random, as in the real release where the images of one lesion
    # are not numbered consecutively.
    image_numbers = rng.permutation(n_images)
    rows = []
    looks = []
    for lesion, size in enumerate(lesion_sizes):
        look = _draw_lesion_look(lesion_dx[lesion], np.random.default_rng([seed, 1, lesion]))
        for _ in range(size):
            number = int(image_numbers[len(rows)])
            rows.append(
                {
                    "lesion_id": f"HAM_{lesion_numbers[lesion]:07d}",
                    "image_id": f"ISIC_{FIRST_IMAGE_NUMBER + number:07d}",
                    "dx": lesion_dx[lesion],
                    "dx_type": dx_types[lesion],
                    "age": ages[lesion],
                    "sex": sexes[lesion],
                    "localization": sites[lesion],
                }
            )
            looks.append(look)
    return rows, looks


def _lesion_sizes(n_images: int, rng: np.random.Generator) -> list[int]:
    """Split a class's images into lesions, at least three lesions where there are 3+ images."""
    min_lesions = min(n_images, 3)
    sizes: list[int] = []
    remaining = n_images
    while remaining > 0:
        still_needed = max(0, min_lesions - len(sizes) - 1)
        size = min(_choose(rng, _IMAGES_PER_LESION), remaining - still_needed)
        sizes.append(size)
        remaining -= size
    return sizes


def _choose(rng: np.random.Generator, weights: Mapping[Key, float]) -> Key:
    """One key of ``weights`` drawn with probability proportional to its value."""
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _quota(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """A random ``round(rate * n)`` of the indices ``0..n-1``."""
    return rng.choice(n, size=math.floor(rate * n + 0.5), replace=False)


def _draw_lesion_look(dx: str, rng: np.random.Generator) -> _LesionLook:
    """One lesion's look: the class look plus per-lesion jitter, so that classes overlap."""
    base = _DX_LOOKS[dx]
    # Mostly a change of darkness, with a little hue: lesions of one class vary like real ones
    # without turning into colours that no class has.
    darkness = rng.normal(1.0, 0.1)
    body = _rgb(np.array(base.body) * darkness + rng.normal(0, 7, 3))
    accent = _rgb(np.array(base.accent) * rng.normal(1.0, 0.08) + rng.normal(0, 7, 3))
    skin_tone = rng.normal(0, 10)  # positive: darker skin
    skin = _rgb(np.array(_SKIN) - skin_tone * np.array(_SKIN_TONE_SHIFT) + rng.normal(0, 4, 3))
    radius = min(base.radius * math.exp(rng.normal(0, 0.18)), _MAX_RADIUS / 1.15)
    elongation = math.exp(rng.normal(0, 0.12))
    harmonics = 6
    amplitudes = np.abs(rng.normal(0, 1, harmonics)) / np.arange(1, harmonics + 1) ** 0.5
    amplitudes *= base.irregularity / amplitudes.sum()
    core_angle = rng.uniform(0, 2 * math.pi)
    core_distance = base.asymmetry * rng.uniform(0.3, 1.0)
    return _LesionLook(
        dx=dx,
        body=body,
        accent=accent,
        skin=skin,
        radius_x=radius * math.sqrt(elongation),
        radius_y=radius / math.sqrt(elongation),
        position=(float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.1, 0.9))),
        border_amplitudes=tuple(float(a) for a in amplitudes),
        border_phases=tuple(float(p) for p in rng.uniform(0, 2 * math.pi, harmonics)),
        core_offset=(core_distance * math.cos(core_angle), core_distance * math.sin(core_angle)),
        blobs=_draw_blobs(base.pattern, rng),
        stripe_angle=float(rng.uniform(0, math.pi)),
        stripe_frequency=float(rng.uniform(5.0, 8.0)),
    )


def _rgb(values: np.ndarray) -> tuple[float, float, float]:
    """A colour as three plain floats in [0, 255] (plain, so specs pickle small and print clearly)."""
    red, green, blue = (float(c) for c in np.clip(values, 0, 255))
    return red, green, blue


def _draw_blobs(pattern: str, rng: np.random.Generator) -> tuple[tuple[float, float, float], ...]:
    """Positions and sizes (in lesion radii) of the round structures of a blob-like pattern."""
    count, sigma = {
        "blotches": (rng.integers(3, 6), (0.14, 0.28)),
        "dots": (rng.integers(10, 22), (0.05, 0.08)),
        "scales": (rng.integers(3, 7), (0.09, 0.16)),
        "lacunae": (rng.integers(8, 16), (0.08, 0.13)),
        "scar": (1, (0.28, 0.36)),
    }.get(pattern, (0, (0.0, 0.0)))
    spread = 0.25 if pattern == "scar" else 0.75  # a dermatofibroma's scar is central
    blobs = []
    for _ in range(int(count)):
        angle = rng.uniform(0, 2 * math.pi)
        distance = spread * math.sqrt(rng.uniform(0, 1))  # uniform over the disc
        blobs.append((distance * math.cos(angle), distance * math.sin(angle), float(rng.uniform(*sigma))))
    return tuple(blobs)


def _plan_images(
    image_ids: Sequence[str], looks: Sequence[_LesionLook], *, seed: int, width: int, height: int
) -> list[_ImageSpec]:
    """Place each image's view of its lesion; sorted by image id, as the truth file lists them."""
    n_images = len(image_ids)
    short_side = min(width, height)
    specs = []
    for image_id, look in zip(image_ids, looks, strict=True):
        number = int(image_id.removeprefix("ISIC_")) - FIRST_IMAGE_NUMBER
        # The view of one lesion changes a little between images: shift, scale, rotation, light.
        rng = np.random.default_rng([seed, 2, number])
        scale = math.exp(rng.normal(0, 0.06))
        radius_x = min(look.radius_x * scale, _MAX_RADIUS) * short_side
        radius_y = min(look.radius_y * scale, _MAX_RADIUS) * short_side
        margin = _MARGIN * short_side
        centre = []
        for extent, radius, position in (
            (width, radius_x, look.position[0]),
            (height, radius_y, look.position[1]),
        ):
            low, high = radius + margin, extent - radius - margin
            shifted = position + rng.normal(0, 0.06)
            centre.append(low + float(np.clip(shifted, 0, 1)) * max(high - low, 0.0))
        part = IMAGES_PART_1 if number < n_images // 2 else IMAGES_PART_2
        specs.append(
            _ImageSpec(
                relative_path=f"{part}/{image_id}.jpg",
                seed=seed,
                number=number,
                width=width,
                height=height,
                look=look,
                # Rounded as the truth file writes them, so the file describes the pixels exactly.
                center_x=round(centre[0], 2),
                center_y=round(centre[1], 2),
                radius_x=round(radius_x, 2),
                radius_y=round(radius_y, 2),
                rotation=float(rng.normal(0, 0.25)),
                brightness=float(rng.normal(1.0, 0.04)),
                tint=tuple(float(t) for t in rng.normal(1.0, 0.02, 3)),
                vignette=float(rng.uniform(0.03, 0.12)),
            )
        )
    return sorted(specs, key=lambda s: s.number)


def _render_all(specs: Sequence[_ImageSpec], staging: Path, *, workers: int) -> None:
    """Draw and write every image, in ``workers`` processes when that is worth it."""
    map_shards(partial(_render_chunk, staging=staging), chunks(specs, workers), workers=workers)


def _render_chunk(specs: Sequence[_ImageSpec], staging: Path) -> None:
    """Draw and write a few images: the unit of work of one worker process."""
    for spec in specs:
        _render_image(spec).save(staging / spec.relative_path, "JPEG", quality=JPEG_QUALITY)


def _render_image(spec: _ImageSpec) -> Image.Image:
    """Draw one image: textured, vignetted skin with the lesion composited on top.

    Pixels are held channel-first (3, height, width): numpy broadcasts over whole rows then,
    several times faster than over a trailing axis of 3.
    """
    rng = np.random.default_rng([spec.seed, 3, spec.number])
    width, height = spec.width, spec.height
    # Lighting is folded into the colours rather than applied to every pixel afterwards (speed).
    light = spec.brightness * np.array(spec.tint, dtype=np.float32)

    skin = np.array(spec.look.skin, dtype=np.float32) * light
    canvas = skin[:, None, None] * _skin_texture(rng, width, height)

    _composite_lesion(canvas, spec, light)

    # Dermatoscope vignetting and sensor grain, over the whole frame.
    canvas *= 1.0 - np.float32(spec.vignette) * _corner_distance(width, height)
    canvas += rng.integers(-6, 7, (height, width), dtype=np.int8)
    pixels = np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)
    return Image.merge("RGB", [Image.fromarray(channel) for channel in pixels])


def _skin_texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth blotches around 1.0: two octaves of random knots, interpolated with Gaussians."""
    rows = []
    columns = []
    for knots_y, knots_x, contrast in _TEXTURE_OCTAVES:
        knots = rng.normal(0, contrast, (knots_y, knots_x)).astype(np.float32)
        rows.append(_smooth_basis(height, knots_y).T @ knots)
        columns.append(_smooth_basis(width, knots_x))
    # One product of thin matrices: cheaper than upsampling an image, and without blockiness.
    # einsum rather than @: a multithreaded BLAS is many times slower at this shape on busy
    # cores (and worker processes already use every core).
    texture = np.einsum("hk,kw->hw", np.hstack(rows), np.vstack(columns), optimize=False)
    texture += np.float32(1.0)
    return texture


@lru_cache(maxsize=32)
def _smooth_basis(length: int, knots: int) -> np.ndarray:
    """(knots, length) weights that interpolate evenly spaced knots smoothly along one axis."""
    positions = np.linspace(0.0, knots - 1.0, length, dtype=np.float32)[None, :]
    weights = np.exp(-(((positions - np.arange(knots, dtype=np.float32)[:, None]) / 0.7) ** 2))
    weights /= weights.sum(axis=0, keepdims=True)
    # Far-off knots would contribute denormal floats, which make arithmetic many times slower.
    weights[weights < 1e-6] = 0.0
    return weights.astype(np.float32)


def _composite_lesion(canvas: np.ndarray, spec: _ImageSpec, light: np.ndarray) -> None:
    """Blend the lesion into ``canvas`` (3, height, width) in place, within its bounding box."""
    look = spec.look
    base = _DX_LOOKS[look.dx]
    x0 = max(int(spec.center_x - spec.radius_x) - 1, 0)
    x1 = min(int(spec.center_x + spec.radius_x) + 2, spec.width)
    y0 = max(int(spec.center_y - spec.radius_y) - 1, 0)
    y1 = min(int(spec.center_y + spec.radius_y) + 2, spec.height)
    # Pixel centres in lesion radii: the truth ellipse is u^2 + v^2 = 1.
    u = ((np.arange(x0, x1, dtype=np.float32) + 0.5 - spec.center_x) / spec.radius_x)[None, :]
    v = ((np.arange(y0, y1, dtype=np.float32) + 0.5 - spec.center_y) / spec.radius_y)[:, None]
    distance = np.sqrt(u * u + v * v)
    angle = np.arctan2(v, u) - spec.rotation

    # Border notches only ever pull the border inwards, so the lesion stays inside its ellipse.
    notches = np.zeros_like(distance)
    for harmonic, (amplitude, phase) in enumerate(
        zip(look.border_amplitudes, look.border_phases, strict=True), start=2
    ):
        notches += amplitude * (0.5 + 0.5 * np.cos(harmonic * angle + phase))
    border = 1.0 - notches
    alpha = np.clip((border - distance) / (base.rim * border), 0.0, 1.0)
    alpha = alpha * alpha * (3.0 - 2.0 * alpha)  # smoothstep: a soft edge

    # Internal structures are drawn in the lesion's own (rotated) frame so that they turn with it.
    cos_r, sin_r = math.cos(spec.rotation), math.sin(spec.rotation)
    pu = u * cos_r + v * sin_r
    pv = v * cos_r - u * sin_r
    core = np.clip(1.0 - ((pu - look.core_offset[0]) ** 2 + (pv - look.core_offset[1]) ** 2), 0.0, 1.0)
    shade = 1.0 - base.core_darkening * core
    structure = _pattern_field(base.pattern, look, pu, pv) * base.pattern_strength
    body = np.array(look.body, dtype=np.float32) * light
    accent = np.array(look.accent, dtype=np.float32) * light
    for channel in range(3):
        lesion = body[channel] * shade * (1.0 - structure) + accent[channel] * structure
        region = canvas[channel, y0:y1, x0:x1]
        region += alpha * (lesion - region)


def _pattern_field(pattern: str, look: _LesionLook, pu: np.ndarray, pv: np.ndarray) -> np.ndarray:
    """Where (0 to 1) the accent colour of the class's internal structure shows."""
    if pattern == "network":  # reticular pigment network of a naevus: thin, slightly wavy lines
        f = look.stripe_frequency * math.pi
        across = np.abs(np.sin(f * pu + 0.8 * np.sin(2.0 * f * pv / 3.0)))
        along = np.abs(np.sin(f * pv + 0.8 * np.sin(2.0 * f * pu / 3.0)))
        return np.clip((0.45 - np.minimum(across, along)) * 3.0, 0.0, 1.0)
    if pattern == "streaks":  # fissures and ridges of a seborrhoeic keratosis
        along = pu * math.cos(look.stripe_angle) + pv * math.sin(look.stripe_angle)
        across = pv * math.cos(look.stripe_angle) - pu * math.sin(look.stripe_angle)
        wave = np.sin(look.stripe_frequency * math.pi * along + 2.0 * np.sin(3.0 * across))
        return np.clip(wave, 0.0, 1.0) ** 2
    field = np.zeros(np.broadcast_shapes(pu.shape, pv.shape), dtype=np.float32)
    for bu, bv, sigma in look.blobs:
        field += np.exp(-((pu - bu) ** 2 + (pv - bv) ** 2) / (2.0 * sigma * sigma))
    if pattern == "lacunae":  # well-delimited red-purple lagoons
        return np.clip((field - 0.35) * 3.0, 0.0, 1.0)
    return np.clip(field, 0.0, 1.0)


@lru_cache(maxsize=8)
def _corner_distance(width: int, height: int) -> np.ndarray:
    """Vignetting profile: 0 at the centre rising to 1 in the corners, steeply (distance cubed)."""
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    return (((x * x + y * y) / 2.0) ** 1.5).astype(np.float32)

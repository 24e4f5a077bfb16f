"""The HAM10000 metadata schema: columns, vocabularies and the canonical raw layout.

Vocabularies are those of the published dataset (Tschandl et al., 2018, doi:10.1038/sdata.2018.161).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

METADATA_COLUMNS: tuple[str, ...] = (
    "lesion_id",
    "image_id",
    "dx",
    "dx_type",
    "age",
    "sex",
    "localization",
)

DIAGNOSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

DIAGNOSIS_NAMES: dict[str, str] = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}

# Published class counts of the full 10,015-image release.
PUBLISHED_DX_COUNTS: dict[str, int] = {
    "nv": 6705,
    "mel": 1113,
    "bkl": 1099,
    "bcc": 514,
    "akiec": 327,
    "vasc": 142,
    "df": 115,
}

DX_TYPES: tuple[str, ...] = ("histo", "follow_up", "consensus", "confocal")

SEXES: tuple[str, ...] = ("male", "female", "unknown")

LOCALIZATIONS: tuple[str, ...] = (
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "unknown",
    "upper extremity",
)

AGE_RANGE: tuple[float, float] = (0.0, 100.0)

RISK_LEVELS: tuple[str, ...] = ("low", "moderate", "high")

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")

# Canonical raw layout written by `skinrisk data import` and read by every later stage.
RAW_METADATA_FILE = "metadata.csv"
RAW_IMAGES_DIR = "images"
RAW_SOURCE_FILE = "SOURCE.json"


def raw_image_path(raw_dir: Path, image_id: str) -> Path:
    """Path of one image in the canonical raw layout."""
    return raw_dir / RAW_IMAGES_DIR / f"{image_id}.jpg"


def raw_image_paths(raw_dir: Path, image_ids: Iterable[str]) -> list[str]:
    """:func:`raw_image_path` of each id, as strings: 4 ms for HAM10000 where building ``Path``s took
    19 ms, which the preprocess stage waits for before decoding can start."""
    folder = str(raw_image_path(raw_dir, "_").parent)
    return [os.path.join(folder, f"{image_id}.jpg") for image_id in image_ids]


def risk_level_of(risk_map: Mapping[str, Sequence[str]], diagnoses: Sequence[str] = DIAGNOSES) -> dict[str, str]:
    """Diagnosis -> risk level from a ``risk_map`` (level -> diagnoses), checked on the way.

    Raises ``ValueError`` unless the map has exactly ``RISK_LEVELS`` and puts every one of
    ``diagnoses`` (and nothing else) in exactly one level.
    """
    if set(risk_map) != set(RISK_LEVELS):
        raise ValueError(f"risk_map must have exactly the levels {list(RISK_LEVELS)}, got {sorted(risk_map)}")
    level_of: dict[str, str] = {}
    for level in RISK_LEVELS:
        for dx in risk_map[level]:
            if dx not in diagnoses:
                raise ValueError(f"risk_map.{level} names unknown diagnosis {dx!r}; accepted: {list(diagnoses)}")
            if dx in level_of:
                raise ValueError(f"diagnosis {dx!r} is in both {level_of[dx]!r} and {level!r}")
            level_of[dx] = level
    missing = [dx for dx in diagnoses if dx not in level_of]
    if missing:
        raise ValueError(f"risk_map leaves diagnoses without a level: {missing}")
    return level_of

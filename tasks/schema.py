"""The HAM10000 metadata schema: columns, vocabularies and the canonical raw layout.

Vocabularies are those of the published dataset (Tschandl et al., 2018, doi:10.1038/sdata.2018.161).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------------------------------------
# The processed data folder (``skinrisk preprocess``)

SPLITS: tuple[str, ...] = ("train", "val", "test")
PROCESSED_SUMMARY_FILE = "preprocess.json"
ENCODER_FILE = "encoder.json"  # the fitted tasks.clinical.ClinicalEncoder
CASES_FILE = "cases.csv"  # every kept case with its split, risk level and split group


@dataclass(frozen=True)
class PreprocessSummary:
    """``preprocess.json``: how a processed data folder was made and what it holds.

    Every model is scored with the summary of the data it was trained on (it travels with the
    registered model), so the image size, classes and risk map are read from here, never from
    params.yaml. ``seconds_decoding`` is the stage's timing, reported but not written.
    """

    image_size: int
    risk_map: dict[str, list[str]]  # risk level -> diagnoses
    counts: dict[str, dict[str, int]]  # split -> risk level -> images
    lesions: dict[str, int]  # split -> lesions
    n_images: int
    n_dropped: int = 0  # rows left out (no age under ``missing_clinical: drop``)
    missing_clinical: str = "drop"
    diagnoses: tuple[str, ...] = DIAGNOSES
    risk_levels: tuple[str, ...] = RISK_LEVELS
    duplicates: dict | None = None  # tasks.duplicates.SplitGroups.summary()
    seconds_decoding: float | None = field(default=None, compare=False)

    @property
    def train_counts(self) -> dict[str, int]:
        """Images per risk level in the training split (empty when unknown)."""
        return dict(self.counts.get("train") or {})

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        del data["seconds_decoding"]
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> PreprocessSummary:
        """The summary from its JSON form; keys this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)} - {"seconds_decoding"}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("diagnoses", "risk_levels"):
            if key in values:
                values[key] = tuple(values[key])
        values.setdefault("counts", {})
        values.setdefault("lesions", {})
        values.setdefault("n_images", sum(sum(level.values()) for level in values["counts"].values()))
        return cls(**values)

    @classmethod
    def read(cls, path: Path) -> PreprocessSummary:
        """``path`` (a ``preprocess.json``); a ``FileNotFoundError`` where it does not exist."""
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def read_preprocess_summary(processed_dir: Path) -> PreprocessSummary:
    """The summary of a processed data folder, or a one-line error saying how to make it."""
    from tasks.errors import DataError

    path = Path(processed_dir) / PROCESSED_SUMMARY_FILE
    if not path.exists():
        raise DataError(f"{path} not found: run `skinrisk preprocess` first")
    return PreprocessSummary.read(path)

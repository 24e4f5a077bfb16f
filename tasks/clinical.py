"""The clinical branch's features: age, sex and lesion site, encoded as the model expects.

The encoder is fitted on the training split only and saved as JSON beside the processed data;
training, evaluation, explanation and serving all load that same file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from tasks.atomic import write_json
from tasks.errors import DataError
from tasks.metadata import require_columns
from tasks.schema import AGE_RANGE, DIAGNOSES, LOCALIZATIONS, SEXES


def is_blank(value: object) -> bool:
    """None, NaN, pandas' NA or an empty string: a field left empty."""
    if isinstance(value, str):
        return not value.strip()
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):  # arrays and other non-scalars are values, if wrong ones
        return False


def parse_age(value: object, where: str = "age") -> float:
    """A metadata age cell as a float; blank means unknown (NaN). Raises on anything else."""
    if is_blank(value):
        return math.nan
    text = str(value).strip()
    try:
        age = float(text)
    except ValueError:
        raise DataError(f"{where}: age {text!r} is not a number (expected years, e.g. 45)") from None
    low, high = AGE_RANGE
    if not low <= age <= high:
        raise DataError(f"{where}: age {age:g} is outside {low:g}-{high:g} years")
    return age


AGE_REQUIRED = (
    "missing, and this model was trained only on cases with a known age "
    "(preprocess.missing_clinical=drop); give the age in years"
)


@dataclass(frozen=True)
class ClinicalEncoder:
    """Age standardisation (with a missing flag) plus one-hot sex and localization."""

    age_mean: float
    age_std: float
    age_fill: float
    missing_policy: Literal["drop", "impute"]
    sexes: tuple[str, ...] = SEXES
    localizations: tuple[str, ...] = LOCALIZATIONS

    @classmethod
    def fit(cls, train: pd.DataFrame, missing_policy: Literal["drop", "impute"]) -> ClinicalEncoder:
        """Fit on the training rows (``age`` already parsed to float, NaN when blank)."""
        ages = train["age"].astype(float).dropna()
        if ages.empty:
            raise DataError("no training row has an age: cannot fit the clinical encoder")
        std = float(ages.std(ddof=0))
        return cls(
            age_mean=float(ages.mean()),
            age_std=std if std > 0 else 1.0,
            age_fill=float(ages.median()),
            missing_policy=missing_policy,
        )

    def problems(self, age: object, sex: object, localization: object) -> tuple[float, dict[str, str]]:
        """One case's raw clinical fields checked against this encoder: the parsed age (NaN when
        unknown) and, per field (``age``, ``sex``, ``localization``), what is wrong with it.

        The one place these rules live: serving, triage, explanation and the triage page all check
        a case here, so an age refused under ``missing_clinical: drop`` is refused everywhere.
        """
        problems: dict[str, str] = {}
        age_value = math.nan
        try:
            age_value = parse_age(age, where="age")
        except DataError as exc:
            problems["age"] = f"{str(exc).removeprefix('age: ')}; give the age in years, or leave it blank when unknown"
        else:
            if math.isnan(age_value) and self.missing_policy == "drop":
                problems["age"] = AGE_REQUIRED
        for name, value, accepted in (("sex", sex, self.sexes), ("localization", localization, self.localizations)):
            if is_blank(value):
                problems[name] = f"missing; accepted: {list(accepted)}"
            elif value not in accepted:
                problems[name] = f"unknown {name} {value!r}; accepted: {list(accepted)}"
        return age_value, problems

    def check(self, age: object, sex: object, localization: object) -> float:
        """The parsed age of a valid case; a DataError naming the first wrong field otherwise."""
        age_value, problems = self.problems(age, sex, localization)
        if problems:
            name, problem = next(iter(problems.items()))
            raise DataError(f"{name}: {problem}")
        return age_value

    @property
    def feature_names(self) -> list[str]:
        return [
            "age",
            "age_missing",
            *(f"sex={s}" for s in self.sexes),
            *(f"localization={loc}" for loc in self.localizations),
        ]

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Rows of ``age`` (float/NaN), ``sex`` and ``localization`` -> float32 features."""
        unknown_sex = sorted(set(frame["sex"]) - set(self.sexes))
        if unknown_sex:
            raise DataError(f"unknown sex value(s) {unknown_sex}; accepted: {list(self.sexes)}")
        unknown_site = sorted(set(frame["localization"]) - set(self.localizations))
        if unknown_site:
            raise DataError(f"unknown localization value(s) {unknown_site}; accepted: {list(self.localizations)}")
        age = frame["age"].astype(float).to_numpy()
        missing = np.isnan(age)
        if missing.any() and self.missing_policy == "drop":
            raise DataError(
                f"{int(missing.sum())} row(s) without an age, and preprocess.missing_clinical is "
                "'drop': drop them first or set preprocess.missing_clinical=impute"
            )
        age = np.where(missing, self.age_fill, age)
        features = np.zeros((len(frame), self.n_features), dtype=np.float32)
        features[:, 0] = (age - self.age_mean) / self.age_std
        features[:, 1] = missing
        sex_index = {s: 2 + i for i, s in enumerate(self.sexes)}
        site_index = {s: 2 + len(self.sexes) + i for i, s in enumerate(self.localizations)}
        rows = np.arange(len(frame))
        features[rows, frame["sex"].map(sex_index).to_numpy(dtype=int)] = 1.0
        features[rows, frame["localization"].map(site_index).to_numpy(dtype=int)] = 1.0
        return features

    def save(self, path: Path) -> None:
        write_json(path, {**asdict(self), "feature_names": self.feature_names})

    @classmethod
    def load(cls, path: Path) -> ClinicalEncoder:
        path = Path(path)
        if not path.exists():
            raise DataError(f"clinical encoder {path} not found: run `skinrisk preprocess` first")
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def from_json(cls, payload: dict) -> ClinicalEncoder:
        """The encoder from its saved JSON (``feature_names`` is derived, so it is dropped)."""
        fields = {key: value for key, value in payload.items() if key != "feature_names"}
        return cls(**{**fields, "sexes": tuple(fields["sexes"]), "localizations": tuple(fields["localizations"])})


def clinical_frame(raw: pd.DataFrame, source: Path) -> pd.DataFrame:
    """Typed clinical columns from the raw string table, with errors naming the row."""
    require_columns(raw, source)
    frame = raw.copy()
    ages = []
    for line, (image_id, value) in enumerate(zip(frame["image_id"], frame["age"], strict=True), 2):
        ages.append(parse_age(value, where=f"{source} line {line} (image_id {image_id})"))
    frame["age"] = ages
    for column, accepted in (("dx", DIAGNOSES), ("sex", SEXES), ("localization", LOCALIZATIONS)):
        unknown = frame.loc[~frame[column].isin(accepted)]
        if not unknown.empty:
            first = unknown.index[0]
            raise DataError(
                f"{source} line {first + 2} (image_id {unknown.at[first, 'image_id']}): unknown {column} "
                f"{unknown.at[first, column]!r} ({len(unknown)} row(s) in all); accepted: {list(accepted)}. "
                "Run `skinrisk validate` for the full list."
            )
    return frame

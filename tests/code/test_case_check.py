"""One case check (``ClinicalEncoder.problems``) for every entry point: serving, triage, explain, the page."""

import math

import pandas as pd
import pytest

from tasks.clinical import AGE_REQUIRED, ClinicalEncoder
from tasks.errors import DataError

DROP = ClinicalEncoder(age_mean=50.0, age_std=15.0, age_fill=50.0, missing_policy="drop")
IMPUTE = ClinicalEncoder(age_mean=50.0, age_std=15.0, age_fill=50.0, missing_policy="impute")


def test_a_valid_case_has_no_problems_and_its_age_parsed():
    assert DROP.problems("45", "female", "back") == (45.0, {})
    assert DROP.check(45, "male", "face") == 45.0


@pytest.mark.parametrize("blank", [None, "", "  ", math.nan, pd.NA])
def test_an_unknown_age_is_refused_under_drop_and_kept_as_nan_under_impute(blank):
    age, problems = DROP.problems(blank, "male", "back")
    assert math.isnan(age) and problems == {"age": AGE_REQUIRED}
    age, problems = IMPUTE.problems(blank, "male", "back")
    assert math.isnan(age) and problems == {}


def test_every_wrong_field_is_named_at_once():
    _, problems = DROP.problems("forty", pd.NA, "elbow")
    assert problems["age"].startswith("age 'forty' is not a number")
    assert problems["sex"] == "missing; accepted: ['male', 'female', 'unknown']"
    assert problems["localization"].startswith("unknown localization 'elbow'; accepted: [")
    with pytest.raises(DataError, match=r"^age: age 'forty' is not a number"):
        DROP.check("forty", pd.NA, "elbow")


def test_the_vocabulary_is_the_encoders_own():
    narrow = ClinicalEncoder(50.0, 15.0, 50.0, "impute", localizations=("back", "face"))
    assert narrow.problems(30, "male", "scalp")[1] == {
        "localization": "unknown localization 'scalp'; accepted: ['back', 'face']"
    }

from pathlib import Path

import pytest

from tasks.errors import ParamsError
from tasks.params import Params, PreprocessParams, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_file_parses_to_the_documented_defaults():
    params = load_params(ROOT / "params.yaml")
    assert params.preprocess.image_size == 128
    assert params.preprocess.level_of()["mel"] == "high"
    assert params.preprocess.level_of()["bcc"] == "moderate"
    assert params.train.target == "risk"
    assert params.train.loss == "cross_entropy" and params.train.class_weight_power == 0.5
    assert params.train.monitor == "val_loss" and params.train.tta == "flips" and params.train.calibrate
    assert params.train.finetune_from_block == 9 and params.train.aux_dx_weight == 0.5
    assert params.evaluate.operating_recalls == [0.90, 0.95]
    assert params.evaluate.target_recall == 0.90


def test_overrides_reach_nested_sections():
    params = load_params(ROOT / "params.yaml", ["train.augment.zoom=0.3", "preprocess.seed=7"])
    assert params.train.augment.zoom == 0.3
    assert params.preprocess.seed == 7


def test_unknown_override_key_names_the_key_and_the_accepted_ones():
    with pytest.raises(ParamsError) as error:
        load_params(ROOT / "params.yaml", ["train.lr=0.1"])
    assert "'train.lr'" in str(error.value)
    assert "learning_rate" in str(error.value)


def test_bad_value_names_the_key_and_the_accepted_values():
    with pytest.raises(ParamsError) as error:
        load_params(ROOT / "params.yaml", ["train.loss=mse"])
    message = str(error.value)
    assert "train.loss" in message and "'cross_entropy'" in message and "'focal'" in message


def test_unknown_key_in_the_file_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("preprocess:\n  image_sise: 64\n")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert "preprocess.image_sise" in str(error.value)
    assert "image_size" in str(error.value)


def test_override_without_equals_sign_is_refused():
    with pytest.raises(ParamsError, match=r"section\.key=value"):
        load_params(ROOT / "params.yaml", ["train.learning_rate"])


def test_missing_params_file_is_a_clear_error(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("risk_map", "message"),
    [
        (
            {"high": ["mel", "xyz"], "moderate": ["bcc", "akiec"], "low": ["nv", "bkl", "df", "vasc"]},
            "unknown diagnosis",
        ),
        ({"high": ["mel", "bcc"], "moderate": ["bcc", "akiec"], "low": ["nv", "bkl", "df", "vasc"]}, "in both"),
        ({"high": ["mel"], "moderate": ["bcc", "akiec"], "low": ["nv", "bkl", "df"]}, "without a level"),
        ({"high": ["mel"], "low": ["nv", "bkl", "df", "vasc", "bcc", "akiec"]}, "exactly the levels"),
    ],
)
def test_risk_map_must_place_every_diagnosis_once(risk_map, message):
    with pytest.raises(ValueError, match=message):
        PreprocessParams(risk_map=risk_map)


def test_flat_params_are_dotted_keys_for_mlflow():
    flat = Params().flat()
    assert flat["train.augment.flip"] is True
    assert flat["preprocess.risk_map"]["high"] == ["mel"]
    assert "validate.workers" in flat

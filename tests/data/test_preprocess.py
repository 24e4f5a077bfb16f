import json
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from tasks.clinical import ClinicalEncoder
from tasks.dataset import IMAGES_FILE, load_split
from tasks.errors import DataError
from tasks.params import PreprocessParams
from tasks.schema import CASES_FILE, ENCODER_FILE, SPLITS
from tasks.stages.preprocess import first_group_fold, preprocess
from tasks.schema import RAW_METADATA_FILE, RISK_LEVELS, raw_image_path


@pytest.fixture(scope="module")
def cases(processed_dir) -> pd.DataFrame:
    return pd.read_csv(processed_dir / CASES_FILE)


def test_no_lesion_crosses_splits(cases):
    splits_per_lesion = cases.groupby("lesion_id")["split"].nunique()
    assert (splits_per_lesion == 1).all(), splits_per_lesion[splits_per_lesion > 1]
    assert set(cases["split"]) == set(SPLITS)


def test_every_split_holds_every_risk_level_in_similar_shares(cases):
    shares = pd.crosstab(cases["split"], cases["risk_level"], normalize="index")
    assert set(shares.columns) == set(RISK_LEVELS)
    assert (shares.max() - shares.min()).max() < 0.15


def test_default_risk_mapping_by_referral_urgency(cases):
    expected = {
        "mel": "high",
        "bcc": "moderate",
        "akiec": "moderate",
        "nv": "low",
        "bkl": "low",
        "df": "low",
        "vasc": "low",
    }
    assert dict(zip(cases["dx"], cases["risk_level"], strict=True)) == {dx: expected[dx] for dx in cases["dx"].unique()}


def test_encoder_is_fitted_on_the_training_split_only(processed_dir, cases):
    encoder = ClinicalEncoder.load(processed_dir / ENCODER_FILE)
    train_ages = cases.loc[cases["split"] == "train", "age"].dropna()
    assert encoder.age_mean == pytest.approx(train_ages.mean())
    assert encoder.age_mean != pytest.approx(cases["age"].dropna().mean(), abs=1e-9)


def test_arrays_match_cases_and_images(processed_dir, cases, raw_dir):
    from tasks.images import load_image

    total = 0
    for split in SPLITS:
        arrays = load_split(processed_dir, split)
        rows = cases.loc[cases["split"] == split]
        assert arrays.image_id.tolist() == rows["image_id"].tolist()
        assert arrays.images.shape[1:] == (32, 32, 3) and arrays.images.dtype == np.uint8
        assert [RISK_LEVELS[i] for i in arrays.risk] == rows["risk_level"].tolist()
        total += len(arrays)
    first = load_split(processed_dir, "train")
    np.testing.assert_array_equal(first.images[0], load_image(raw_image_path(raw_dir, first.image_id[0]), 32))
    assert total == len(cases)


def test_missing_ages_dropped_by_default_or_imputed_with_a_flag(raw_dir, processed_dir, tmp_path):
    raw = pd.read_csv(raw_dir / RAW_METADATA_FILE, dtype=str, keep_default_na=False)
    n_blank = int((raw["age"] == "").sum())
    assert n_blank > 0, "the synthetic sample should contain blank ages"
    summary = json.loads((processed_dir / "preprocess.json").read_text())
    assert summary["n_dropped"] == n_blank

    imputed = preprocess(
        raw_dir, tmp_path / "imputed", PreprocessParams(image_size=32, workers=1, missing_clinical="impute")
    )
    assert imputed.n_images == len(raw) and imputed.n_dropped == 0
    flags = np.concatenate([load_split(tmp_path / "imputed", s).clinical[:, 1] for s in SPLITS])
    assert flags.sum() == n_blank


def test_splits_are_deterministic_for_a_seed_and_change_with_it(raw_dir, processed_dir, cases, tmp_path):
    again = tmp_path / "again"
    preprocess(raw_dir, again, PreprocessParams(image_size=32, workers=2))
    assert pd.read_csv(again / CASES_FILE)["split"].tolist() == cases["split"].tolist()
    other = tmp_path / "other"
    preprocess(raw_dir, other, PreprocessParams(image_size=32, workers=1, seed=99))
    assert pd.read_csv(other / CASES_FILE)["split"].tolist() != cases["split"].tolist()


def test_custom_risk_map_from_params(raw_dir, tmp_path):
    params = PreprocessParams(
        image_size=32,
        workers=1,
        risk_map={"high": ["mel", "bcc"], "moderate": ["akiec"], "low": ["nv", "bkl", "df", "vasc"]},
    )
    preprocess(raw_dir, tmp_path / "p", params)
    cases = pd.read_csv(tmp_path / "p" / CASES_FILE)
    assert set(cases.loc[cases["dx"] == "bcc", "risk_level"]) == {"high"}


def _raw_copy(raw_dir, tmp_path):
    copy = tmp_path / "raw"
    shutil.copytree(raw_dir, copy)
    return copy


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "worker-processes"])
def test_corrupt_image_fails_and_keeps_the_previous_output(raw_dir, tmp_path, workers):
    out = tmp_path / "processed"
    preprocess(raw_dir, out, PreprocessParams(image_size=32, workers=workers))
    before = (out / CASES_FILE).read_bytes()
    raw = _raw_copy(raw_dir, tmp_path)
    image_id = pd.read_csv(raw / RAW_METADATA_FILE)["image_id"].iloc[5]
    raw_image_path(raw, image_id).write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError, match=image_id):
        preprocess(raw, out, PreprocessParams(image_size=32, workers=workers))
    assert (out / CASES_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed", "raw"], "no staging leftovers"


def test_unknown_dx_and_wrong_age_type_name_the_line(raw_dir, tmp_path):
    raw = _raw_copy(raw_dir, tmp_path)
    table = pd.read_csv(raw / RAW_METADATA_FILE, dtype=str, keep_default_na=False)
    table.loc[4, "dx"] = "melanoma"
    table.to_csv(raw / RAW_METADATA_FILE, index=False)
    with pytest.raises(DataError, match=r"line 6 .*'melanoma'"):
        preprocess(raw, tmp_path / "out", PreprocessParams(image_size=32, workers=1))
    table.loc[4, "dx"] = "mel"
    table.loc[7, "age"] = "forty"
    table.to_csv(raw / RAW_METADATA_FILE, index=False)
    with pytest.raises(DataError, match=r"line 9 .*'forty' is not a number"):
        preprocess(raw, tmp_path / "out", PreprocessParams(image_size=32, workers=1))
    assert not (tmp_path / "out").exists()


def test_missing_raw_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="skinrisk data import"):
        preprocess(tmp_path / "raw", tmp_path / "out", PreprocessParams())


@pytest.mark.parametrize("seed", range(6))
def test_group_fold_is_scikit_learns_stratified_group_kfold(seed):
    from sklearn.model_selection import StratifiedGroupKFold

    rng = np.random.default_rng(seed)
    n_splits = int(rng.integers(2, 8))
    lesions = rng.integers(0, 400, size=1500).astype(str)  # several images for many lesions
    levels = np.array(["low", "moderate", "high"])[rng.choice(3, size=1500, p=[0.8, 0.09, 0.11])]
    strata = pd.Series(levels).groupby(lesions).transform("first").to_numpy()  # one level per lesion
    ours = first_group_fold(strata, lesions, n_splits, seed)
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held_out = next(folds.split(np.zeros(len(strata)), strata, lesions))
    theirs = np.zeros(len(strata), dtype=bool)
    theirs[held_out] = True
    np.testing.assert_array_equal(ours, theirs)


def test_split_arrays_are_rows_of_one_image_file(processed_dir, cases):
    images = np.load(processed_dir / IMAGES_FILE, mmap_mode="r")
    assert images.shape == (len(cases), 32, 32, 3)
    for split in SPLITS:
        arrays = load_split(processed_dir, split)
        rows = np.flatnonzero((cases["split"] == split).to_numpy())
        np.testing.assert_array_equal(arrays.images, images[rows])
        assert arrays.image_id.tolist() == cases.loc[rows, "image_id"].tolist()


def test_older_output_with_images_in_each_split_file_still_loads(processed_dir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    current = load_split(processed_dir, "val")
    np.savez(
        old / "val.npz",
        images=current.images,
        clinical=current.clinical,
        risk=current.risk,
        dx=current.dx,
        image_id=current.image_id,
    )
    np.testing.assert_array_equal(load_split(old, "val").images, current.images)


def test_split_file_without_its_image_file_is_refused(processed_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(processed_dir / "test.npz", partial / "test.npz")
    with pytest.raises(DataError, match="images.npy not found"):
        load_split(partial, "test")


def test_an_error_beside_the_decoding_stops_it_and_nothing_writes_after(raw_dir, tmp_path):
    from tasks.images import ImageDecoding

    metadata = pd.read_csv(raw_dir / RAW_METADATA_FILE)
    paths = [str(raw_image_path(raw_dir, image_id)) for image_id in metadata["image_id"]] * 20
    out = tmp_path / "images.npy"
    with pytest.raises(RuntimeError, match="the caller's own work"), ImageDecoding(32, out, workers=2) as decoding:
        decoding.start(paths)
        raise RuntimeError("the caller's own work failed")  # while the worker process is still starting
    written = out.stat().st_mtime_ns
    images = np.load(out, mmap_mode="r")
    assert not images[-200:].any(), "unclaimed shards are not decoded after the error"
    time.sleep(0.3)
    assert out.stat().st_mtime_ns == written, "no worker writes once the block is left"


def test_an_unknown_executor_is_refused_naming_the_accepted_ones(tmp_path):
    from tasks.errors import SkinriskError
    from tasks.images import ImageDecoding
    from tasks.shards import map_shards

    with pytest.raises(SkinriskError, match=r"unknown executor 'ray'; accepted: \['processes', 'threads', 'dask'\]"):
        ImageDecoding(32, tmp_path / "images.npy", executor="ray")
    with pytest.raises(SkinriskError, match="unknown executor 'ray'"):
        map_shards(len, [[1]], executor="ray")


def test_preprocess_json_reads_back_as_the_summary_the_stage_returned(raw_dir, tmp_path):
    from tasks.schema import PROCESSED_SUMMARY_FILE, PreprocessSummary, read_preprocess_summary

    returned = preprocess(raw_dir, tmp_path / "processed", PreprocessParams(image_size=32, workers=1))
    assert read_preprocess_summary(tmp_path / "processed") == returned
    assert returned.seconds_decoding is not None, "the stage reports its decoding time"
    written = json.loads((tmp_path / "processed" / PROCESSED_SUMMARY_FILE).read_text())
    assert "seconds_decoding" not in written, "a timing in preprocess.json would change the stage's output every run"
    # A summary written by another version (a registered model's artifact) still reads, extra keys and all.
    assert PreprocessSummary.from_json({**written, "cv_fold": 3}) == returned
    with pytest.raises(DataError, match="run `skinrisk preprocess` first"):
        read_preprocess_summary(tmp_path / "nowhere")

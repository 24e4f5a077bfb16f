"""tasks.synth: the synthetic HAM10000 sample is shaped like the real one, deterministic,
atomic, and carries a learnable class signal where synthetic_truth.csv says the lesion is."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import tasks.synth as synth
from tasks.errors import SkinriskError
from tasks.metadata import read_metadata_table
from tasks.schema import (
    DIAGNOSES,
    DX_TYPES,
    LOCALIZATIONS,
    METADATA_COLUMNS,
    PUBLISHED_DX_COUNTS,
    SEXES,
)
from tasks.synth import class_counts, synthesize_ham10000

PARTS = (synth.IMAGES_PART_1, synth.IMAGES_PART_2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _image(root: Path, image_id: str) -> np.ndarray:
    (path,) = [root / part / f"{image_id}.jpg" for part in PARTS if (root / part / f"{image_id}.jpg").exists()]
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _ellipse_distance(truth_row: pd.Series, height: int, width: int) -> np.ndarray:
    """Per pixel, u^2 + v^2 in the truth ellipse's radii (1 on its border)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    return ((x - truth_row.center_x) / truth_row.radius_x) ** 2 + ((y - truth_row.center_y) / truth_row.radius_y) ** 2


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("small") / "synthetic"
    return out, synthesize_ham10000(out, n_images=60, seed=7, width=64, height=48, workers=1)


@pytest.fixture(scope="module")
def large_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("large") / "synthetic"
    return out, synthesize_ham10000(out, n_images=700, seed=3, width=32, height=32, workers=1)


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        ({"n_images": 13}, "at least 14 images"),
        ({"width": 31}, "at least 32x32"),
        ({"height": 8}, "at least 32x32"),
        ({"seed": -1}, "non-negative"),
        ({"workers": -2}, "workers"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path: Path, arguments: dict, complaint: str) -> None:
    kwargs = {"n_images": 20, "seed": 0, "width": 64, "height": 48, **arguments}
    with pytest.raises(SkinriskError, match=complaint):
        synthesize_ham10000(tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_layout_columns_and_vocabularies(small_sample: tuple[Path, pd.DataFrame]) -> None:
    out, returned = small_sample
    assert sorted(p.name for p in out.iterdir()) == sorted([synth.METADATA_FILE, synth.TRUTH_FILE, *PARTS])
    table = read_metadata_table(out / synth.METADATA_FILE)  # every cell as written
    assert tuple(table.columns) == METADATA_COLUMNS
    assert tuple(returned.columns) == METADATA_COLUMNS
    assert len(table) == 60
    assert set(table["dx"]) == set(DIAGNOSES)
    assert set(table["dx_type"]) <= set(DX_TYPES)
    assert set(table["sex"]) <= set(SEXES)
    assert set(table["localization"]) <= set(LOCALIZATIONS)
    assert table["lesion_id"].str.fullmatch(r"HAM_\d{7}").all()
    # Ids run from the real release's first one, each once.
    numbers = sorted(int(i.removeprefix("ISIC_")) for i in table["image_id"])
    assert table["image_id"].str.fullmatch(r"ISIC_\d{7}").all()
    assert numbers == list(range(24306, 24306 + 60))
    # Ages are written like the real CSV: "80.0", or a blank cell.
    assert table["age"].str.fullmatch(r"(\d{1,2}\.0)?").all()
    ages = returned["age"].dropna()
    assert ((ages % 5 == 0) & (ages >= 0) & (ages <= 85)).all()
    pd.testing.assert_frame_equal(returned, pd.read_csv(out / synth.METADATA_FILE))


@pytest.mark.parametrize("n_images", [14, 15, 21, 49, 50, 60, 137, 800, 10_015])
def test_class_counts_sum_exactly_and_include_every_class(n_images: int) -> None:
    counts = class_counts(n_images)
    assert set(counts) == set(DIAGNOSES)
    assert sum(counts.values()) == n_images
    assert min(counts.values()) >= (3 if n_images >= 50 else 2)
    if n_images == 10_015:
        assert counts == PUBLISHED_DX_COUNTS


def test_tiny_sample_has_every_class_and_enough_lesions(tmp_path: Path) -> None:
    metadata = synthesize_ham10000(tmp_path / "s", n_images=14, seed=1, width=32, height=32, workers=1)
    assert metadata["dx"].value_counts().to_dict() == dict.fromkeys(DIAGNOSES, 2)
    assert (metadata.groupby("dx")["lesion_id"].nunique() == 2).all()


def test_every_class_has_three_lesions_from_fifty_images(
    small_sample: tuple[Path, pd.DataFrame],
) -> None:
    _, metadata = small_sample
    lesions = metadata.groupby("dx")["lesion_id"].nunique()
    assert set(lesions.index) == set(DIAGNOSES)
    assert (lesions >= 3).all(), lesions.to_dict()


def test_proportions_follow_the_published_counts(large_sample: tuple[Path, pd.DataFrame]) -> None:
    _, metadata = large_sample
    total = sum(PUBLISHED_DX_COUNTS.values())
    counts = metadata["dx"].value_counts()
    for dx, published in PUBLISHED_DX_COUNTS.items():
        assert abs(counts[dx] - 700 * published / total) < 1, dx


def test_several_images_per_lesion_with_one_set_of_attributes(
    large_sample: tuple[Path, pd.DataFrame],
) -> None:
    _, metadata = large_sample
    per_lesion = metadata.groupby("lesion_id").size()
    assert 0.62 <= (per_lesion == 1).mean() <= 0.86  # 74% in the real release
    assert (per_lesion >= 2).sum() >= 40 and (per_lesion >= 3).sum() >= 5
    attributes = ["dx", "dx_type", "age", "sex", "localization"]
    varying = metadata.groupby("lesion_id")[attributes].nunique(dropna=False)
    assert (varying == 1).all().all()


def test_missing_values_at_realistic_rates(large_sample: tuple[Path, pd.DataFrame]) -> None:
    _, metadata = large_sample
    assert 1 <= metadata["age"].isna().sum() <= 0.02 * len(metadata)
    assert (metadata["sex"] == "unknown").mean() <= 0.02
    assert 0.005 <= (metadata["localization"] == "unknown").mean() <= 0.06


def test_clinical_metadata_depends_on_the_diagnosis(
    large_sample: tuple[Path, pd.DataFrame],
) -> None:
    _, metadata = large_sample
    mean_age = metadata.groupby("dx")["age"].mean()
    for dx in ("mel", "bcc", "akiec"):
        assert mean_age[dx] > mean_age["nv"] + 8, mean_age.to_dict()
    head_and_arms = metadata["localization"].isin(["face", "scalp", "neck", "upper extremity"])
    share = head_and_arms.groupby(metadata["dx"]).mean()
    assert share[["bcc", "akiec"]].min() > share["nv"] + 0.15, share.to_dict()
    dx_types = metadata.groupby("dx")["dx_type"].agg(set)
    assert dx_types["mel"] == {"histo"}
    assert "follow_up" in dx_types["nv"]
    assert set(metadata.loc[metadata["dx_type"] == "follow_up", "dx"]) == {"nv"}


def test_images_decode_to_the_requested_size_in_two_halves(
    small_sample: tuple[Path, pd.DataFrame],
) -> None:
    out, _ = small_sample
    for part in PARTS:
        for path in (out / part).iterdir():
            with Image.open(path) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 48))
    first_half = {f"ISIC_{24306 + i:07d}.jpg" for i in range(30)}
    assert {p.name for p in (out / PARTS[0]).iterdir()} == first_half
    assert len(list((out / PARTS[1]).iterdir())) == 30


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    runs = []
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        synthesize_ham10000(tmp_path / name, n_images=30, seed=seed, width=64, height=48, workers=1)
        runs.append(_files(tmp_path / name))
    assert runs[0] == runs[1]
    assert runs[0][synth.METADATA_FILE] != runs[2][synth.METADATA_FILE]
    shared = set(runs[0]) & set(runs[2])
    assert sum(runs[0][name] != runs[2][name] for name in shared) >= 25


def test_parallel_generation_matches_serial(tmp_path: Path) -> None:
    synthesize_ham10000(tmp_path / "one", n_images=40, seed=5, width=64, height=48, workers=1)
    synthesize_ham10000(tmp_path / "two", n_images=40, seed=5, width=64, height=48, workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_truth_locates_a_darker_lesion_inside_the_frame(tmp_path: Path) -> None:
    out = tmp_path / "s"
    metadata = synthesize_ham10000(out, n_images=70, seed=2, width=120, height=90, workers=1)
    truth = pd.read_csv(out / synth.TRUTH_FILE)
    assert tuple(truth.columns) == synth.TRUTH_COLUMNS
    assert sorted(truth["image_id"]) == sorted(metadata["image_id"])
    assert (truth.center_x - truth.radius_x > 0).all() and (truth.center_x + truth.radius_x < 120).all()
    assert (truth.center_y - truth.radius_y > 0).all() and (truth.center_y + truth.radius_y < 90).all()
    dark_inside, dark_total = 0, 0
    for row in truth.itertuples():
        luminance = _luminance(_image(out, row.image_id))
        distance = _ellipse_distance(row, 90, 120)
        lesion, skin = luminance[distance < 0.5], luminance[distance > 1.5**2]
        assert lesion.mean() < skin.mean() - 10, row.image_id
        dark = luminance < np.median(skin) - 25
        dark_inside += int((dark & (distance <= 1.1**2)).sum())
        dark_total += int(dark.sum())
    assert dark_inside / dark_total > 0.95


def test_images_of_one_lesion_look_alike(large_sample: tuple[Path, pd.DataFrame]) -> None:
    out, metadata = large_sample
    truth = pd.read_csv(out / synth.TRUTH_FILE).set_index("image_id")
    colour = {}
    for image_id in metadata["image_id"]:
        row = truth.loc[image_id]
        inside = _ellipse_distance(row, 32, 32) < 0.5
        colour[image_id] = _image(out, image_id)[inside].mean(axis=0)
    same, different = [], []
    for _, lesion in metadata[metadata["dx"] == "nv"].groupby("lesion_id"):
        ids = list(lesion["image_id"])
        same += [np.abs(colour[a] - colour[b]).mean() for a, b in itertools.pairwise(ids)]
    nv_ids = list(metadata.loc[metadata["dx"] == "nv", "image_id"])
    different = [np.abs(colour[a] - colour[b]).mean() for a, b in zip(nv_ids, nv_ids[7:], strict=False)]
    assert len(same) >= 20
    assert np.median(same) < 0.7 * np.median(different)


def test_class_signal_is_learnable_from_simple_colour_features(
    large_sample: tuple[Path, pd.DataFrame],
) -> None:
    """Held-out (by lesion) balanced accuracy of a linear model on colour percentiles."""
    out, metadata = large_sample
    features = np.stack(
        [np.percentile(_image(out, i).reshape(-1, 3), [2, 10, 25, 50], axis=0).ravel() for i in metadata["image_id"]]
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    folds = StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=0)
    predicted = cross_val_predict(model, features, metadata["dx"], groups=metadata["lesion_id"], cv=folds)
    score = balanced_accuracy_score(metadata["dx"], predicted)
    assert score > 0.5, f"balanced accuracy {score:.2f}; the majority class scores {1 / 7:.2f}"


def test_a_failure_midway_leaves_the_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    real_render = synth._render_image
    calls = []

    def render_then_fail(spec):  # type: ignore[no-untyped-def]
        calls.append(spec)
        if len(calls) > 10:
            raise OSError("disk full")
        return real_render(spec)

    monkeypatch.setattr(synth, "_render_image", render_then_fail)
    with pytest.raises(OSError, match="disk full"):
        synthesize_ham10000(out, n_images=30, seed=0, width=32, height=32, workers=1)
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no staging left behind

    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        synthesize_ham10000(tmp_path / "fresh", n_images=30, seed=0, width=32, height=32, workers=1)
    assert not (tmp_path / "fresh").exists()


def test_success_replaces_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "previous.txt").write_text("replaced")
    synthesize_ham10000(out, n_images=14, seed=0, width=32, height=32, workers=1)
    assert not (out / "previous.txt").exists()
    assert (out / synth.METADATA_FILE).is_file()

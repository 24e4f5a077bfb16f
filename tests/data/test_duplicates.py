"""The duplicate-image leakage guard: copies of one image filed under other lesion_ids (resized,
recompressed, mirrored, turned) are found and kept in one split; unrelated lesions are not joined."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.duplicates import near_duplicate_pairs, split_groups, view_hashes
from tasks.params import PreprocessParams
from tasks.stages.preprocess import preprocess
from tasks.schema import CASES_FILE, PROCESSED_SUMMARY_FILE, RAW_METADATA_FILE, raw_image_path

SIZE = 128


def _lesion(seed: int) -> Image.Image:
    """A dermoscopy-like picture: skin with an irregular pigmented blob, unlike any other seed's."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:300, 0:400]
    skin = np.array([220, 180, 160]) + rng.normal(0, 6, (300, 400, 3))
    angle = np.arctan2(y - 150, x - 200)
    radius = 60 + 25 * np.sin(3 * angle + rng.uniform(0, 6)) + 15 * np.sin(5 * angle + rng.uniform(0, 6))
    centre = (rng.uniform(120, 180), rng.uniform(150, 250))
    inside = np.hypot(y - centre[0], x - centre[1]) < radius
    pigment = np.array([90, 50, 30]) + rng.normal(0, 25, 3)
    image = np.where(inside[..., None], pigment + rng.normal(0, 12, (300, 400, 3)), skin)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((SIZE, SIZE)))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


COPIES = {
    "resized": lambda im: im.resize((im.width // 3, im.height // 3)),
    "recompressed": lambda im: _jpeg(im, 40),
    "mirrored": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "turned": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "turned and mirrored": lambda im: im.transpose(Image.Transpose.TRANSVERSE),
}


def test_view_hashes_are_imagehash_s_phash_of_each_view():
    import imagehash

    image = _pixels(_lesion(0))
    hashes = view_hashes(image[None])
    views = ((0, image), (1, image[:, ::-1]), (2, np.rot90(image)), (5, np.rot90(image, 2)[:, ::-1]))
    for column, view in views:
        expected = imagehash.phash(Image.fromarray(np.ascontiguousarray(view)), hash_size=16).hash.ravel()
        ours = np.unpackbits(hashes[0, column].astype(">u8").view(np.uint8)).astype(bool)
        # Pillow rounds between its horizontal and vertical resize passes: a quarter turn before or
        # after the resize can differ in a few bits; the upright and mirrored views are exact
        assert (ours != expected).sum() <= (4 if column in (2, 5) else 0), column


def test_the_views_coefficients_are_those_of_a_dct_of_each_view():
    """view_hashes takes one DCT per image and derives the 8 views' by transposes and sign flips:
    bit for bit the hashes of transforming each view itself."""
    from scipy.fftpack import dct

    images = np.stack([_pixels(_lesion(seed)) for seed in range(6)])
    grey = np.stack(
        [np.asarray(Image.fromarray(im).convert("L").resize((64, 64), Image.Resampling.LANCZOS)) for im in images]
    ).astype(np.float64)
    views = [
        np.rot90(grey, turn, axes=(1, 2))[:, :, ::-1] if mirror else np.rot90(grey, turn, axes=(1, 2))
        for turn in range(4)
        for mirror in (False, True)
    ]
    for column, view in enumerate(views):
        low = dct(dct(view, axis=-2), axis=-1)[:, :16, :16]
        expected = (low > np.median(low, axis=(-2, -1), keepdims=True)).reshape(len(images), -1)
        ours = np.unpackbits(view_hashes(images)[:, column].astype(">u8").view(np.uint8), axis=-1).astype(bool)
        assert (ours == expected).all(), column


@pytest.mark.parametrize("copy", COPIES)
def test_a_copy_under_another_lesion_is_joined_to_it(copy):
    originals = [_lesion(seed) for seed in range(12)]
    images = np.stack([_pixels(im) for im in originals] + [_pixels(COPIES[copy](originals[3]))])
    lesion_ids = pd.Series([f"HAM_{i:07d}" for i in range(13)])
    found = split_groups(lesion_ids, pd.Series([f"ISIC_{i}" for i in range(13)]), images, 24)
    assert found.pairs and {(a, b) for a, b, _ in found.pairs} == {("ISIC_12", "ISIC_3")}, found.pairs
    assert found.groups[12] == found.groups[3] == "HAM_0000003"
    assert len(set(found.groups)) == 12 and found.merged_groups == 1 and found.merged_lesions == 2


def test_unrelated_lesions_are_not_joined_and_the_search_can_be_off():
    images = np.stack([_pixels(_lesion(seed)) for seed in range(30)])
    hashes = view_hashes(images)
    assert near_duplicate_pairs(hashes, 24) == []
    ids = pd.Series([f"HAM_{i}" for i in range(30)])
    assert split_groups(ids, ids, images, -1).groups.tolist() == ids.tolist()


def test_images_of_one_lesion_are_no_duplicates_to_report():
    image = _pixels(_lesion(1))
    found = split_groups(pd.Series(["HAM_1", "HAM_1"]), pd.Series(["ISIC_1", "ISIC_2"]), np.stack([image, image]), 24)
    assert found.pairs == [] and found.merged_groups == 0


def test_preprocess_keeps_a_mirrored_copy_under_another_lesion_in_the_same_split(raw_dir, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(raw_dir, raw)
    metadata = pd.read_csv(raw / RAW_METADATA_FILE, dtype=str, keep_default_na=False)
    source = metadata.iloc[5]
    Image.open(raw_image_path(raw, source["image_id"])).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        raw_image_path(raw, "ISIC_9999999")
    )
    copy = source.copy()
    copy["image_id"], copy["lesion_id"] = "ISIC_9999999", "HAM_9999999"
    pd.concat([metadata, copy.to_frame().T]).to_csv(raw / RAW_METADATA_FILE, index=False)

    summary = preprocess(raw, tmp_path / "processed", PreprocessParams(image_size=32, workers=1))
    cases = pd.read_csv(tmp_path / "processed" / CASES_FILE, dtype=str).set_index("image_id")
    assert cases.loc["ISIC_9999999", "split"] == cases.loc[source["image_id"], "split"]
    assert cases.loc["ISIC_9999999", "split_group"] == cases.loc[source["image_id"], "split_group"]
    assert [source["image_id"], "ISIC_9999999"] in [pair[:2] for pair in summary.duplicates["examples"]]
    saved = pd.read_json(tmp_path / "processed" / PROCESSED_SUMMARY_FILE, typ="series")["duplicates"]
    assert saved["merged_groups"] >= 1
    # what the synthetic sample holds besides the planted copy: no unrelated lesions joined
    assert saved["near_duplicate_pairs"] == 1, saved

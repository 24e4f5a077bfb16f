import numpy as np
import pytest

from tasks.dataset import load_split, make_dataset
from tasks.images import normalize_for_mobilenet
from tasks.params import AugmentParams


@pytest.fixture(scope="module")
def val(processed_dir):
    return load_split(processed_dir, "val")


def _first_batch(dataset):
    features, labels = next(iter(dataset))
    return features["image"].numpy(), features["clinical"].numpy(), labels.numpy()


def test_evaluation_batches_are_normalized_in_order_and_never_augmented(val):
    dataset = make_dataset(val, val.risk, batch_size=8, training=False, augment=AugmentParams(), seed=1)
    images, clinical, labels = _first_batch(dataset)
    np.testing.assert_allclose(images, normalize_for_mobilenet(val.images[:8]), atol=1e-6)
    np.testing.assert_array_equal(clinical, val.clinical[:8])
    np.testing.assert_array_equal(labels, val.risk[:8])
    assert sum(len(y) for _, y in dataset) == len(val)


def test_training_batches_are_augmented_within_range(val):
    dataset = make_dataset(val, val.risk, batch_size=len(val), training=True, augment=AugmentParams(), seed=1)
    images, _, labels = _first_batch(dataset)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert sorted(labels.tolist()) == sorted(val.risk.tolist())
    plain = normalize_for_mobilenet(val.images)
    # Shuffled and augmented: no training image equals its stored version.
    unchanged = sum(bool((np.abs(plain - image) < 1e-5).all(axis=(1, 2, 3)).any()) for image in images[:10])
    assert unchanged <= 1


def test_no_augmentation_when_disabled(val):
    off = AugmentParams(flip=False, rot90=False, rotation=0, zoom=0, brightness=0, contrast=0)
    dataset = make_dataset(val, val.risk, batch_size=len(val), training=True, augment=off, seed=3)
    images, _, _ = _first_batch(dataset)
    plain = normalize_for_mobilenet(val.images)
    order = [int(np.argmin(np.abs(plain - image).sum(axis=(1, 2, 3)))) for image in images]
    np.testing.assert_allclose(images, plain[order], atol=1e-6)


def test_quarter_turns_transpose_about_half_the_images_and_change_nothing_else(val):
    only = AugmentParams(flip=False, rot90=True, rotation=0, zoom=0, brightness=0, contrast=0)
    dataset = make_dataset(val, val.risk, batch_size=len(val), training=True, augment=only, seed=3)
    images, _, _ = _first_batch(dataset)
    plain = normalize_for_mobilenet(val.images)
    transposed = np.transpose(plain, (0, 2, 1, 3))
    kinds = []
    for image in images:
        if (np.abs(plain - image) < 1e-6).all(axis=(1, 2, 3)).any():
            kinds.append("as is")
        elif (np.abs(transposed - image) < 1e-6).all(axis=(1, 2, 3)).any():
            kinds.append("transposed")
        else:
            kinds.append("other")
    assert "other" not in kinds
    share = kinds.count("transposed") / len(kinds)
    assert 0.25 < share < 0.75, share

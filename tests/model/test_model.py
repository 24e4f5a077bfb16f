import keras
import numpy as np
import pytest

from tasks import model as model_module
from tasks.errors import SkinriskError
from tasks.model import LAST_CONV_LAYER, build_model, imagenet_weights_file, set_finetune
from tests.support import IMAGENET_CACHE, tiny_train_params


def test_backbone_layers_sit_in_the_outer_graph_for_grad_cam():
    model = build_model(32, 20, 3, tiny_train_params())
    conv = model.get_layer(LAST_CONV_LAYER)
    grad_model = keras.Model(model.inputs, [conv.output, model.output])
    activations, probs = grad_model({"image": np.zeros((2, 32, 32, 3)), "clinical": np.zeros((2, 20))})
    assert activations.shape[-1] == 1280
    np.testing.assert_allclose(np.asarray(probs).sum(axis=1), 1.0, rtol=1e-5)


def test_random_backbone_trains_from_the_start_and_fine_tuning_opens_only_the_top_blocks():
    model = build_model(32, 20, 3, tiny_train_params())
    # Random weights: nothing to preserve, so the backbone learns from the start with fast BN statistics.
    assert model.get_layer("block_16_project").trainable
    assert model.get_layer("block_16_project_BN").momentum == 0.9
    n = set_finetune(model, 15)
    assert n == 7  # blocks 15 and 16 (expand, depthwise, project) and Conv_1
    assert model.get_layer("block_15_expand").trainable
    assert not model.get_layer("block_14_expand").trainable
    assert not model.get_layer("block_15_expand_BN").trainable


def test_a_few_steps_lower_the_loss_on_tiny_data():
    keras.utils.set_random_seed(0)
    model = build_model(32, 6, 3, tiny_train_params())
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 64)
    images = (labels[:, None, None, None] - 1.0) * 0.5 + rng.normal(0, 0.1, (64, 32, 32, 3))
    clinical = np.eye(6)[labels * 2].astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    x = {"image": images.astype("float32"), "clinical": clinical}
    before = model.evaluate(x, labels, verbose=0)
    # 24 epochs, not 12: the inference-mode loss lags the training loss until the BatchNorm moving
    # statistics catch up with the weights, and after 12 it was still at 0.9x on some CPUs
    model.fit(x, labels, epochs=24, batch_size=16, verbose=0)
    assert model.evaluate(x, labels, verbose=0) < before * 0.5


def test_unavailable_imagenet_weights_say_how_to_fix_it(tmp_path, monkeypatch):
    # alpha 0.35 is not bundled: Keras would download it, and offline it cannot
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise OSError("URL fetch failure: no network")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(SkinriskError) as error:
        build_model(128, 20, 3, tiny_train_params(weights="imagenet", alpha=0.35))
    message = str(error.value)
    assert "KERAS_HOME" in message and "train.weights=none" in message
    assert str(imagenet_weights_file(0.35, 128)) in message


def test_missing_weights_file_is_refused(tmp_path):
    with pytest.raises(SkinriskError, match="no such file"):
        build_model(32, 20, 3, tiny_train_params(weights=str(tmp_path / "nope.h5")))


def test_imagenet_weights_come_with_the_project_and_need_no_cache_or_network(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty Keras cache
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise AssertionError("no download may be tried for the bundled weights")

    monkeypatch.setattr(file_utils, "get_file", offline)
    model = build_model(128, 20, 3, tiny_train_params(weights="imagenet", alpha=1.0))
    assert not model.get_layer("block_16_project").trainable, "pretrained backbone frozen for the head phase"
    random = build_model(128, 20, 3, tiny_train_params(weights="none", alpha=1.0))
    pretrained = model.get_layer("Conv1").get_weights()[0]
    assert not np.allclose(pretrained, random.get_layer("Conv1").get_weights()[0])
    assert np.abs(pretrained).max() < 50  # trained filters, not an init artefact
    # the same weights at another input size (convolutions do not depend on it)
    other = build_model(96, 20, 3, tiny_train_params(weights="imagenet", alpha=1.0))
    np.testing.assert_array_equal(other.get_layer("Conv1").get_weights()[0], pretrained)
    if (IMAGENET_CACHE / "models").is_dir():  # the team machines' Keras cache holds the same file
        cached = IMAGENET_CACHE / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_128_no_top.h5"
        assert cached.read_bytes() == model_module.BUNDLED_WEIGHTS.read_bytes()


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_bundled_weights_name_the_file_the_hash_and_the_fix(tmp_path, monkeypatch, damage):
    path = tmp_path / "mobilenet_v2_1.0_no_top.h5"
    if damage == "corrupt":
        path.write_bytes(model_module.BUNDLED_WEIGHTS.read_bytes()[:-10] + b"0123456789")
    monkeypatch.setattr(model_module, "BUNDLED_WEIGHTS", path)
    with pytest.raises(SkinriskError) as error:
        build_model(128, 20, 3, tiny_train_params(weights="imagenet", alpha=1.0))
    message = str(error.value)
    assert str(path) in message and model_module.BUNDLED_WEIGHTS_SHA256 in message and "git checkout" in message
    assert ("missing" if damage == "missing" else "corrupt") in message

"""train.distribution: a no-op on one device (with a line saying so), MirroredStrategy over two."""

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest

from tasks.distribution import make_strategy, strategy_scope
from tasks.errors import ParamsError
from tasks.params import TrainParams
from tests.support import PROJECT_ROOT


def test_none_is_a_silent_no_op(capsys):
    assert isinstance(strategy_scope("none"), contextlib.nullcontext)
    assert capsys.readouterr().out == ""


def test_mirrored_without_two_gpus_trains_on_one_device_and_says_so(capsys):
    with strategy_scope("mirrored"):  # this machine (and CI) has no GPU
        pass
    assert "train.distribution=mirrored: 0 GPU(s) visible" in capsys.readouterr().out
    assert make_strategy("mirrored", devices=["/GPU:0"]) is None
    assert "1 GPU(s) visible" in capsys.readouterr().out


def test_unknown_strategies_are_refused():
    with pytest.raises(ParamsError, match="accepted"):
        strategy_scope("horovod")
    assert TrainParams(distribution="mirrored").distribution == "mirrored"
    with pytest.raises(ValueError):
        TrainParams(distribution="horovod")


@pytest.mark.slow
def test_mirrored_replicates_training_over_two_devices():
    # Two logical CPU devices stand in for two GPUs (TensorFlow must be configured before first use,
    # hence a fresh process).
    script = textwrap.dedent(
        """
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        import keras
        from tasks.distribution import make_strategy, strategy_scope
        with strategy_scope("mirrored", devices):
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
            model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
        history = model.fit(
            np.random.rand(32, 4).astype("float32"), np.random.randint(0, 3, 32), batch_size=8, epochs=1, verbose=0
        )
        print("replicas", replicas, "loss", np.isfinite(history.history["loss"][0]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replicating over 2 devices" in done.stdout
    assert "replicas 2 loss True" in done.stdout

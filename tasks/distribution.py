"""Multi-GPU training: the TensorFlow distribution strategy that ``train.distribution`` asks for.

``mirrored`` replicates the model on every visible GPU (``tf.distribute.MirroredStrategy``): each
batch is split across them and the gradients summed, so a step sees the same global batch as on
one device. The model must be built and compiled inside :func:`strategy_scope`; ``fit`` then
distributes by itself. With fewer than two GPUs there is nothing to mirror, and the scope is a
no-op that says so (a laptop, CI and a one-GPU machine run the same code).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from tasks.errors import ParamsError

DISTRIBUTIONS: tuple[str, ...] = ("none", "mirrored")


def visible_gpus() -> list[str]:
    """Names of the GPUs TensorFlow can use (logical devices, after any memory or visibility limits)."""
    import tensorflow as tf

    return [device.name for device in tf.config.list_logical_devices("GPU")]


def make_strategy(name: str, devices: Sequence[str] | None = None) -> Any | None:
    """The strategy for ``name`` over ``devices`` (default: the visible GPUs), or None when training
    on one device: ``none``, or ``mirrored`` with fewer than two devices (a line says why)."""
    if name not in DISTRIBUTIONS:
        raise ParamsError(f"train.distribution: unknown strategy {name!r}; accepted: {list(DISTRIBUTIONS)}")
    if name == "none":
        return None
    devices = list(visible_gpus() if devices is None else devices)
    if len(devices) < 2:
        print(f"train.distribution=mirrored: {len(devices)} GPU(s) visible, nothing to mirror; training on one device")
        return None
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(devices=devices)
    print(
        f"train.distribution=mirrored: replicating over {strategy.num_replicas_in_sync} devices: {', '.join(devices)}"
    )
    return strategy


def strategy_scope(name: str = "none", devices: Sequence[str] | None = None) -> contextlib.AbstractContextManager:
    """A context manager to build and compile the model in: the strategy's scope when
    :func:`make_strategy` gives one, else a no-op."""
    strategy = make_strategy(name, devices)
    return strategy.scope() if strategy is not None else contextlib.nullcontext()

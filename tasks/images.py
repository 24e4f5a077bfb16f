"""Images as model input, identically for training, serving and explaining: the decoding in
``tasks.decoding`` (which the decoding workers import without NumPy), as NumPy arrays, and many
images decoded at once in parallel shards (:func:`decode_images`, :class:`ImageDecoding`)."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from tasks.decoding import decode_claimed_shards, decode_shard_into, resized_pixels, share_shard_counter
from tasks.shards import Executor, map_shards, require_executor


def load_image(source: Path | bytes, size: int) -> np.ndarray:
    """Decode an image file (or its bytes) to an RGB ``uint8`` array of shape (size, size, 3), as
    ``tasks.decoding`` decodes it."""
    return np.frombuffer(resized_pixels(source, size), dtype=np.uint8).reshape(size, size, 3)


def decode_shard(paths: list[str], size: int) -> np.ndarray:
    """``paths`` decoded and resized to ``size``, stacked into one uint8 array, in order (what a
    Dask worker returns)."""
    return np.stack([load_image(Path(p), size) for p in paths])


def normalize_for_mobilenet(images: np.ndarray) -> np.ndarray:
    """Scale uint8 pixels to [-1, 1], the range MobileNetV2 was trained on."""
    return images.astype(np.float32) / 127.5 - 1.0


def _shards(paths: Sequence[str | Path], workers: int) -> list[tuple[int, list[str]]]:
    """``paths`` cut into ``(first_row, paths)`` shards for ``workers`` workers (0: one per core)."""
    n_workers = workers or os.cpu_count() or 1
    # Small shards: the last ones finish close together (256-image shards left a worker idle ~0.2 s)
    chunk = max(16, min(128, len(paths) // (n_workers * 8) or 1))
    return [(start, [str(p) for p in paths[start : start + chunk]]) for start in range(0, len(paths), chunk)]


def _create_images_file(out: Path, n_images: int, size: int) -> int:
    """Create the ``.npy`` file ``out`` for ``n_images`` images (its data not yet written: a sparse
    file) and return the offset of the data, where the workers write (through the file: the map
    is dropped at once)."""
    return np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(n_images, size, size, 3)).offset


def _decode_in_memory(
    paths: Sequence[str | Path], size: int, workers: int, executor: Executor, dask_address: str
) -> np.ndarray:
    """The decoded images as one array, the shards run by :func:`tasks.shards.map_shards`."""
    blocks = map_shards(
        partial(decode_shard, size=size),
        [rows for _, rows in _shards(paths, workers)],
        executor=executor,
        workers=workers,
        dask_address=dask_address,
        desc="decode images",
    )
    return np.concatenate([np.empty((0, size, size, 3), dtype=np.uint8), *blocks])


def _decode_into_file(
    paths: Sequence[str | Path], size: int, out: Path, workers: int, executor: Executor, dask_address: str
) -> None:
    """The decoded images written to the ``.npy`` file ``out``: by local workers straight into it,
    or gathered from Dask and saved."""
    if not paths or executor == "dask":
        np.save(out, _decode_in_memory(paths, size, workers, executor, dask_address))
        return
    fill = partial(decode_shard_into, size=size, out=str(out), offset=_create_images_file(out, len(paths), size))
    map_shards(fill, _shards(paths, workers), executor=executor, workers=workers, desc="decode images")


class ImageDecoding:
    """Decoding images into the ``.npy`` file ``out`` while the caller does other work.

    ``with ImageDecoding(size, out, ...) as decoding:`` gets the workers ready (spawned worker
    processes take 0.1 s to start: they start now, while the caller reads its metadata);
    :meth:`start` gives them the paths; :meth:`finish` waits for the decoding and returns the
    seconds since :meth:`start`. With local processes (the default) there is one worker process
    per core beyond the first, and :meth:`finish` makes the calling thread the last worker: it
    claims shards from the same counter once its own work is done, so it never competes with that
    work for the GIL or for a core. Otherwise (threads, Dask, one worker) the decoding runs from a
    background thread. The array is the same byte for byte whichever worker decoded which shard.

    Leaving the block waits for every worker, and after an exception no further shard is started:
    nothing writes into ``out`` once the block is left.
    """

    def __init__(
        self, size: int, out: Path, *, workers: int = 0, executor: Executor = "processes", dask_address: str = ""
    ) -> None:
        require_executor(executor)
        self.size, self.out = size, Path(out)
        self.workers, self.executor, self.dask_address = workers, executor, dask_address
        self._counter = None
        self._n_processes = 0
        self._decode: Callable[..., int] | None = None
        self._pending: list[Future] = []

    def __enter__(self) -> ImageDecoding:
        n_processes = (self.workers or os.cpu_count() or 1) - 1
        if self.executor == "processes" and n_processes > 0:
            self._n_processes = n_processes
            # spawn, not fork: the caller may already have TensorFlow (and its threads) loaded
            context = multiprocessing.get_context("spawn")
            self._counter = context.Value("q", 0)
            self._pool = ProcessPoolExecutor(
                n_processes, mp_context=context, initializer=share_shard_counter, initargs=(self._counter,)
            )
            for _ in range(n_processes):  # a process is spawned per task submitted: start them all now
                self._pool.submit(os.getpid)
        else:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="decode")
        return self

    def start(self, paths: Sequence[str | Path]) -> None:
        """Begin decoding ``paths`` (row ``i`` of ``out`` is ``paths[i]``)."""
        self._started = time.perf_counter()
        if self._counter is None:
            decode = partial(
                _decode_into_file, paths, self.size, self.out, self.workers, self.executor, self.dask_address
            )
            self._pending = [self._pool.submit(decode)]
            return
        if not paths:
            np.save(self.out, np.empty((0, self.size, self.size, 3), dtype=np.uint8))
            return
        offset = _create_images_file(self.out, len(paths), self.size)
        self._decode = partial(decode_claimed_shards, _shards(paths, self.workers), self.size, str(self.out), offset)
        self._pending = [self._pool.submit(self._decode) for _ in range(self._n_processes)]

    def finish(self) -> float:
        """Decode alongside the workers (local processes) and wait for all of them; the seconds
        since :meth:`start`. A worker's error is raised here."""
        if self._decode is not None:
            self._decode(counter=self._counter)
        for future in self._pending:
            future.result()
        return time.perf_counter() - self._started

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None and self._counter is not None:
            with self._counter.get_lock():
                self._counter.value = 1 << 62  # every shard claimed: the workers stop after their current one
        self._pool.shutdown(wait=True, cancel_futures=True)


def decode_images(
    paths: Sequence[str | Path],
    size: int,
    workers: int = 0,
    executor: Executor = "processes",
    dask_address: str = "",
    *,
    out: Path | None = None,
) -> np.ndarray:
    """Decode and resize ``paths`` into one uint8 array (N x size x size x 3), in parallel shards.

    The shards run in local processes or threads (``workers``; 0: one per core, 1: here) or, with
    ``executor="dask"``, on a Dask cluster (``dask_address``, or a local one of ``workers``
    processes); the array is the same byte for byte either way (see ``tasks.shards``).

    With ``out`` the array is the ``.npy`` file there, returned memory-mapped read-only: local
    workers write their rows into it directly instead of sending them back (see
    :func:`tasks.decoding.decode_shard_into` and :class:`ImageDecoding`).
    """
    if out is None:
        return _decode_in_memory(paths, size, workers, executor, dask_address)
    with ImageDecoding(size, out, workers=workers, executor=executor, dask_address=dask_address) as decoding:
        decoding.start(paths)
        decoding.finish()
    return np.load(out, mmap_mode="r")

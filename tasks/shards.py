"""Running a stage's independent shards: in this process, in threads, in local processes, or on Dask.

Image decoding (preprocess) and row checking with decoding (triage) split into shards that need
nothing from each other. :func:`map_shards` runs them where the params say and returns the results
in shard order, so the assembled output is the same, byte for byte, wherever they ran.

``executor: processes`` (spawned, one per core) suits CPU work, image decoding included: a worker
imports only what its function needs (the decoding workers start in 0.1 s, without NumPy), and no
worker waits on another, or on the caller, for the GIL. ``threads`` start at once and share memory,
but decoding threads stall while the caller's thread holds the GIL (the preprocess stage computes
its splits meanwhile): on HAM10000 they were 5-10% slower than processes. They suit callers that
cannot spawn cheaply (a heavy ``__main__`` that every spawned worker re-imports).

``executor: dask`` uses ``dask.distributed``: ``dask_address`` names a running scheduler (``dask
scheduler`` and ``dask worker tcp://HOST:8786`` on the machines that share the data path), or,
empty, a local cluster of ``workers`` single-threaded processes is started for the call and closed
after. Workers must see the same file paths and the same project code (installed, or on their PYTHONPATH).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from tasks.errors import SkinriskError

Executor = Literal["processes", "threads", "dask"]
EXECUTORS: tuple[str, ...] = ("processes", "threads", "dask")
CONNECT_TIMEOUT_S = 15

Shard = TypeVar("Shard")
Result = TypeVar("Result")
T = TypeVar("T")


def require_executor(executor: str) -> None:
    """Refuse an executor name that is not one of :data:`EXECUTORS`, naming the accepted ones."""
    if executor not in EXECUTORS:
        raise SkinriskError(f"unknown executor {executor!r}; accepted: {list(EXECUTORS)}")


@contextlib.contextmanager
def dask_client(address: str = "", workers: int = 0) -> Iterator[Any]:
    """A ``distributed.Client`` on the scheduler at ``address``, or on a local cluster started here
    (``workers`` processes of one thread; 0: one per core) and closed on exit."""
    from distributed import Client, LocalCluster

    if address:
        try:
            client = Client(address, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise SkinriskError(
                f"no Dask scheduler answers at {address} within {CONNECT_TIMEOUT_S} s ({exc}): start one "
                "(`dask scheduler`, then `dask worker ADDRESS` where the data is), or set "
                'preprocess.dask_address="" for a local cluster'
            ) from exc
        with client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=workers or os.cpu_count() or 1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # any free port: never clash with another cluster on 8787
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def map_shards(
    fn: Callable[[Shard], Result],
    shards: Sequence[Shard],
    *,
    executor: Executor = "processes",
    workers: int = 0,
    dask_address: str = "",
    desc: str | None = None,
) -> list[Result]:
    """``fn(shard)`` for every shard, results in shard order.

    ``threads`` or ``processes`` with ``workers == 1`` runs them here, one after the other; with
    more, in a pool of threads or of spawned processes (0: one per core). ``dask`` runs them on a
    Dask cluster (see module docstring). ``fn`` must be importable by name (a module-level function
    or a ``functools.partial`` of one). ``desc`` names the progress bar drawn on a terminal.
    """
    require_executor(executor)
    if not shards:
        return []
    if executor == "dask":
        with dask_client(dask_address, workers) as client:
            # pure=False: shards are never deduplicated or served from an earlier call's results
            return client.gather(client.map(fn, list(shards), pure=False))
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(shards) == 1:
        return list(progress(map(fn, shards), desc, total=len(shards), unit="shard"))
    if executor == "threads":
        with ThreadPoolExecutor(max_workers=min(workers, len(shards)), thread_name_prefix="shard") as pool:
            return list(progress(pool.map(fn, shards), desc, total=len(shards), unit="shard"))
    # spawn, not fork: the caller may already have TensorFlow (and its threads) loaded.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(shards)), mp_context=context) as pool:
        return list(progress(pool.map(fn, shards), desc, total=len(shards), unit="shard"))


def chunks(items: Sequence[T], workers: int, *, minimum: int = 8, per_worker: int = 4) -> list[Sequence[T]]:
    """``items`` cut into about ``per_worker`` shards per worker (0 workers: one per core), each of
    at least ``minimum`` items: small enough to balance the workers, large enough to amortise IPC."""
    workers = workers or os.cpu_count() or 1
    size = max(minimum, math.ceil(len(items) / (per_worker * workers)))
    return [items[start : start + size] for start in range(0, len(items), size)]


def progress(items: Iterable[T], desc: str | None, **tqdm_args) -> Iterable[T]:
    """``items`` with a tqdm bar on a terminal (none in a log or under pytest), or as they are without ``desc``."""
    if desc is None:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=None, leave=False, **tqdm_args)

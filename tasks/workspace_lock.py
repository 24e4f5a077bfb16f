"""One pipeline run at a time per output folder: a second concurrent run is refused, clearly.

Two runs writing the same ``data/processed``, ``models`` or ``reports`` would interleave files from
different runs (the checkpoints of one resumed by the other, metrics of one model beside another).
``dvc repro`` already refuses this with its repository lock; :func:`workspace_lock` does the same for
the Prefect flows. Each output folder has an exclusive ``flock`` on its own lock file, held for the
whole run and released by the kernel even when the process is killed, so a lock is never stale.
Runs with different output folders proceed side by side.

Lock files live in ``$SKINRISK_LOCK_DIR`` (default: a per-user folder in the temp directory), named
after the folder they guard, and say which process holds them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tasks.errors import SkinriskError


class WorkspaceBusy(SkinriskError):
    """Another run holds an output folder this run would write."""


def lock_dir() -> Path:
    default = Path(tempfile.gettempdir()) / f"skinrisk-locks-{os.getuid()}"
    return Path(os.environ.get("SKINRISK_LOCK_DIR") or default)


def lock_file(folder: Path | str) -> Path:
    """The lock file guarding ``folder`` (by its resolved path)."""
    target = Path(folder).resolve()
    digest = hashlib.sha256(str(target).encode()).hexdigest()[:12]
    return lock_dir() / f"{target.name or 'root'}-{digest}.lock"


def _holder(handle) -> str:
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        info = {}
    if not info:
        return "a process that has not written its name yet"
    return f"{info.get('owner', 'a run')}, pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"


@contextlib.contextmanager
def workspace_lock(folders: Iterable[Path | str], owner: str = "a pipeline run") -> Iterator[None]:
    """Hold the locks of ``folders`` for the duration of the block; raise :class:`WorkspaceBusy`
    at once (never wait) if another run holds any of them."""
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    targets = sorted({Path(folder).resolve() for folder in folders})  # one order: no lock-order deadlock
    held = []
    try:
        for target in targets:
            path = lock_file(target)
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held until the block ends)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(handle)
                handle.close()
                raise WorkspaceBusy(
                    f"{target} is being written by another pipeline run ({holder}); wait for it to finish, or "
                    f"give this run its own output folders (processed_dir, model_dir, reports_dir). Lock file: {path}"
                ) from None
            handle.seek(0)
            handle.truncate()
            info = {
                "owner": owner,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "folder": str(target),
            }
            handle.write(json.dumps(info))
            handle.flush()
            held.append(handle)
        yield
    finally:
        for handle in reversed(held):
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

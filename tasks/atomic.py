"""Atomic outputs: a stage's files appear complete or not at all, and a failure keeps the old ones.

Everything is first written beside its destination (same filesystem) and then moved in with
``os.replace``, which is atomic for files and for renaming a directory onto a missing path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(directory: bool) -> int:
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual permissions.
    return (0o777 if directory else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``destination`` only if the block succeeds.

    The path ends in the destination's suffixes (``.tmp.weights.h5``), for writers that pick the
    format by the name (Keras, matplotlib).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp" + "".join(destination.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=suffix, dir=destination.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(_default_mode(directory=False))
    try:
        yield tmp
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(destination: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(destination) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(destination: Path, payload: Any) -> None:
    """Write JSON atomically, indented and key-sorted so that DVC and git diffs stay readable."""
    write_text(destination, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(destination: Path) -> Iterator[Path]:
    """Yield an empty staging directory that replaces ``destination`` only if the block succeeds.

    The previous ``destination`` is moved aside first and deleted only after the new one is in
    place, so an exception (or a kill) at any point leaves either the old or the new directory.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    staging.chmod(_default_mode(directory=True))
    try:
        yield staging
        if destination.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old.", dir=destination.parent))
            os.replace(destination, retired / "content")
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

"""Data versioning with DVC: track an import, and name the data version a run was trained on."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import yaml

from tasks.schema import RAW_SOURCE_FILE

log = logging.getLogger(__name__)


def find_dvc_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` that holds a ``.dvc`` directory."""
    for folder in [start.resolve(), *start.resolve().parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def track_with_dvc(path: Path) -> bool:
    """``dvc add path`` when ``path`` is inside a DVC project; returns whether it was tracked."""
    root = find_dvc_root(Path(path).parent)
    if root is None:
        return False
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.add(str(Path(path).resolve()))
    return True


def data_version(raw_dir: Path) -> str:
    """A short, stable identifier of the imported data.

    The DVC hash from ``<raw_dir>.dvc`` when DVC tracks the import (what ``dvc checkout`` would
    restore), otherwise a hash of the import's ``SOURCE.json``.
    """
    raw_dir = Path(raw_dir)
    dvc_file = raw_dir.with_name(raw_dir.name + ".dvc")
    if dvc_file.exists():
        outs = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("outs") or [{}]
        md5 = outs[0].get("md5")
        if md5:
            return f"dvc:{md5}"
    source = raw_dir / RAW_SOURCE_FILE
    if source.exists():
        payload = json.loads(source.read_text(encoding="utf-8"))
        return "sha256:" + hashlib.sha256(payload.get("metadata_sha256", "").encode()).hexdigest()[:16]
    return "unknown"


def data_source(raw_dir: Path) -> str:
    """``synthetic`` when the import came from the synthetic sample, else ``imported``."""
    source = Path(raw_dir) / RAW_SOURCE_FILE
    if not source.exists():
        return "unknown"
    payload = json.loads(source.read_text(encoding="utf-8"))
    return "synthetic" if payload.get("synthetic") else "imported"

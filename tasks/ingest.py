"""Import HAM10000 from the layouts people download into one canonical, immutable raw layout.

Accepted sources (a folder, or a zip of any of them):

- Kaggle: ``HAM10000_metadata.csv`` beside ``HAM10000_images_part_1/`` and ``_part_2/``;
- Harvard Dataverse: ``HAM10000_images_part_1.zip``, ``HAM10000_images_part_2.zip`` and
  ``HAM10000_metadata`` as ``.csv`` or ``.tab`` (newer releases add a ``dataset`` column);
- a flat folder of images beside one metadata CSV.

The result, ``raw_dir/metadata.csv`` plus ``raw_dir/images/<image_id>.jpg`` and
``raw_dir/SOURCE.json``, is staged beside ``raw_dir`` and moved in only when complete.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from tasks.atomic import atomic_directory, write_json
from tasks.decoding import decode_error_reason
from tasks.errors import DataError
from tasks.metadata import read_metadata_table, require_columns
from tasks.params import DataParams
from tasks.schema import (
    IMAGE_SUFFIXES,
    METADATA_COLUMNS,
    RAW_IMAGES_DIR,
    RAW_METADATA_FILE,
    RAW_SOURCE_FILE,
    raw_image_path,
)

EXTRA_COLUMNS_FILE = "extra_columns.csv"
SYNTHETIC_MARKER = "synthetic_truth.csv"  # written beside every synthetic sample
_METADATA_SUFFIXES = (".csv", ".tab")


@dataclass
class ImportSummary:
    """What an import wrote, for the console and for ``SOURCE.json``."""

    source: str
    raw_dir: str
    layout: str
    n_images: int
    n_lesions: int
    dx_counts: dict[str, int]
    unlisted_images: int = 0
    converted_to_jpeg: int = 0
    extra_columns: list[str] = field(default_factory=list)
    metadata_sha256: str = ""
    synthetic: bool = False  # made by `skinrisk data synth`, not real dermoscopy


_ImageEntry = tuple[str, Callable[[], bytes]]  # an image in the source: where it is, how to read its bytes


def _walk_images(root: Path) -> Iterator[tuple[str, _ImageEntry]]:
    """Every image under ``root``, including those inside zip archives (Dataverse layout)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                yield path.stem, (str(path), path.read_bytes)
            elif suffix == ".zip":
                yield from _walk_zip(path)


def _walk_zip(archive_path: Path) -> Iterator[tuple[str, _ImageEntry]]:
    try:
        archive = zipfile.ZipFile(archive_path)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive_path} is not a valid zip archive ({exc}); re-download it") from exc
    for member in archive.infolist():
        if member.is_dir() or "__MACOSX" in member.filename:
            continue
        member_path = Path(member.filename)
        if member_path.suffix.lower() in IMAGE_SUFFIXES:

            def read(member: zipfile.ZipInfo = member) -> bytes:
                try:
                    return archive.read(member)
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise DataError(
                        f"{archive_path}!{member.filename} is corrupt in the archive ({exc}); "
                        f"download {archive_path.name} again"
                    ) from exc

            yield member_path.stem, (f"{archive_path}!{member.filename}", read)


def _find_metadata(root: Path) -> Path:
    candidates = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in _METADATA_SUFFIXES and "__MACOSX" not in p.parts
    )
    named = [p for p in candidates if "metadata" in p.name.lower()]
    if named:
        # Prefer the shallowest, canonically named table (Kaggle ships hmnist_*.csv beside it).
        return min(named, key=lambda p: (len(p.relative_to(root).parts), p.name != "HAM10000_metadata.csv"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DataError(
            f"no metadata table (.csv or .tab) found under {root}; expected HAM10000_metadata.csv "
            "(Kaggle), HAM10000_metadata.tab (Dataverse) or one CSV beside the images"
        )
    raise DataError(
        f"several tables under {root} and none named *metadata*: "
        f"{[str(p.relative_to(root)) for p in candidates]}; keep only the metadata table"
    )


def _describe_layout(root: Path) -> str:
    names = {p.name.lower() for p in root.rglob("*")}
    if "ham10000_images_part_1.zip" in names:
        return "dataverse"
    if "ham10000_images_part_1" in names:
        return "kaggle"
    return "flat"


def _jpeg_bytes(data: bytes, location: str) -> tuple[bytes, bool]:
    """The image as JPEG bytes: JPEGs are kept byte for byte, others re-encoded once."""
    if data[:3] == b"\xff\xd8\xff":
        return data, False
    try:
        with Image.open(io.BytesIO(data)) as image:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=95)
    except Exception as exc:  # PIL raises many types for undecodable files
        raise DataError(f"{location} is neither a JPEG nor a readable image ({decode_error_reason(exc)})") from exc
    return buffer.getvalue(), True


def _starts_like_a_zip(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _prepare_source(source: Path, scratch: Path) -> Path:
    if source.is_dir():
        return source
    if source.is_file() and zipfile.is_zipfile(source):
        target = scratch / "source"
        try:
            with zipfile.ZipFile(source) as archive:
                archive.extractall(target)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise DataError(f"{source} is a corrupt zip archive ({exc}); download it again") from exc
        return target
    if source.is_file() and (source.suffix.lower() == ".zip" or _starts_like_a_zip(source)):
        raise DataError(
            f"{source} is a zip archive that cannot be opened (truncated or corrupt: its table of "
            "contents is missing); download it again"
        )
    if source.exists():
        raise DataError(f"{source} is neither a folder nor a zip archive")
    raise DataError(f"source {source} does not exist")


def import_dataset(source: Path, raw_dir: Path, *, force: bool = False, progress: bool = True) -> ImportSummary:
    """Copy a HAM10000 download at ``source`` into the canonical raw layout at ``raw_dir``.

    Raises :class:`DataError` (and leaves ``raw_dir`` as it was) when the metadata table is
    missing, empty or lacks a column, or when a listed image cannot be found in ``source``.
    ``raw_dir`` is immutable: replacing an existing import needs ``force=True``.
    """
    source, raw_dir = Path(source), Path(raw_dir)
    if raw_dir.exists() and not force:
        raise DataError(
            f"{raw_dir} already holds an import (raw data is immutable); pass --force to replace it with a new version"
        )
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw_dir.parent, prefix=".import-scratch-") as scratch:
        root = _prepare_source(source, Path(scratch))
        metadata_path = _find_metadata(root)
        table = read_metadata_table(metadata_path)
        require_columns(table, metadata_path)
        extra_columns = [c for c in table.columns if c not in METADATA_COLUMNS]

        wanted = set(table["image_id"])
        found: dict[str, _ImageEntry] = {}
        unlisted = 0
        for image_id, entry in _walk_images(root):
            if image_id in wanted:
                found.setdefault(image_id, entry)  # Kaggle ships the parts twice; first wins
            else:
                unlisted += 1
        missing = [i for i in table["image_id"] if i not in found]
        if missing:
            raise DataError(
                f"{len(missing)} image(s) listed in {metadata_path} were not found under {source}: "
                f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; nothing was imported"
            )

        converted = 0
        with atomic_directory(raw_dir) as staging:
            (staging / RAW_IMAGES_DIR).mkdir()
            for image_id in tqdm(dict.fromkeys(table["image_id"]), desc="import", unit="img", disable=not progress):
                location, read = found[image_id]
                data, was_converted = _jpeg_bytes(read(), location)
                converted += was_converted
                raw_image_path(staging, image_id).write_bytes(data)
            metadata = table[list(METADATA_COLUMNS)]
            metadata.to_csv(staging / RAW_METADATA_FILE, index=False)
            if extra_columns:
                table[["image_id", *extra_columns]].to_csv(staging / EXTRA_COLUMNS_FILE, index=False)
            summary = ImportSummary(
                source=str(source.resolve()),
                raw_dir=str(raw_dir),
                layout=_describe_layout(root),
                n_images=len(metadata),
                n_lesions=int(metadata["lesion_id"].nunique()),
                dx_counts=dict(Counter(metadata["dx"]).most_common()),
                unlisted_images=unlisted,
                converted_to_jpeg=converted,
                extra_columns=extra_columns,
                synthetic=any(root.rglob(SYNTHETIC_MARKER)),
                metadata_sha256=hashlib.sha256((staging / RAW_METADATA_FILE).read_bytes()).hexdigest(),
            )
            imported_at = datetime.now(UTC).isoformat(timespec="seconds")
            write_json(staging / RAW_SOURCE_FILE, {**asdict(summary), "imported_at": imported_at})
    return summary


def read_raw_metadata(raw_dir: Path) -> pd.DataFrame:
    """The canonical metadata table of an import, as strings (see ``read_metadata_table``)."""
    path = Path(raw_dir) / RAW_METADATA_FILE
    if not path.exists():
        raise DataError(
            f"{path} not found: import data first (`skinrisk data import SOURCE`, "
            "or `skinrisk data synth` for the synthetic sample)"
        )
    return read_metadata_table(path)


def format_summary(summary: ImportSummary) -> str:
    """Counts per diagnosis as a small console table."""
    width = max(len(dx) for dx in summary.dx_counts) if summary.dx_counts else 2
    lines = [
        f"imported {summary.n_images} images of {summary.n_lesions} lesions "
        f"({summary.layout} layout) into {summary.raw_dir}",
    ]
    for dx, count in summary.dx_counts.items():
        lines.append(f"  {dx:<{width}} {count:>6}  ({count / summary.n_images:6.1%})")
    if summary.unlisted_images:
        lines.append(f"  ignored {summary.unlisted_images} image file(s) not listed in the metadata")
    if summary.converted_to_jpeg:
        lines.append(f"  re-encoded {summary.converted_to_jpeg} non-JPEG image(s) as JPEG")
    if summary.extra_columns:
        lines.append(f"  kept extra column(s) {summary.extra_columns} in {EXTRA_COLUMNS_FILE}")
    return "\n".join(lines)


def ensure_imported(raw_dir: Path, synthetic_dir: Path, params: DataParams) -> str:
    """Make sure ``raw_dir`` holds data: the embedded synthetic sample when nothing was imported.

    Returns ``"synthetic"`` or ``"imported"``: what ``raw_dir`` holds now.
    """
    from tasks.synth import synthesize_ham10000
    from tasks.versioning import data_source, track_with_dvc

    raw_dir = Path(raw_dir)
    if (raw_dir / RAW_METADATA_FILE).exists():
        return data_source(raw_dir)
    print(f"no data imported in {raw_dir}: using the synthetic sample ({params.synthetic_images} images)")
    synthesize_ham10000(
        Path(synthetic_dir),
        n_images=params.synthetic_images,
        seed=params.synthetic_seed,
        width=params.synthetic_width,
        height=params.synthetic_height,
    )
    print(format_summary(import_dataset(Path(synthetic_dir), raw_dir, force=True, progress=False)))
    track_with_dvc(raw_dir)
    return "synthetic"

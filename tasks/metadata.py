"""Reading HAM10000 metadata tables as they are shipped (CSV or Dataverse tab-separated)."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from tasks.errors import DataError
from tasks.schema import METADATA_COLUMNS


def read_metadata_table(path: Path) -> pd.DataFrame:
    """Read a metadata table with every cell as a string, exactly as written.

    Nothing is coerced here (a blank age stays ``""``, a typo stays a typo) so that validation
    can point at the offending row. Raises :class:`DataError` for a missing, empty or unparseable
    file. Dataverse ``.tab`` files are tab-separated; the separator is sniffed otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"metadata file {path} does not exist")
    text_head = path.read_text(encoding="utf-8-sig", errors="replace")[:4096]
    if not text_head.strip():
        raise DataError(f"metadata file {path} is empty: expected a header row {list(METADATA_COLUMNS)}")
    separator = "\t" if path.suffix == ".tab" or text_head.count("\t") > text_head.count(",") else ","
    try:
        table = pd.read_csv(
            path,
            sep=separator,
            dtype=str,
            keep_default_na=False,
            encoding="utf-8-sig",
            quoting=csv.QUOTE_MINIMAL,
        )
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"metadata file {path} cannot be parsed as a table: {exc}") from exc
    table.columns = [str(c).strip().strip('"') for c in table.columns]
    # Dataverse .tab exports quote strings; strip stray quotes and whitespace from every cell.
    table = table.apply(lambda column: column.str.strip().str.strip('"'))
    if table.empty:
        raise DataError(f"metadata file {path} has a header but no rows")
    return table


def missing_columns(table: pd.DataFrame) -> list[str]:
    """Required HAM10000 columns absent from ``table``."""
    return [c for c in METADATA_COLUMNS if c not in table.columns]


def require_columns(table: pd.DataFrame, source: Path) -> None:
    """Raise a :class:`DataError` naming the missing columns and the ones found instead."""
    missing = missing_columns(table)
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; found {list(table.columns)}; "
            f"a HAM10000 metadata table has {list(METADATA_COLUMNS)}"
        )

import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tasks.errors import DataError
from tasks.ingest import import_dataset
from tasks.schema import METADATA_COLUMNS, RAW_METADATA_FILE, RAW_SOURCE_FILE, raw_image_path


def _images(source: Path) -> list[Path]:
    return sorted(source.glob("HAM10000_images_part_*/*.jpg"))


def _assert_complete_import(raw: Path, source: Path) -> None:
    metadata = pd.read_csv(raw / RAW_METADATA_FILE, dtype=str, keep_default_na=False)
    assert tuple(metadata.columns) == METADATA_COLUMNS
    original = pd.read_csv(source / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    assert metadata["image_id"].tolist() == original["image_id"].tolist()
    for image in _images(source):
        assert raw_image_path(raw, image.stem).read_bytes() == image.read_bytes()
    assert (raw / RAW_SOURCE_FILE).exists()


def test_kaggle_layout_imports_byte_for_byte(synthetic_source, tmp_path):
    summary = import_dataset(synthetic_source, tmp_path / "raw", progress=False)
    _assert_complete_import(tmp_path / "raw", synthetic_source)
    assert summary.layout == "kaggle"
    assert summary.synthetic
    assert sum(summary.dx_counts.values()) == summary.n_images == 280


def test_dataverse_layout_with_image_zips_and_tab_metadata(synthetic_source, tmp_path):
    source = tmp_path / "dataverse"
    source.mkdir()
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        with zipfile.ZipFile(source / f"{part}.zip", "w") as archive:
            for image in sorted((synthetic_source / part).glob("*.jpg")):
                archive.write(image, image.name)
    metadata = pd.read_csv(synthetic_source / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    metadata["dataset"] = "vidir_modern"  # newer releases add this column
    metadata.to_csv(source / "HAM10000_metadata.tab", sep="\t", index=False)

    summary = import_dataset(source, tmp_path / "raw", progress=False)
    _assert_complete_import(tmp_path / "raw", synthetic_source)
    assert summary.layout == "dataverse"
    assert summary.extra_columns == ["dataset"]
    assert (tmp_path / "raw" / "extra_columns.csv").exists()


def test_flat_folder_and_zip_of_it(synthetic_source, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in _images(synthetic_source):
        shutil.copy(image, flat / image.name)
    shutil.copy(synthetic_source / "HAM10000_metadata.csv", flat / "labels_metadata.csv")
    assert import_dataset(flat, tmp_path / "raw_flat", progress=False).layout == "flat"
    _assert_complete_import(tmp_path / "raw_flat", synthetic_source)

    archive = shutil.make_archive(str(tmp_path / "download"), "zip", synthetic_source)
    import_dataset(Path(archive), tmp_path / "raw_zip", progress=False)
    _assert_complete_import(tmp_path / "raw_zip", synthetic_source)


def _copy_source(synthetic_source: Path, tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(synthetic_source, source)
    return source


def test_missing_image_names_it_and_writes_nothing(synthetic_source, tmp_path):
    source = _copy_source(synthetic_source, tmp_path)
    victim = _images(source)[3]
    victim.unlink()
    with pytest.raises(DataError) as error:
        import_dataset(source, tmp_path / "raw", progress=False)
    assert victim.stem in str(error.value) and "nothing was imported" in str(error.value)
    assert not (tmp_path / "raw").exists()
    assert not list(tmp_path.glob(".raw*")) and not list(tmp_path.glob(".import-scratch-*"))


def test_missing_column_names_it(synthetic_source, tmp_path):
    source = _copy_source(synthetic_source, tmp_path)
    table = pd.read_csv(source / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    table.drop(columns=["localization"]).to_csv(source / "HAM10000_metadata.csv", index=False)
    with pytest.raises(DataError, match=r"missing column.*localization"):
        import_dataset(source, tmp_path / "raw", progress=False)


def test_empty_metadata_file_is_refused(synthetic_source, tmp_path):
    source = _copy_source(synthetic_source, tmp_path)
    (source / "HAM10000_metadata.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        import_dataset(source, tmp_path / "raw", progress=False)


def test_no_metadata_table_is_refused(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="no metadata table"):
        import_dataset(tmp_path / "images", tmp_path / "raw", progress=False)


def test_missing_source_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        import_dataset(tmp_path / "nowhere", tmp_path / "raw", progress=False)


def test_raw_data_is_immutable_unless_forced(synthetic_source, tmp_path):
    raw = tmp_path / "raw"
    import_dataset(synthetic_source, raw, progress=False)
    before = (raw / RAW_SOURCE_FILE).read_text()
    with pytest.raises(DataError, match="--force"):
        import_dataset(synthetic_source, raw, progress=False)
    assert (raw / RAW_SOURCE_FILE).read_text() == before

    broken = _copy_source(synthetic_source, tmp_path)
    _images(broken)[0].unlink()
    with pytest.raises(DataError):
        import_dataset(broken, raw, force=True, progress=False)
    assert (raw / RAW_SOURCE_FILE).read_text() == before, "a failed forced import must keep the old data"
    import_dataset(synthetic_source, raw, force=True, progress=False)
    _assert_complete_import(raw, synthetic_source)

"""Bad input gets one clear error line (what, where, what to do) and writes nothing; see the
README's bad-input table. Cases that need a trained model live beside their stage's tests
(triage: tests/model/test_promote.py)."""

import shutil
import zipfile
from pathlib import Path

import pytest

from tasks.cli import main
from tasks.clinical import clinical_frame
from tasks.decoding import resized_pixels
from tasks.errors import DataError, ParamsError
from tasks.ingest import import_dataset
from tasks.params import load_params


@pytest.fixture
def blocked(tmp_path) -> Path:
    """A path that cannot be created, even as root: its parent is a file."""
    (tmp_path / "a-file").write_text("not a folder\n")
    return tmp_path / "a-file" / "target"


@pytest.mark.parametrize(
    "command",
    [
        lambda source, raw, blocked: ["data", "import", str(source), "--raw-dir", str(blocked)],
        lambda source, raw, blocked: ["validate", "--raw-dir", str(raw), "--reports-dir", str(blocked)],
    ],
    ids=["data import --raw-dir", "validate --reports-dir"],
)
def test_an_unwritable_target_is_one_error_line(
    command, synthetic_source, raw_dir, blocked, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("validate: {min_image_side: 16, workers: 1}\n")
    assert main(command(synthetic_source, raw_dir, blocked)) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("error: cannot use") and "a-file" in err and "permissions" in err, err


def _corrupted(archive: Path, member_suffix: str) -> None:
    """Flip one byte inside the (stored, uncompressed) data of the first member ending so."""
    with zipfile.ZipFile(archive) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
    data = bytearray(archive.read_bytes())
    name_length = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_length + extra_length
    data[start + info.compress_size // 2] ^= 0xFF
    archive.write_bytes(bytes(data))


def test_a_zip_with_a_bad_crc_is_a_clear_error_and_imports_nothing(synthetic_source, tmp_path):
    archive = Path(shutil.make_archive(str(tmp_path / "download"), "zip", synthetic_source))
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:  # stored: the flipped byte is image data
        for path in sorted(synthetic_source.rglob("*")):
            z.write(path, path.relative_to(synthetic_source))
    _corrupted(archive, ".jpg")
    with pytest.raises(DataError, match=r"corrupt zip archive .*CRC.*download it again"):
        import_dataset(archive, tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


def test_a_truncated_zip_is_called_truncated(synthetic_source, tmp_path):
    archive = Path(shutil.make_archive(str(tmp_path / "download"), "zip", synthetic_source))
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        import_dataset(archive, tmp_path / "raw", progress=False)


def test_an_undecodable_image_error_names_no_buffer():
    with pytest.raises(DataError) as caught:
        resized_pixels(b"not an image at all", 32)
    assert "not an image file" in str(caught.value) and "BytesIO" not in str(caught.value)


def test_an_unknown_localization_names_its_line(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(
        {
            "lesion_id": ["HAM_1", "HAM_2"],
            "image_id": ["ISIC_1", "ISIC_2"],
            "dx": ["nv", "mel"],
            "dx_type": ["histo", "histo"],
            "age": ["40.0", "55.0"],
            "sex": ["male", "female"],
            "localization": ["back", "elbow"],
        }
    )
    with pytest.raises(DataError, match=r"metadata.csv line 3 \(image_id ISIC_2\): unknown localization 'elbow'"):
        clinical_frame(frame, tmp_path / "metadata.csv")


def test_a_key_given_twice_in_params_is_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  batch_size: 16\n  head_epochs: 2\n  batch_size: 64\n")
    with pytest.raises(ParamsError, match=r"params.yaml line 4, column 3: key 'batch_size' is given twice"):
        load_params(params)


def test_the_scoring_servers_quote_of_the_request_is_dropped():
    from tasks.serving import without_request_echo

    table = "   image  age\\n0  /9j/4AAQSkZJRgABAQ...  55"
    ours = "invalid input: 1 problem(s); rows are numbered from 0 in request order:\n  row 0, field 'sex': missing"
    assert without_request_echo(f"Failed to predict data '{table}'. \nError: {ours}") == ours
    schema = (
        f"Failed to enforce schema of data '{table}' with schema '['image': string]'. Error: Incompatible input types"
    )
    assert without_request_echo(f"Failed to predict data '{table}'. \nError: {schema}") == "Incompatible input types"
    assert without_request_echo(ours) == ours


def test_preprocess_to_an_unwritable_folder_is_one_error_line(raw_dir, blocked, tmp_path, monkeypatch, capsys):
    from tasks.params import ValidateParams
    from tasks.stages.validate import validate_raw

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("preprocess: {image_size: 32, workers: 1}\n")
    validate_raw(raw_dir, tmp_path / "reports", ValidateParams(min_image_side=16, workers=1))
    args = ["--raw-dir", str(raw_dir), "--reports-dir", str(tmp_path / "reports"), "--out", str(blocked)]
    assert main(["preprocess", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: cannot use") and "a-file" in err, err


def test_an_mlflow_model_without_a_keras_file_is_one_clear_error(tmp_path, monkeypatch):
    import mlflow

    import tasks.tracking
    from tasks.errors import SkinriskError
    from tasks.scored_model import load_bundle

    (tmp_path / "artifacts").mkdir()
    monkeypatch.setattr(tasks.tracking, "client", lambda: None)
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda artifact_uri: str(tmp_path))
    with pytest.raises(SkinriskError) as caught:
        load_bundle("models:/skinrisk@champion", tmp_path, tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert "models:/skinrisk@champion" in message and "no .keras file" in message
    assert str(tmp_path / "artifacts") in message and "skinrisk register" in message

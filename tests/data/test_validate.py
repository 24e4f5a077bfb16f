"""The validate stage: a tiny valid raw layout passes, and each kind of bad input fails clearly.

Every failing case asserts three things: the stage refuses, the failure is the expected one (and
only that one), and the message names what is wrong and where (column, line, image or file).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from tasks.stages import validate as validate_module
from tasks.errors import DataError
from tasks.params import ValidateParams
from tasks.schema import (
    AGE_RANGE,
    DIAGNOSES,
    DX_TYPES,
    LOCALIZATIONS,
    METADATA_COLUMNS,
    RAW_METADATA_FILE,
    SEXES,
    raw_image_path,
)
from tasks.stages.validate import GX_PROJECT, ValidationFailed, validate_raw
from tasks.stages.validate import _inspect_chunk as _original_inspect_chunk

# The tiny images are 40x30, so the smallest plausible side is lowered; one worker keeps the
# tests free of process start-up (one test covers the process pool).
PARAMS = ValidateParams(min_image_side=16, workers=1)
REAL_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ham10000-200px"


def _rows() -> list[dict[str, str]]:
    """Twelve rows over all seven diagnoses, two lesions imaged twice, one unknown age."""
    rows = []
    for i in range(12):
        rows.append(
            {
                "lesion_id": f"HAM_{i // 2 if i < 4 else i:07d}",
                "image_id": f"ISIC_{i:07d}",
                "dx": DIAGNOSES[i % len(DIAGNOSES)],
                "dx_type": ("histo", "follow_up", "consensus", "confocal")[i % 4],
                "age": "" if i == 5 else f"{20 + 5 * i}.0",
                "sex": ("male", "female", "unknown")[i % 3],
                "localization": ("back", "lower extremity", "face", "unknown")[i % 4],
            }
        )
    return rows


def write_metadata(raw_dir: Path, rows: list[dict[str, str]], columns=METADATA_COLUMNS) -> None:
    with (raw_dir / RAW_METADATA_FILE).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> None:
    noise = random.Random(path.name).randbytes(size[0] * size[1] * len(mode))
    Image.frombytes(mode, size, noise).save(path, format="JPEG", quality=90)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """A valid canonical raw layout: metadata.csv plus images/<image_id>.jpg."""
    raw_dir = tmp_path / "raw"
    (raw_dir / "images").mkdir(parents=True)
    rows = _rows()
    write_metadata(raw_dir, rows)
    for row in rows:
        write_image(raw_image_path(raw_dir, row["image_id"]))
    return raw_dir


@pytest.fixture
def reports(tmp_path: Path) -> Path:
    return tmp_path / "reports"


def fails(raw_dir: Path, reports_dir: Path, params: ValidateParams = PARAMS) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as caught:
        validate_raw(raw_dir, reports_dir, params)
    return caught.value


def failed_checks(error: ValidationFailed) -> list[tuple[str, str | None]]:
    return [(f.target, f.column) for f in error.failures]


def image_of(raw_dir: Path, index: int) -> Path:
    return raw_image_path(raw_dir, f"ISIC_{index:07d}")


# ------------------------------------------------------------------------------------ valid data


def test_valid_layout_passes_and_writes_both_reports(raw: Path, reports: Path) -> None:
    summary = validate_raw(raw, reports, PARAMS)

    assert (summary.n_images, summary.n_lesions, summary.failures) == (12, 10, [])
    assert summary.evaluated >= 15
    payload = json.loads(summary.report_json.read_text())
    assert payload["success"] is True
    assert payload["counts"]["images"] == 12
    assert all(e["status"] == "passed" for e in payload["expectations"])
    markdown = summary.report_markdown.read_text()
    assert markdown.startswith("# Raw data validation: PASSED")
    assert "| pass | metadata | dx |" in markdown


_PID_DIR = "SKINRISK_TEST_CHECK_PIDS"


def _inspect_chunk_recording_pid(raw_dir: str, image_ids: list[str]) -> list[dict]:
    """tasks.stages.validate's chunk check, leaving a file named for the process that ran it.

    The pool pickles this function by name, so a spawned worker imports this module (where the
    name refers to the original check) and finds the folder in the environment it inherited.
    """
    (Path(os.environ[_PID_DIR]) / f"{os.getpid()}-{image_ids[0]}").write_text("\n".join(image_ids))
    return _original_inspect_chunk(raw_dir, image_ids)


def test_image_checks_run_in_worker_processes(
    raw: Path, reports: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv(_PID_DIR, str(pids))
    monkeypatch.setattr(validate_module, "_inspect_chunk", _inspect_chunk_recording_pid)

    summary = validate_raw(raw, reports, PARAMS.model_copy(update={"workers": 2}))

    assert summary.failures == []
    chunks = list(pids.iterdir())
    checked = sorted(i for chunk in chunks for i in chunk.read_text().split("\n"))
    assert checked == sorted(row["image_id"] for row in _rows()), "every image checked once"
    ran_in = {int(chunk.name.split("-")[0]) for chunk in chunks}
    assert len(chunks) >= 2 and os.getpid() not in ran_in, f"checks ran in {ran_in}, the test in {os.getpid()}"


def test_unlisted_image_file_is_a_warning_not_a_failure(raw: Path, reports: Path) -> None:
    write_image(raw / "images" / "ISIC_9999999.jpg")
    summary = validate_raw(raw, reports, PARAMS)

    assert [(w.column, w.examples) for w in summary.warnings] == [
        ("listed", ["images/ISIC_9999999.jpg: not listed in metadata.csv"])
    ]
    assert "## Warning: images, listed" in summary.report_markdown.read_text()
    assert "raw_images</a>: passed with warnings" in summary.data_docs.read_text()


# ------------------------------------------------------------------------------------ images


def test_corrupt_jpeg_fails(raw: Path, reports: Path) -> None:
    image_of(raw, 3).write_bytes(random.Random(0).randbytes(2048))
    error = fails(raw, reports)

    assert failed_checks(error) == [("images", "decodes")]
    assert "images/ISIC_0000003.jpg: UnidentifiedImageError" in str(error)


def test_truncated_jpeg_fails(raw: Path, reports: Path) -> None:
    path = image_of(raw, 4)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    error = fails(raw, reports)

    assert failed_checks(error) == [("images", "decodes")]
    assert "images/ISIC_0000004.jpg" in str(error)
    assert "truncated" in str(error)


def test_greyscale_image_fails(raw: Path, reports: Path) -> None:
    write_image(image_of(raw, 6), mode="L")
    error = fails(raw, reports)

    assert failed_checks(error) == [("images", "mode")]
    assert "images/ISIC_0000006.jpg: mode L (1 channel(s)), expected RGB" in str(error)


def test_missing_image_fails(raw: Path, reports: Path) -> None:
    image_of(raw, 7).unlink()
    error = fails(raw, reports)

    assert failed_checks(error) == [("images", "exists")]
    assert "images/ISIC_0000007.jpg: file not found" in str(error)


def test_too_small_image_fails(raw: Path, reports: Path) -> None:
    error = fails(raw, reports, PARAMS.model_copy(update={"min_image_side": 32}))

    assert failed_checks(error) == [("images", "height")]
    assert "height is between 32 and 10000 pixels" in str(error)
    assert "images/ISIC_0000000.jpg: 40x30 pixels" in str(error)


# ------------------------------------------------------------------------------------ metadata


def test_missing_column_fails_and_names_it(raw: Path, reports: Path) -> None:
    write_metadata(raw, _rows(), columns=[c for c in METADATA_COLUMNS if c != "sex"])
    error = fails(raw, reports)

    assert failed_checks(error) == [("metadata", None)]
    assert "missing column 'sex'" in str(error)
    payload = json.loads((reports / "validation.json").read_text())
    skipped = [e for e in payload["expectations"] if e["status"] == "skipped"]
    assert [e["column"] for e in skipped] == ["sex"]


def test_renamed_column_fails_naming_missing_and_unexpected(raw: Path, reports: Path) -> None:
    rows = [{**row, "diagnosis": row["dx"]} for row in _rows()]
    columns = [("diagnosis" if c == "dx" else c) for c in METADATA_COLUMNS]
    write_metadata(raw, rows, columns=columns)
    error = fails(raw, reports)

    assert failed_checks(error) == [("metadata", None)]
    assert "missing column 'dx'" in str(error)
    assert "unexpected column 'diagnosis'" in str(error)


def _fails_on_an_unknown_diagnosis(raw: Path, reports: Path) -> ValidationFailed:
    rows = _rows()
    rows[4]["dx"] = "xyz"
    write_metadata(raw, rows)
    error = fails(raw, reports)

    assert failed_checks(error) == [("metadata", "dx")]
    # Row 4 of the data is line 6 of the file (the header is line 1).
    assert "line 6 (image_id ISIC_0000004): dx='xyz'" in str(error)
    return error


def test_unknown_diagnosis_fails(raw: Path, reports: Path) -> None:
    _fails_on_an_unknown_diagnosis(raw, reports)


def test_age_that_is_not_a_number_fails(raw: Path, reports: Path) -> None:
    rows = _rows()
    rows[2]["age"] = "forty"
    write_metadata(raw, rows)
    error = fails(raw, reports)

    assert failed_checks(error) == [("metadata", "age")]
    assert error.failures[0].description == "age is blank or a number of years"
    assert "line 4 (image_id ISIC_0000002): age='forty'" in str(error)


def test_age_out_of_range_fails(raw: Path, reports: Path) -> None:
    rows = _rows()
    rows[9]["age"] = "130"
    write_metadata(raw, rows)
    error = fails(raw, reports)

    assert failed_checks(error) == [("metadata", "age")]
    assert "age is between 0 and 100 years" in str(error)
    assert "line 11 (image_id ISIC_0000009): age='130'" in str(error)


def test_duplicate_image_id_fails(raw: Path, reports: Path) -> None:
    rows = _rows()
    rows[8]["image_id"] = rows[1]["image_id"]
    write_metadata(raw, rows)
    image_of(raw, 8).unlink()  # the layout stays consistent apart from the duplicate
    error = fails(raw, reports)

    assert failed_checks(error) == [("metadata", "image_id")]
    assert "image_id is unique" in str(error)
    assert "line 3 (image_id ISIC_0000001): image_id='ISIC_0000001', also on line 10" in str(error)


# ------------------------------------------------------------------------------------ unreadable


def test_empty_metadata_file_fails(raw: Path, reports: Path) -> None:
    (raw / RAW_METADATA_FILE).write_bytes(b"")
    with pytest.raises(DataError, match=r"metadata\.csv is empty"):
        validate_raw(raw, reports, PARAMS)


def test_header_only_metadata_fails(raw: Path, reports: Path) -> None:
    write_metadata(raw, [])
    with pytest.raises(DataError, match=r"metadata\.csv has a header but no rows"):
        validate_raw(raw, reports, PARAMS)
    payload = json.loads((reports / "validation.json").read_text())
    assert payload["success"] is False
    assert "no rows" in payload["error"]


def test_missing_raw_dir_fails_with_what_to_do(tmp_path: Path, reports: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist: run `skinrisk data import SOURCE`"):
        validate_raw(tmp_path / "nowhere", reports, PARAMS)


def test_missing_metadata_file_fails_with_what_to_do(raw: Path, reports: Path) -> None:
    (raw / RAW_METADATA_FILE).unlink()
    with pytest.raises(DataError, match=r"metadata\.csv does not exist: run `skinrisk data"):
        validate_raw(raw, reports, PARAMS)


# ------------------------------------------------------------------------------------ reports


def test_reports_are_written_on_failure(raw: Path, reports: Path) -> None:
    rows = _rows()
    rows[0]["dx"] = "xyz"
    write_metadata(raw, rows)
    error = fails(raw, reports)

    assert f"reports: {reports / 'validation.md'} and {reports / 'validation.json'}" in str(error)
    payload = json.loads((reports / "validation.json").read_text())
    assert payload["success"] is False
    (failed,) = [e for e in payload["expectations"] if e["status"] == "failed"]
    assert (failed["column"], failed["unexpected_count"]) == ("dx", 1)
    assert failed["examples"] == ["line 2 (image_id ISIC_0000000): dx='xyz'"]
    markdown = (reports / "validation.md").read_text()
    assert markdown.startswith("# Raw data validation: FAILED")
    assert "| **FAIL** | metadata | dx |" in markdown
    assert "- line 2 (image_id ISIC_0000000): dx='xyz'" in markdown


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_good_report_is_replaced_only_as_a_whole(raw: Path, reports: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    validate_raw(raw, reports, PARAMS)
    before = _files(reports)
    image_of(raw, 0).unlink()

    # A crash half-way through writing (disk full) leaves the previous reports intact...
    original_write_text = Path.write_text

    def write_half_then_fail(self: Path, data: str, *args, **kwargs) -> int:
        original_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", write_half_then_fail)
        with pytest.raises(OSError, match="No space left"):
            validate_raw(raw, reports, PARAMS)
    assert _files(reports) == before  # the Data Docs too, and no temp files either

    # ...and a completed run replaces them with the new verdict.
    fails(raw, reports)
    assert sorted(p.name for p in reports.iterdir()) == ["gx", "validation.json", "validation.md"]
    assert json.loads((reports / "validation.json").read_text())["success"] is False


# ------------------------------------------------------------------------------------ real data


@pytest.mark.real_data
def test_real_ham10000_copy_passes(tmp_path: Path) -> None:
    if not (REAL_DATA / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 copy not found at {REAL_DATA.resolve()}")
    raw_dir = tmp_path / "raw"
    (raw_dir / "images").mkdir(parents=True)
    (raw_dir / RAW_METADATA_FILE).symlink_to(REAL_DATA / "HAM10000_metadata.csv")
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        for entry in os.scandir(REAL_DATA / part):
            (raw_dir / "images" / entry.name).symlink_to(entry.path)

    started = time.perf_counter()
    summary = validate_raw(raw_dir, tmp_path / "reports", ValidateParams())
    elapsed = time.perf_counter() - started

    print(f"validated {summary.n_images} real images in {elapsed:.1f} s")
    with (REAL_DATA / "HAM10000_metadata.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert summary.n_images == len(rows)
    assert summary.n_lesions == len({row["lesion_id"] for row in rows})
    assert summary.failures == [] and summary.warnings == []


# ------------------------------------------------------- preprocess uses only data that passed


def _preprocess(raw_dir: Path, tmp_path: Path, reports_dir: Path) -> int:
    from tasks.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("validate: {min_image_side: 16, workers: 1}\npreprocess: {image_size: 32, workers: 1}\n")
    args = ["--params", str(params), "--raw-dir", str(raw_dir), "--reports-dir", str(reports_dir)]
    return main(["preprocess", *args, "--out", str(tmp_path / "processed")])


def test_preprocess_refuses_data_whose_validation_failed(raw, reports, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = _rows()
    write_metadata(raw, [*rows, rows[0]])  # the same image listed twice: it would land in two splits
    fails(raw, reports)
    assert _preprocess(raw, tmp_path, reports) == 1
    err = capsys.readouterr().err
    assert "did not pass" in err and "skinrisk validate" in err, err
    assert not (tmp_path / "processed").exists()


def test_preprocess_refuses_data_never_validated_or_changed_since(raw, reports, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _preprocess(raw, tmp_path, reports) == 1
    assert "has not been validated" in capsys.readouterr().err
    validate_raw(raw, reports, PARAMS)
    write_image(image_of(raw, 3), size=(44, 33))  # an image replaced after it passed
    assert _preprocess(raw, tmp_path, reports) == 1
    assert "changed since" in capsys.readouterr().err
    assert not (tmp_path / "processed").exists()


def test_preprocess_runs_on_the_data_that_passed(raw, reports, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    validate_raw(raw, reports, PARAMS)
    os.utime(image_of(raw, 3), (1, 1))  # the same bytes rewritten (a `dvc checkout`): still the data that passed
    assert _preprocess(raw, tmp_path, reports) == 0, capsys.readouterr().err
    assert (tmp_path / "processed" / "preprocess.json").exists()


# ------------------------------------------------------- the Great Expectations project in gx/


def _suite(project: Path, name: str) -> dict:
    return json.loads((project / "expectations" / f"{name}.json").read_text())


def _static_links(index: Path) -> dict[str, str]:
    """The plain list the stage adds to the Data Docs index (readable offline): suite -> page."""
    block = re.search(r'<div id="skinrisk-static-index".*?</div>', index.read_text(encoding="utf-8"), re.S)
    assert block, "no static list of this run's pages in the Data Docs index"
    return {suite: href for href, suite in re.findall(r'<a href="(validations/[^"]+)">(\w+)</a>', block.group(0))}


def test_saved_suites_match_the_schema() -> None:
    """The HAM10000 vocabularies live twice (tasks/schema.py for the code, gx/ for GX): same values."""
    kwargs = {
        (e["type"], e["kwargs"].get("column")): e["kwargs"] for e in _suite(GX_PROJECT, "raw_metadata")["expectations"]
    }
    assert kwargs[("expect_table_columns_to_match_set", None)]["column_set"] == list(METADATA_COLUMNS)
    for column, vocabulary in (
        ("dx", DIAGNOSES),
        ("dx_type", DX_TYPES),
        ("sex", SEXES),
        ("localization", LOCALIZATIONS),
    ):
        assert kwargs[("expect_column_values_to_be_in_set", column)]["value_set"] == list(vocabulary), column
    (age,) = _suite(GX_PROJECT, "raw_ages")["expectations"]
    assert (age["kwargs"]["min_value"], age["kwargs"]["max_value"]) == AGE_RANGE


def test_data_docs_show_the_suite_and_the_failing_expectation(raw: Path, reports: Path) -> None:
    project_before = _files(GX_PROJECT)
    error = _fails_on_an_unknown_diagnosis(raw, reports)
    index = reports / "gx" / "data_docs" / "local_site" / "index.html"
    assert error.data_docs == index and f"Data Docs: {index}" in str(error)
    assert json.loads((reports / "validation.json").read_text())["data_docs"] == str(index)
    links = _static_links(index)
    assert sorted(links) == ["raw_ages", "raw_images", "raw_metadata"]
    page = (index.parent / links["raw_metadata"]).read_text(encoding="utf-8")
    assert "raw_metadata" in page and "dx is one of: akiec" in page and "xyz" in page
    (result,) = (reports / "gx" / "validations" / "raw_metadata").rglob("*.json")  # GX's own format
    failed = [
        r["expectation_config"]["kwargs"].get("column")
        for r in json.loads(result.read_text())["results"]
        if not r["success"]
    ]
    assert failed == ["dx"]
    assert _files(GX_PROJECT) == project_before, "the committed gx/ project is only read"
    assert not list(reports.glob(".gx-*")), "no scratch folder left behind"


def test_the_saved_suite_is_what_runs(
    raw: Path, reports: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = _rows()
    rows[4]["dx"] = "xyz"
    write_metadata(raw, rows)
    project = Path(shutil.copytree(GX_PROJECT, tmp_path / "gx", ignore=shutil.ignore_patterns("uncommitted")))
    suite = _suite(project, "raw_metadata")
    suite["expectations"] = [e for e in suite["expectations"] if e["kwargs"].get("column") != "dx"]
    (project / "expectations" / "raw_metadata.json").write_text(json.dumps(suite))
    monkeypatch.setattr(validate_module, "GX_PROJECT", project)

    summary = validate_raw(raw, reports, PARAMS)  # the diagnosis is no longer checked

    payload = json.loads(summary.report_json.read_text())
    assert "dx" not in [e["column"] for e in payload["expectations"]]
    assert summary.evaluated == 18  # one fewer than the committed suites
    assert (
        "dx is one of"
        not in summary.data_docs.parent.joinpath(_static_links(summary.data_docs)["raw_metadata"]).read_text()
    )


def test_relative_folders_validate_as_the_cli_passes_them(raw: Path, tmp_path: Path, monkeypatch) -> None:
    """`skinrisk validate` passes reports/ relative to the working folder (GX answers absolute paths)."""
    monkeypatch.chdir(tmp_path)
    summary = validate_raw(Path("raw"), Path("reports"), PARAMS)
    assert Path(summary.data_docs).is_file()
    assert Path(summary.data_docs).resolve() == (tmp_path / "reports/gx/data_docs/local_site/index.html").resolve()


def test_the_run_that_trains_on_the_data_logs_its_data_docs(raw: Path, reports: Path, mlflow_store: str) -> None:
    """Validation runs before any MLflow run exists; the pipeline's run records it when it opens:
    the verdict as tags to filter runs on, both reports and the whole Data Docs site."""
    from mlflow.tracking import MlflowClient

    from tasks.params import Params
    from tasks.runs import start_pipeline_run

    write_image(raw / "images" / "ISIC_9999999.jpg")  # a warning, which the tag should say
    summary = validate_raw(raw, reports, PARAMS)

    run_id = start_pipeline_run(Params(), raw, reports, orchestrator="dvc", source="synthetic")

    client = MlflowClient(mlflow_store)
    tags = client.get_run(run_id).data.tags
    assert tags["data_validation"] == "passed with 1 warning(s)"
    assert tags["data_validation.expectations"] == f"{summary.evaluated} evaluated, 0 failed, 0 skipped"

    def listed(folder: str) -> set[str]:
        found = set()
        for entry in client.list_artifacts(run_id, folder):
            found |= listed(entry.path) if entry.is_dir else {entry.path}
        return found

    assert {"data/validation.json", "data/validation.md"} <= listed("data")
    site = summary.data_docs.parent
    logged = listed("data_docs")
    assert logged == {f"data_docs/{p.relative_to(site).as_posix()}" for p in site.rglob("*") if p.is_file()}
    assert {f"data_docs/{href}" for href in _static_links(summary.data_docs).values()} <= logged
    index = Path(client.download_artifacts(run_id, "data_docs/index.html", str(reports.parent / "downloaded")))
    assert "raw_images</a>: passed with warnings" in index.read_text(encoding="utf-8")

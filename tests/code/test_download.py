"""tasks.download against a small fake Dataverse on 127.0.0.1 (real HTTP, Range support)."""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tasks import download
from tasks.download import (
    HAM10000_DOI,
    PINNED_FILES,
    DownloadError,
    RemoteFile,
    download_file,
    download_ham10000,
    fetch_manifest,
    pinned_manifest,
)
from tasks.errors import DataError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TEST_DOI = "doi:10.5072/FK2/TEST01"
PART_1, PART_2, METADATA_ID, ISIC_TEST_ID = 101, 102, 103, 104

METADATA_CSV = (
    b"lesion_id,image_id,dx,dx_type,age,sex,localization\nHAM_0000118,ISIC_0027419,bkl,histo,80.0,male,scalp\n"
)
# What Dataverse serves for an ingested table without ?format=original: a different file.
METADATA_TAB = (
    b'"lesion_id"\t"image_id"\t"dx"\t"dx_type"\t"age"\t"sex"\t"localization"\n'
    b'"HAM_0000118"\t"ISIC_0027419"\t"bkl"\t"histo"\t80.0\t"male"\t"scalp"\n'
)


def _payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass
class Served:
    """One file of the fake dataset: what the API lists and what the access URL returns."""

    name: str
    content: bytes
    listed_md5: str = ""  # defaults to the md5 of content
    ingested_tab: bytes | None = None  # set for an ingested table: the .tab conversion

    def __post_init__(self) -> None:
        self.listed_md5 = self.listed_md5 or _md5(self.content)


@dataclass
class FakeDataverse:
    """State and behaviour switches of the server; every request is logged."""

    url: str = ""
    files: dict[int, Served] = field(default_factory=dict)
    ignore_range: bool = False
    scripted_statuses: dict[str, list[int]] = field(default_factory=dict)  # path -> statuses
    drop_after: dict[int, list[int]] = field(default_factory=dict)  # file id -> cuts
    listing: dict[str, object] | None = None  # served instead of the listing of `files`
    log: list[dict[str, object]] = field(default_factory=list)

    def requests_for(self, file_id: int) -> list[dict[str, object]]:
        return [r for r in self.log if r["path"] == f"/api/access/datafile/{file_id}"]

    def dataset_json(self) -> dict[str, object]:
        if self.listing is not None:
            return self.listing
        entries = []
        for file_id, served in self.files.items():
            data_file: dict[str, object] = {
                "id": file_id,
                "filename": served.name,
                "filesize": len(served.content),
                "md5": served.listed_md5,
                "checksum": {"type": "MD5", "value": served.listed_md5},
            }
            if served.ingested_tab is not None:
                data_file.update(
                    filename=Path(served.name).stem + ".tab",
                    filesize=len(served.ingested_tab),
                    originalFileFormat="text/csv",
                    originalFileSize=len(served.content),
                    originalFileName=served.name,
                    tabularData=True,
                )
            entries.append({"label": data_file["filename"], "dataFile": data_file})
        return {"status": "OK", "data": {"latestVersion": {"versionNumber": 4, "files": entries}}}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        state = self.server.state
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        entry: dict[str, object] = {
            "path": parts.path,
            "query": query,
            "range": self.headers.get("Range"),
        }
        state.log.append(entry)

        scripted = state.scripted_statuses.get(parts.path)
        if scripted:
            entry["status"] = status = scripted.pop(0)
            self._send(status, json.dumps({"status": "ERROR", "message": "scripted"}).encode())
            return
        if parts.path == "/api/datasets/:persistentId/":
            if query.get("persistentId") != [TEST_DOI] and query.get("persistentId") != [HAM10000_DOI]:
                entry["status"] = 404
                self._send(404, b'{"status":"ERROR","message":"Dataset not found"}')
                return
            entry["status"] = 200
            self._send(200, json.dumps(state.dataset_json()).encode())
            return
        match = re.fullmatch(r"/api/access/datafile/(\d+)", parts.path)
        served = state.files.get(int(match.group(1))) if match else None
        if served is None:
            entry["status"] = 404
            self._send(404, b'{"status":"ERROR","message":"File not found"}')
            return
        body = served.content
        if served.ingested_tab is not None and query.get("format") != ["original"]:
            body = served.ingested_tab
        self._serve_file(entry, int(match.group(1)), body)

    def _serve_file(self, entry: dict[str, object], file_id: int, body: bytes) -> None:
        state = self.server.state
        start = 0
        range_header = self.headers.get("Range")
        if range_header and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(body):
                entry["status"] = 416
                self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                return
        status = 206 if start else 200
        entry["status"] = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        cuts = state.drop_after.get(file_id)
        if cuts:
            cut = cuts.pop(0)
            # Send part of the body, then drop the connection as a failing network would.
            self.wfile.write(body[start : start + cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            entry["dropped_after"] = cut
            return
        self.wfile.write(body[start:])

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: FakeDataverse


@pytest.fixture(autouse=True)
def _no_proxy_no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(download, "BACKOFF_SECONDS", 0.0)


@pytest.fixture
def dataverse() -> Iterator[FakeDataverse]:
    state = FakeDataverse(
        files={
            PART_1: Served("HAM10000_images_part_1.zip", _payload(1, 40_000)),
            PART_2: Served("HAM10000_images_part_2.zip", _payload(2, 30_001)),
            METADATA_ID: Served("HAM10000_metadata.csv", METADATA_CSV, ingested_tab=METADATA_TAB),
            ISIC_TEST_ID: Served("ISIC2018_Task3_Test_Images.zip", _payload(4, 5_000)),
            105: Served("HAM10000_segmentations_lesion_tschandl.zip", _payload(5, 5_000)),
        }
    )
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = state
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _remote(dataverse: FakeDataverse, file_id: int) -> RemoteFile:
    served = dataverse.files[file_id]
    return RemoteFile(
        name=served.name,
        url=f"{dataverse.url}/api/access/datafile/{file_id}",
        size=len(served.content),
        checksum=served.listed_md5,
        algorithm="md5",
    )


# --- the manifest -------------------------------------------------------------------------


def test_manifest_keeps_only_ham10000_files_and_fetches_ingested_tables_as_uploaded(
    dataverse: FakeDataverse,
) -> None:
    files = {f.name: f for f in fetch_manifest(dataverse.url, TEST_DOI)}

    assert sorted(files) == [
        "HAM10000_images_part_1.zip",
        "HAM10000_images_part_2.zip",
        "HAM10000_metadata.csv",
    ]
    metadata = files["HAM10000_metadata.csv"]
    assert metadata.url == f"{dataverse.url}/api/access/datafile/{METADATA_ID}?format=original"
    assert metadata.size == len(METADATA_CSV)  # not the size of the .tab conversion
    assert (metadata.checksum, metadata.algorithm) == (_md5(METADATA_CSV), "md5")
    part_1 = files["HAM10000_images_part_1.zip"]
    assert part_1.url == f"{dataverse.url}/api/access/datafile/{PART_1}"
    assert part_1.checksum == _md5(dataverse.files[PART_1].content)


def test_manifest_without_an_image_archive_is_a_clear_error(dataverse: FakeDataverse) -> None:
    del dataverse.files[PART_2]

    with pytest.raises(DataError, match=r"lacks \['HAM10000_images_part_2.zip'\]"):
        fetch_manifest(dataverse.url, TEST_DOI)


def test_manifest_for_an_unknown_doi_names_the_url_and_status(dataverse: FakeDataverse) -> None:
    with pytest.raises(DownloadError, match=r"HTTP 404.*Dataset not found.*check the DOI"):
        fetch_manifest(dataverse.url, "doi:10.5072/FK2/NOPE")
    assert len(dataverse.log) == 1  # a 4xx is not retried


def test_ham10000_manifest_is_cross_checked_against_the_pinned_release(
    dataverse: FakeDataverse,
) -> None:
    # The listing of the real dataset (its bytes are not served: only the manifest is read).
    entries = [
        {
            "dataFile": {
                "id": p.file_id,
                "filename": p.name,
                "filesize": p.size,
                "checksum": {"type": "MD5", "value": p.md5},
            }
        }
        for p in PINNED_FILES
    ]
    dataverse.listing = {"status": "OK", "data": {"latestVersion": {"files": entries}}}

    names = [f.name for f in fetch_manifest(dataverse.url, HAM10000_DOI)]
    assert sorted(names) == sorted(p.name for p in PINNED_FILES)

    entries[1]["dataFile"]["checksum"]["value"] = "0" * 32
    with pytest.raises(DataError, match=r"md5 0{32}.*pins has md5 4639bfa73ab251610530a97c898e6e46.*re-published"):
        fetch_manifest(dataverse.url, HAM10000_DOI)


def test_pinned_manifest_uses_the_dataverse_file_ids() -> None:
    urls = {f.name: f.url for f in pinned_manifest("https://example.org/")}
    assert urls == {
        "HAM10000_metadata.csv": "https://example.org/api/access/datafile/4338392?format=original",
        "HAM10000_images_part_1.zip": "https://example.org/api/access/datafile/3172585",
        "HAM10000_images_part_2.zip": "https://example.org/api/access/datafile/3172584",
    }


# --- downloading --------------------------------------------------------------------------


def test_full_download_writes_the_dataverse_layout(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dest = tmp_path / "ham10000"

    assert download_ham10000(dest, base_url=dataverse.url, doi=TEST_DOI, progress=False) == dest

    assert sorted(p.name for p in dest.iterdir()) == [
        "HAM10000_images_part_1.zip",
        "HAM10000_images_part_2.zip",
        "HAM10000_metadata.csv",
    ]
    for file_id in (PART_1, PART_2, METADATA_ID):
        served = dataverse.files[file_id]
        assert (dest / served.name).read_bytes() == served.content
    assert not dataverse.requests_for(ISIC_TEST_ID)


def test_files_already_present_are_not_downloaded_again(dataverse: FakeDataverse, tmp_path: Path) -> None:
    download_ham10000(tmp_path, base_url=dataverse.url, doi=TEST_DOI, progress=False)
    file_requests = len([r for r in dataverse.log if "datafile" in str(r["path"])])
    assert file_requests == 3

    download_ham10000(tmp_path, base_url=dataverse.url, doi=TEST_DOI, progress=False)

    assert len([r for r in dataverse.log if "datafile" in str(r["path"])]) == file_requests


def test_a_present_file_with_the_wrong_checksum_is_replaced(dataverse: FakeDataverse, tmp_path: Path) -> None:
    remote = _remote(dataverse, PART_1)
    (tmp_path / remote.name).write_bytes(b"\0" * remote.size)

    path = download_file(remote, tmp_path, progress=False)

    assert path.read_bytes() == dataverse.files[PART_1].content
    assert len(dataverse.requests_for(PART_1)) == 1


def test_an_interrupted_download_resumes_with_a_range_request(dataverse: FakeDataverse, tmp_path: Path) -> None:
    remote = _remote(dataverse, PART_1)
    content = dataverse.files[PART_1].content
    half = len(content) // 2
    (tmp_path / f"{remote.name}.part").write_bytes(content[:half])

    path = download_file(remote, tmp_path, progress=False)

    assert path.read_bytes() == content
    (request,) = dataverse.requests_for(PART_1)
    assert (request["range"], request["status"]) == (f"bytes={half}-", 206)
    assert not (tmp_path / f"{remote.name}.part").exists()


def test_a_server_that_ignores_range_restarts_from_zero(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.ignore_range = True
    remote = _remote(dataverse, PART_1)
    content = dataverse.files[PART_1].content
    # Junk in the .part: appending the full body to it would fail the checksum.
    (tmp_path / f"{remote.name}.part").write_bytes(b"junk" * 100)

    path = download_file(remote, tmp_path, progress=False)

    assert path.read_bytes() == content
    (request,) = dataverse.requests_for(PART_1)
    assert (request["range"], request["status"]) == ("bytes=400-", 200)


def test_a_corrupted_download_raises_and_leaves_nothing_behind(dataverse: FakeDataverse, tmp_path: Path) -> None:
    published = dataverse.files[PART_2].content
    served = bytearray(published)
    served[1000] ^= 0xFF  # same size, one byte flipped on the way
    dataverse.files[PART_2] = Served("HAM10000_images_part_2.zip", bytes(served), listed_md5=_md5(published))
    remote = next(f for f in fetch_manifest(dataverse.url, TEST_DOI) if f.name.endswith("2.zip"))

    with pytest.raises(DataError) as raised:
        download_file(remote, tmp_path, progress=False)

    message = str(raised.value)
    assert "HAM10000_images_part_2.zip" in message
    assert _md5(published) in message and _md5(bytes(served)) in message
    assert "run the command again" in message.lower()
    assert not (tmp_path / "HAM10000_images_part_2.zip").exists()
    assert not (tmp_path / "HAM10000_images_part_2.zip.part").exists()


def test_a_complete_part_file_is_verified_without_a_request(dataverse: FakeDataverse, tmp_path: Path) -> None:
    remote = _remote(dataverse, PART_1)
    (tmp_path / f"{remote.name}.part").write_bytes(dataverse.files[PART_1].content)

    download_file(remote, tmp_path, progress=False)

    assert (tmp_path / remote.name).read_bytes() == dataverse.files[PART_1].content
    assert dataverse.requests_for(PART_1) == []


def test_a_404_is_a_clear_error_and_not_retried(dataverse: FakeDataverse, tmp_path: Path) -> None:
    remote = RemoteFile("HAM10000_images_part_1.zip", f"{dataverse.url}/api/access/datafile/999",
                        10, "0" * 32, "md5")  # fmt: skip

    with pytest.raises(DownloadError) as raised:
        download_file(remote, tmp_path, progress=False, retries=3)

    message = str(raised.value)
    assert f"{dataverse.url}/api/access/datafile/999" in message
    assert "HTTP 404" in message and "File not found" in message
    assert len(dataverse.requests_for(999)) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_transient_503_is_retried(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.scripted_statuses[f"/api/access/datafile/{PART_1}"] = [503, 503]
    remote = _remote(dataverse, PART_1)

    path = download_file(remote, tmp_path, progress=False, retries=3)

    assert path.read_bytes() == dataverse.files[PART_1].content
    assert [r["status"] for r in dataverse.requests_for(PART_1)] == [503, 503, 200]


def test_retries_are_bounded(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.scripted_statuses[f"/api/access/datafile/{PART_1}"] = [503] * 10
    remote = _remote(dataverse, PART_1)

    with pytest.raises(DownloadError, match=r"HTTP 503.*gave up after 2 retries"):
        download_file(remote, tmp_path, progress=False, retries=2)

    assert len(dataverse.requests_for(PART_1)) == 3


def test_a_connection_dropped_mid_body_resumes(dataverse: FakeDataverse, tmp_path: Path) -> None:
    content = dataverse.files[PART_1].content
    dataverse.drop_after[PART_1] = [12_345]
    remote = _remote(dataverse, PART_1)

    path = download_file(remote, tmp_path, progress=False, chunk_size=1024)

    assert path.read_bytes() == content
    first, second = dataverse.requests_for(PART_1)
    assert first["dropped_after"] == 12_345
    # Resumed from what was saved (up to the last whole chunk read before the drop).
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", str(second["range"])).group(1))
    assert 0 < resumed_at <= 12_345
    assert second["status"] == 206


def test_ham10000_falls_back_to_the_pinned_list_when_the_api_is_down(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.scripted_statuses["/api/datasets/:persistentId/"] = [500] * 10

    # The fake serves none of the pinned ids, so the first file then fails with a 404.
    with pytest.raises(DownloadError, match=r"datafile/4338392\?format=original answered HTTP 404"):
        download_ham10000(tmp_path, base_url=dataverse.url, progress=False)

    assert dataverse.requests_for(4338392)
    assert [r["status"] for r in dataverse.log[:4]] == [500] * 4  # first try and 3 retries


def test_retries_that_make_progress_do_not_use_up_the_budget(dataverse: FakeDataverse, tmp_path: Path) -> None:
    content = dataverse.files[PART_1].content
    dataverse.drop_after[PART_1] = [5_000, 5_000, 5_000]
    remote = _remote(dataverse, PART_1)

    path = download_file(remote, tmp_path, progress=False, chunk_size=1000, retries=0)

    assert path.read_bytes() == content
    assert len(dataverse.requests_for(PART_1)) == 4

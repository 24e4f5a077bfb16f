"""Downloading HAM10000 from Harvard Dataverse: resumable, retried and checksum-verified.

Only the two image archives and the metadata table are fetched (the dataset also holds the
ISIC 2018 test images, segmentations and more), and they land under their Dataverse names,
the layout ``skinrisk data import`` reads (``tasks/ingest.py`` unzips them; nothing is
unpacked here).

The file list and every file's checksum come from the dataset's metadata API at download time.
For HAM10000 they are cross-checked against the values pinned below, so a re-published file is
an error rather than a silent change of the training data, and the pinned list stands in when
the metadata API cannot be reached.

A file is streamed to ``<name>.part``, resumed with an HTTP Range request after an
interruption, checked for size and checksum, and only then renamed into place.

Hand-written rather than ``pooch`` because of that resume: pooch (1.9) retries a failed download
from byte 0, and urllib3's ``Retry`` covers connecting and status codes, not a body dropped
mid-stream, which is where a 1.4 GB archive fails. On a 256 MB file over a link that drops every
64 MB (``benchmarks/download_resume.py``, 5 retries each): this module 256 MB sent, verified, in
2.5-6 s; pooch 384 MB sent (six attempts of 64 MB) in 20 s, and no file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests
from tqdm import tqdm

from tasks.errors import DataError

DATAVERSE_URL = "https://dataverse.harvard.edu"
HAM10000_DOI = "doi:10.7910/DVN/DBW86T"

USER_AGENT = f"skinrisk-download (+https://doi.org/{HAM10000_DOI.removeprefix('doi:')})"
TIMEOUT_SECONDS = (30.0, 120.0)  # connect, and between two reads of the body
BACKOFF_SECONDS = 2.0  # first retry delay, doubled per further failure
BACKOFF_MAX_SECONDS = 60.0

# What HAM10000 needs from the dataset, matched on the file name (case-insensitive).
_WANTED_NAMES = (
    re.compile(r"HAM10000_images_part_\d+\.zip", re.IGNORECASE),
    re.compile(r"HAM10000_metadata(\.(csv|tab))?", re.IGNORECASE),
)
_REQUIRED_IMAGES = ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip")
_METADATA_PREFIX = "ham10000_metadata"

# Dataverse checksum types -> hashlib names.
_ALGORITHMS = {"MD5": "md5", "SHA-1": "sha1", "SHA-256": "sha256", "SHA-512": "sha512"}

# Extensions for an ingested file whose API entry lacks ``originalFileName`` (older servers).
_ORIGINAL_SUFFIXES = {"text/csv": ".csv", "text/comma-separated-values": ".csv"}

_TRANSIENT_STATUSES = frozenset({408, 429})  # plus every 5xx

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: where it is served, what it is saved as, and how to verify it."""

    name: str
    url: str
    size: int | None
    checksum: str
    algorithm: str  # a hashlib name: "md5", "sha1", "sha256", "sha512"


@dataclass(frozen=True)
class _PinnedFile:
    name: str
    file_id: int
    size: int
    md5: str
    ingested: bool = False


# HAM10000 as published on Harvard Dataverse (version 4.0): file ids, sizes and MD5s that the
# dataset's API lists. The metadata table was ingested by Dataverse, which then serves a quoted
# tab-separated conversion by default; its size and MD5 here, like the API's checksum, are those
# of the uploaded CSV, which ``?format=original`` returns.
PINNED_FILES: tuple[_PinnedFile, ...] = (
    _PinnedFile("HAM10000_metadata.csv", 4338392, 690_218, "8f85fb1aa29d80a2797247e434deb79d", True),
    _PinnedFile("HAM10000_images_part_1.zip", 3172585, 1_366_522_108, "4639bfa73ab251610530a97c898e6e46"),
    _PinnedFile("HAM10000_images_part_2.zip", 3172584, 1_403_566_547, "da43d6cc50f6613013be07e8986b384b"),
)


class DownloadError(DataError):
    """A download failed at the network or HTTP level (the message names the URL and status)."""


class _TransientError(Exception):
    """A failure worth retrying: a 5xx, a rate limit, a refused or dropped connection."""

    def __init__(self, message: str, *, progressed: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.progressed = progressed  # bytes were saved before it failed
        self.retry_after = retry_after


def fetch_manifest(
    base_url: str = DATAVERSE_URL,
    doi: str = HAM10000_DOI,
    *,
    session: requests.Session | None = None,
) -> list[RemoteFile]:
    """The HAM10000 files of dataset ``doi`` on the Dataverse at ``base_url``, with checksums.

    Reads the latest published version from the native API and keeps the image archives and
    the metadata table (an ingested table is fetched in its original format, the bytes its
    checksum describes). Raises :class:`DownloadError` when the API cannot be read and
    :class:`DataError` when a needed file is missing or, for HAM10000, differs from the pinned
    release.
    """
    base_url = base_url.rstrip("/")
    url = f"{base_url}/api/datasets/:persistentId/"
    with _session_or_new(session) as active:
        payload = _retrying(
            lambda: _get_json(active, url, {"persistentId": doi}),
            what=f"reading the file list of {doi} from {url}",
            retries=3,
            hint="check the network connection, or pass another Dataverse base URL",
        )
    if not isinstance(payload, dict) or payload.get("status") != "OK":
        raise DataError(f"{url} did not return a dataset for {doi}: {str(payload)[:300]}")
    try:
        entries = payload["data"]["latestVersion"]["files"]
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"{url} answered for {doi} without data.latestVersion.files; "
            "is this a Dataverse server, and is the dataset published?"
        ) from exc
    files = [remote for remote in (_remote_file(entry, base_url, url) for entry in entries) if _is_wanted(remote.name)]
    _require_complete(files, doi, url)
    if _is_ham10000(doi):
        _check_against_pinned(files)
    return files


def pinned_manifest(base_url: str = DATAVERSE_URL) -> list[RemoteFile]:
    """The pinned HAM10000 files, served from the Dataverse at ``base_url``."""
    base_url = base_url.rstrip("/")
    return [
        RemoteFile(
            name=pinned.name,
            url=_access_url(base_url, pinned.file_id, original=pinned.ingested),
            size=pinned.size,
            checksum=pinned.md5,
            algorithm="md5",
        )
        for pinned in PINNED_FILES
    ]


def download_file(
    remote: RemoteFile,
    dest_dir: Path,
    *,
    session: requests.Session | None = None,
    progress: bool = True,
    chunk_size: int = 1 << 20,
    retries: int = 3,
) -> Path:
    """Download ``remote`` into ``dest_dir`` and return its path, verified.

    A file already there with the right checksum is kept and nothing is requested. Otherwise
    bytes go to ``<name>.part`` (resumed with a Range request if one is left from an earlier
    run), are checked for size and checksum, and only then replace ``<name>``. Transient
    failures (5xx, 408/429, dropped connections) are retried ``retries`` times with
    exponential backoff, each retry resuming where the last stopped; a retry that saved bytes
    does not count. Raises :class:`DownloadError` for HTTP and network failures and
    :class:`DataError` when the bytes do not match (the ``.part`` is deleted then).
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / remote.name
    part = target.with_name(target.name + ".part")
    if target.exists():
        if _mismatch(target, remote) is None:
            log.info("%s is already downloaded and verified", target)
            part.unlink(missing_ok=True)
            return target
        log.warning("%s does not match its published checksum; downloading it again", target)

    with _session_or_new(session) as active:
        while not _retrying(
            lambda: _stream_to_part(remote, part, active, progress, chunk_size),
            what=f"downloading {remote.name} from {remote.url}",
            retries=retries,
            hint=f"the partial download is kept in {part}: run the command again to resume",
        ):
            pass
    mismatch = _mismatch(part, remote)
    if mismatch:
        part.unlink()
        raise DataError(f"{remote.name}: {mismatch}")
    os.replace(part, target)
    return target


def download_ham10000(
    dest_dir: Path,
    *,
    base_url: str = DATAVERSE_URL,
    doi: str = HAM10000_DOI,
    progress: bool = True,
) -> Path:
    """Download the HAM10000 image archives and metadata into ``dest_dir`` and return it.

    ``dest_dir`` then holds the Dataverse layout (``HAM10000_images_part_1.zip``,
    ``HAM10000_images_part_2.zip``, ``HAM10000_metadata.csv``) for ``skinrisk data import``.
    Files already downloaded and verified are skipped, so an interrupted run can simply be
    repeated. If the metadata API of the HAM10000 dataset cannot be reached, the pinned file
    list is used instead.
    """
    dest_dir = Path(dest_dir)
    with _session_or_new(None) as session:
        try:
            manifest = fetch_manifest(base_url, doi, session=session)
        except DownloadError as exc:
            if not _is_ham10000(doi):
                raise
            log.warning("%s; using the pinned HAM10000 file list instead", exc)
            manifest = pinned_manifest(base_url)
        for remote in manifest:
            download_file(remote, dest_dir, session=session, progress=progress)
    return dest_dir


def file_checksum(path: Path, algorithm: str) -> str:
    """Hex digest of the file at ``path`` with the hashlib ``algorithm`` (e.g. ``"md5"``)."""
    with Path(path).open("rb") as source:
        return hashlib.file_digest(source, lambda: hashlib.new(algorithm, usedforsecurity=False)).hexdigest()


# --- the manifest -------------------------------------------------------------------------


def _remote_file(entry: dict[str, Any], base_url: str, source: str) -> RemoteFile:
    """A file entry of the dataset API as a RemoteFile (ingested tables in original format)."""
    try:
        data_file = entry["dataFile"]
        file_id = int(data_file["id"])
        stored_name = str(data_file["filename"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{source}: a file entry lacks dataFile.id or filename: {entry}") from exc
    ingested = bool(data_file.get("originalFileFormat")) or bool(data_file.get("tabularData"))
    if ingested:
        # The checksum describes the upload; `filesize` is that of Dataverse's .tab conversion.
        suffix = _ORIGINAL_SUFFIXES.get(str(data_file.get("originalFileFormat")), "")
        fallback = f"{Path(stored_name).stem}{suffix}" if suffix else stored_name
        name = str(data_file.get("originalFileName") or fallback)
        size = data_file.get("originalFileSize")
    else:
        name = stored_name
        size = data_file.get("filesize")
    if not name or Path(name).name != name or name in {".", ".."}:
        raise DataError(f"{source}: file {file_id} has an unusable name {name!r}")

    checksum = data_file.get("checksum") or {}
    checksum_type = str(checksum.get("type") or "MD5").upper()
    value = checksum.get("value") or data_file.get("md5")
    algorithm = _ALGORITHMS.get(checksum_type)
    if algorithm is None or not value:
        raise DataError(
            f"{source}: {name} has no usable checksum (type {checksum_type!r}, value {value!r}); "
            "it cannot be verified, so it is not downloaded"
        )
    return RemoteFile(
        name=name,
        url=_access_url(base_url, file_id, original=ingested),
        size=int(size) if size is not None else None,
        checksum=str(value).lower(),
        algorithm=algorithm,
    )


def _access_url(base_url: str, file_id: int, *, original: bool) -> str:
    return f"{base_url}/api/access/datafile/{file_id}" + ("?format=original" if original else "")


def _is_wanted(name: str) -> bool:
    return any(pattern.fullmatch(name) for pattern in _WANTED_NAMES)


def _require_complete(files: list[RemoteFile], doi: str, source: str) -> None:
    names = [f.name for f in files]
    lowered = {n.lower() for n in names}
    missing = [n for n in _REQUIRED_IMAGES if n.lower() not in lowered]
    if not any(n.startswith(_METADATA_PREFIX) for n in lowered):
        missing.append("HAM10000_metadata (.csv or .tab)")
    if missing:
        raise DataError(
            f"dataset {doi} at {source} lacks {missing} (HAM10000 files found: {names}); "
            "check the DOI, or download the files by hand and use `skinrisk data import`"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"dataset {doi} at {source} lists {duplicates} more than once")


def _check_against_pinned(files: list[RemoteFile]) -> None:
    pinned = {p.name.lower(): p for p in PINNED_FILES}
    for remote in files:
        expected = pinned.get(remote.name.lower())
        if expected is None or remote.algorithm != "md5":
            continue
        size_differs = remote.size is not None and remote.size != expected.size
        if remote.checksum != expected.md5 or size_differs:
            raise DataError(
                f"Dataverse now lists {remote.name} with md5 {remote.checksum} "
                f"({remote.size} bytes), but the HAM10000 release this project pins has md5 "
                f"{expected.md5} ({expected.size} bytes): the dataset was re-published. Check "
                f"its version history at https://doi.org/{HAM10000_DOI.removeprefix('doi:')}; "
                "if the change is intended, update PINNED_FILES in tasks/download.py"
            )


def _is_ham10000(doi: str) -> bool:
    """Whether ``doi`` names HAM10000, however spelled (``doi:`` or a doi.org URL, any case)."""
    prefix = r"^(https://doi\.org/)?(http://doi\.org/)?(doi:)?"
    return re.sub(prefix, "", doi.strip().lower()) == re.sub(prefix, "", HAM10000_DOI.lower())


# --- HTTP ---------------------------------------------------------------------------------


def _session_or_new(session: requests.Session | None) -> contextlib.AbstractContextManager[requests.Session]:
    """Use the caller's session as is, or a new one (closed on exit) that names this client."""
    if session is not None:
        return contextlib.nullcontext(session)
    own = requests.Session()
    own.headers["User-Agent"] = USER_AGENT
    return own


def _retrying(attempt: Callable[[], T], *, what: str, retries: int, hint: str) -> T:
    """Call ``attempt`` until it returns, retrying transient failures with backoff."""
    failures = 0
    while True:
        try:
            return attempt()
        except _TransientError as exc:
            failures = 0 if exc.progressed else failures + 1
            if failures > retries:
                raise DownloadError(f"{what} failed: {exc} (gave up after {retries} retries); {hint}") from exc
            delay = min(BACKOFF_MAX_SECONDS, BACKOFF_SECONDS * 2 ** max(failures - 1, 0))
            if exc.retry_after is not None:
                delay = max(delay, min(exc.retry_after, BACKOFF_MAX_SECONDS))
            log.warning("%s: %s; retrying in %.0f s", what, exc, delay)
            time.sleep(delay)


def _get_json(session: requests.Session, url: str, params: dict[str, str]) -> Any:
    try:
        response = session.get(url, params=params, headers={"Accept": "application/json"}, timeout=TIMEOUT_SECONDS)
    except requests.RequestException as exc:
        raise _TransientError(f"cannot connect to {url}: {exc}") from exc
    with response:
        _raise_for_status(response, advice="check the DOI and the Dataverse base URL")
        try:
            return response.json()
        except ValueError as exc:
            raise DataError(f"{response.url} did not answer with JSON ({exc}): is {url} a Dataverse API?") from exc


def _stream_to_part(
    remote: RemoteFile,
    part: Path,
    session: requests.Session,
    progress: bool,
    chunk_size: int,
) -> bool:
    """One GET appending to ``part``; True once it holds the whole file (as far as is known).

    False asks for another call at once: the server could not continue the partial file
    (HTTP 416), which was deleted.
    """
    offset = part.stat().st_size if part.exists() else 0
    if remote.size is not None and offset > remote.size:
        log.warning("%s is longer than %s should be; starting again", part, remote.name)
        part.unlink()
        offset = 0
    if remote.size is not None and offset == remote.size and offset > 0:
        return True  # a complete .part left by a run stopped before verification

    # identity: byte offsets and lengths must be those of the file, not of a compressed stream.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = session.get(remote.url, headers=headers, stream=True, timeout=TIMEOUT_SECONDS)
    except requests.RequestException as exc:
        raise _TransientError(f"cannot connect to {remote.url}: {exc}") from exc

    with response:
        if response.status_code == 416 and offset:
            log.warning("%s cannot be resumed (HTTP 416); starting again", part)
            part.unlink()
            return False
        _raise_for_status(
            response,
            advice=(
                "the file list may be out of date (a new dataset version?): run the command "
                "again, or check the dataset page"
            ),
        )
        if response.status_code == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != offset:
                part.unlink()
                raise _TransientError(
                    f"{remote.url} answered a request for bytes {offset}- with "
                    f"{response.headers.get('Content-Range')!r}; starting again"
                )
            mode = "ab"
        else:
            if offset:
                log.info("%s ignored the Range request; downloading from the start", remote.url)
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        expected = remote.size if remote.size is not None else total

        written = 0
        with (
            part.open(mode) as file,
            tqdm.wrapattr(
                file,
                "write",
                total=expected,
                initial=offset,
                desc=remote.name,
                disable=None if progress else True,  # None: only on a terminal
            ) as sink,
        ):
            try:
                for chunk in response.iter_content(chunk_size):
                    sink.write(chunk)
                    written += len(chunk)
            except requests.RequestException as exc:
                raise _TransientError(
                    f"connection lost after {offset + written} bytes: {exc}", progressed=written > 0
                ) from exc

    received = offset + written
    if expected is not None and received < expected:
        raise _TransientError(
            f"the server closed the connection after {received} of {expected} bytes",
            progressed=written > 0,
        )
    return True


def _raise_for_status(response: requests.Response, *, advice: str) -> None:
    """Raise _TransientError for a retryable status, DownloadError for any other failure."""
    status = response.status_code
    if status < 400:
        return
    described = f"GET {response.url} answered HTTP {status} {response.reason or ''}".rstrip()
    detail = _server_message(response)
    if detail:
        described += f" ({detail})"
    if status >= 500 or status in _TRANSIENT_STATUSES:
        retry_after = response.headers.get("Retry-After", "").strip()
        raise _TransientError(described, retry_after=float(retry_after) if retry_after.isdigit() else None)
    if status in (401, 403):
        advice = (
            "access was refused: the file may be restricted, or its terms may have to be accepted in a browser first"
        )
    raise DownloadError(f"{described}; {advice}")


def _server_message(response: requests.Response) -> str:
    """A short reason from an error body (Dataverse sends {"status": "ERROR", "message": ...})."""
    try:
        body = next(response.iter_content(4096), b"")
    except requests.RequestException:
        return ""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else str(body)
    match = re.search(r'"message"\s*:\s*"([^"]*)"', text)
    return (match.group(1) if match else "")[:200]


def _content_range(header: str) -> tuple[int | None, int | None]:
    """Start and total length from ``Content-Range: bytes START-END/TOTAL`` (None if absent)."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", header)
    if not match:
        return None, None
    total = match.group(2)
    return int(match.group(1)), int(total) if total.isdigit() else None


# --- verification -------------------------------------------------------------------------


def _mismatch(path: Path, remote: RemoteFile) -> str | None:
    """How ``path`` differs from the published size or checksum of ``remote``; None if it does not."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return (
            f"received {size} bytes from {remote.url}, but the file has {remote.size}; "
            "the download was deleted: run the command again"
        )
    actual = file_checksum(path, remote.algorithm)
    if actual == remote.checksum.lower():
        return None
    return (
        f"{remote.algorithm} checksum mismatch, expected {remote.checksum}, got {actual} (from {remote.url}); "
        "the corrupt download was deleted. Run the command again; if it fails the same way, the published "
        "file has changed or a proxy alters it: compare with the dataset page before using any copy"
    )

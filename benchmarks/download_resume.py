"""Why ``tasks/download.py`` resumes downloads itself: a large archive over a connection that drops.

HAM10000's image archives are 1.37 and 1.40 GB on Dataverse. This serves one file of ``--size-mb``
on 127.0.0.1 (with HTTP Range support, as Dataverse has) and drops every connection after
``--drop-every-mb`` of body, as a flaky link would, then fetches it with:

- ``tasks.download.download_file`` (resumes each retry from the saved ``.part`` with a Range request);
- ``pooch`` (the library a user would reach for: retries with ``retry_if_failed``, each retry
  from byte 0), when it is importable (``pip install pooch``; not a project dependency).

It prints, for each, whether the file arrived verified, the bytes the server sent and the time.

    .venv/bin/python benchmarks/download_resume.py [--size-mb 256] [--drop-every-mb 64] [--retries 5]
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import logging
import os
import socketserver
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

from tasks import download
from tasks.download import RemoteFile, download_file

MB = 1 << 20


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    body: bytes
    drop_every: int
    sent: int = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body, start = self.server.body, 0
        if (header := self.headers.get("Range", "")).startswith("bytes="):
            start = int(header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        end = min(len(body), start + self.server.drop_every)  # then the connection drops
        for offset in range(start, end, MB):
            chunk = body[offset : min(end, offset + MB)]
            self.wfile.write(chunk)
            self.server.sent += len(chunk)
        self.close_connection = True


def _fetch_with_pooch(url: str, md5: str, dest: Path, retries: int) -> None:
    import pooch

    pooch.get_logger().setLevel(logging.ERROR)  # its per-attempt lines; the outcome is printed below
    fetcher = pooch.create(
        path=dest, base_url=url.rsplit("/", 1)[0] + "/", registry={"archive.zip": f"md5:{md5}"}, retry_if_failed=retries
    )
    fetcher.fetch("archive.zip", progressbar=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--drop-every-mb", type=int, default=64)
    parser.add_argument("--retries", type=int, default=5, help="retries after the first attempt, for both")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    download.BACKOFF_SECONDS = 0.0  # the network is local: time the transfer, not the waiting

    body = os.urandom(args.size_mb * MB)
    md5 = hashlib.md5(body).hexdigest()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.body, server.drop_every = body, args.drop_every_mb * MB
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/files/archive.zip"
    print(f"{args.size_mb} MB file, the connection dropped after every {args.drop_every_mb} MB, {args.retries} retries")

    def ours(dest: Path) -> None:
        remote = RemoteFile("archive.zip", url, len(body), md5, "md5")
        download_file(remote, dest, progress=False, retries=args.retries)

    def with_pooch(dest: Path) -> None:
        _fetch_with_pooch(url, md5, dest, args.retries)

    for name, fetch in (("tasks.download", ours), ("pooch", with_pooch)):
        if name == "pooch":
            try:
                import pooch  # noqa: F401
            except ImportError:
                print(f"  {name:15s} not installed (pip install pooch to compare)")
                continue
        server.sent = 0
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            try:
                fetch(Path(scratch))
                got = Path(scratch, "archive.zip")
                outcome = "verified" if hashlib.md5(got.read_bytes()).hexdigest() == md5 else "WRONG BYTES"
            except Exception as exc:  # report what the user would see
                outcome = f"failed ({type(exc).__name__})"
            seconds = time.perf_counter() - started
        print(f"  {name:15s} {outcome:22s} {server.sent / MB:7.0f} MB sent  {seconds:6.1f} s")
    server.shutdown()


if __name__ == "__main__":
    main()

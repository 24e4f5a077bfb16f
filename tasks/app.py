"""The triage page: a small web application for clinicians over one scored model.

Two pages, server-rendered (FastAPI + Jinja2, plain HTML forms, no JavaScript, nothing loaded
from the network): ``/`` scores and explains one case (image, age, sex, site) with
:func:`tasks.stages.explain.explain_case`, and ``/queue`` shows a triage queue, the CSV that
:func:`tasks.triage.triage` writes, as a worklist ranked by P(high). The page only calls the
stages' own functions: scoring, calibration, the called level and the referral rule are theirs.

Bad input is answered with the form again, a one-line message and HTTP 400; never a traceback.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import secrets
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from tasks.errors import DataError, SkinriskError
from tasks.params import ExplainParams

TEMPLATES_DIR = Path(__file__).parent / "templates"
MAX_UPLOAD_BYTES = 32 * 2**20  # a dermoscopic photograph is a few MB; a queue CSV far less
THUMBNAIL_SIZE = 96
KEPT_QUEUES = 20  # worklists whose thumbnails stay reachable (most recent first)
# What the worklist needs of a queue CSV (tasks.triage writes these and more).
QUEUE_COLUMNS: tuple[str, ...] = ("image", "p_high", "risk_level", "refer", "action")
_TRUTH = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    """One uploaded file of a form: the name the browser gave and its bytes."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class Form:
    fields: dict[str, str]
    files: dict[str, Upload]  # only file inputs with a file chosen


async def read_form(request: Request, max_bytes: int = MAX_UPLOAD_BYTES) -> Form:
    """The fields and files of a ``multipart/form-data`` request; DataError when it is not one.

    Parsed with ``multipart`` (the parser already installed with Evidently's UI): FastAPI's own
    form parsing needs ``python-multipart``, whose import name ``multipart`` clashes with it.
    """
    import multipart

    content_type, options = multipart.parse_options_header(request.headers.get("content-type", ""))
    if content_type != "multipart/form-data" or not options.get("boundary"):
        raise DataError("send the form as multipart/form-data (the page's own form does)")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise DataError(f"upload larger than {max_bytes // 2**20} MB; choose a smaller file")
    fields: dict[str, str] = {}
    files: dict[str, Upload] = {}
    try:
        parser = multipart.MultipartParser(
            io.BytesIO(bytes(body)), options["boundary"], content_length=len(body), memory_limit=max_bytes
        )
        for part in parser:
            if part.filename is None:
                fields[part.name] = part.value
            elif part.filename:  # a file input left empty is sent with filename=""
                files[part.name] = Upload(Path(part.filename).name, part.raw)
            part.close()
    except multipart.MultipartError as exc:
        raise DataError(f"the form could not be read ({exc}); send it again") from None
    return Form(fields, files)


def _checked_image(upload: Upload | None, image_size: int) -> None:
    """DataError unless ``upload`` is an image the model's decoder reads."""
    from tasks.decoding import decode_error_reason, resized_pixels

    if upload is None:
        raise DataError("no image: choose the lesion photograph (JPEG or PNG)")
    if not upload.data:
        raise DataError(f"{upload.filename} is empty: choose the lesion photograph (JPEG or PNG)")
    try:
        resized_pixels(upload.data, image_size)
    except DataError as exc:
        reason = decode_error_reason(exc.__cause__) if exc.__cause__ else str(exc)
        raise DataError(f"{upload.filename} is not a readable image: {reason}; choose the lesion photograph") from None


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _case_view(result: dict[str, Any], out_dir: Path, operating_point: dict | None) -> dict[str, Any]:
    """What the result panel shows, from explain_case's payload and its two images (inlined, so
    the page is self-contained: saved or printed, it keeps them)."""
    from tasks.triage import action_for

    refer = result.get("refer")
    threshold = result.get("threshold")
    p_high = result["probabilities"]["high"]
    digits = 3  # enough digits that P(high) and the threshold never print alike on either side of it
    while threshold is not None and digits < 6 and f"{p_high:.{digits}f}" == f"{threshold:.{digits}f}":
        digits += 1
    return {
        "probabilities": result["probabilities"],
        "risk_level": result["risk_level"],
        "refer": refer,
        "p_high_text": f"{p_high:.{digits}f}",
        "threshold_text": None if threshold is None else f"{threshold:.{digits}f}",
        "shap_probability": result["shap"]["probability"],
        "target_recall": (operating_point or {}).get("target_recall"),
        "action": action_for(result["risk_level"], bool(refer)) if refer is not None else None,
        "gradcam": _data_uri(out_dir / "gradcam.png"),
        "shap": _data_uri(out_dir / "shap.png"),
    }


@dataclass(frozen=True)
class Worklist:
    """A triage queue ranked by P(high), descending: one dict per case, and where its images are."""

    source: str
    rows: list[dict[str, Any]]
    images_dir: Path | None


def read_queue(source: Path | bytes, name: str) -> pd.DataFrame:
    """A queue CSV (``skinrisk triage --out``) sorted by P(high), highest first; DataError names
    the file and what is wrong with it."""
    hint = "give the CSV that `skinrisk triage --out` writes"
    if isinstance(source, Path) and not source.is_file():
        raise DataError(f"queue file {name} not found; {hint}")
    try:
        queue = pd.read_csv(io.BytesIO(source) if isinstance(source, bytes) else source, dtype={"image": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200]
        raise DataError(f"{name} is not a readable CSV ({reason}); {hint}") from None
    missing = [column for column in QUEUE_COLUMNS if column not in queue.columns]
    if missing:
        raise DataError(f"{name}: missing column(s) {missing}; {hint}")
    p_high = pd.to_numeric(queue["p_high"], errors="coerce")
    bad = queue.index[~p_high.between(0, 1)]
    if len(bad):
        line = int(bad[0]) + 2  # the header is line 1
        raise DataError(f"{name}, line {line}: p_high {queue.at[bad[0], 'p_high']!r} is not a probability (0-1)")
    queue["p_high"] = p_high
    values = queue["refer"].tolist()
    refer = [value if isinstance(value, bool) else _TRUTH.get(str(value).strip().lower()) for value in values]
    if None in refer:
        row = refer.index(None)
        raise DataError(f"{name}, line {row + 2}: refer {values[row]!r} is not True or False")
    queue["refer"] = refer
    return queue.sort_values("p_high", ascending=False, kind="stable").reset_index(drop=True)


def _image_under(images_dir: Path | None, image: object) -> Path | None:
    """The image file of a queue row inside ``images_dir``; None when absent or outside it."""
    if images_dir is None or not isinstance(image, str) or not image.strip():
        return None
    root = images_dir.resolve()
    path = (root / image).resolve()
    return path if path.is_relative_to(root) and path.is_file() else None


def _cell(value: object) -> object:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return int(value) if isinstance(value, float) and value.is_integer() else value  # age 70, not 70.0


def worklist(queue: pd.DataFrame, source: str, images_dir: Path | None) -> Worklist:
    rows = [
        {
            "rank": position + 1,
            "image": _cell(record["image"]),
            "age": _cell(record.get("age")),
            "sex": _cell(record.get("sex")),
            "site": _cell(record.get("localization")),
            "risk_level": _cell(record["risk_level"]),
            "p_high": float(record["p_high"]),
            "refer": bool(record["refer"]),
            "action": _cell(record["action"]),
            "image_path": _image_under(images_dir, record["image"]),
        }
        for position, record in enumerate(queue.to_dict("records"))
    ]
    return Worklist(source, rows, images_dir)


def _images_folder(text: str) -> Path | None:
    if not text.strip():
        return None
    folder = Path(text.strip()).expanduser()
    if not folder.is_dir():
        raise DataError(f"images folder {folder} not found; give the folder the queue's image column is relative to")
    return folder


def thumbnail_png(path: Path, size: int = THUMBNAIL_SIZE) -> bytes:
    """A PNG thumbnail of an image file, its aspect ratio kept."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        small = ImageOps.contain(image.convert("RGB"), (size, size))
    out = io.BytesIO()
    small.save(out, format="PNG")
    return out.getvalue()


def create_app(
    bundle,
    params: ExplainParams | None = None,
    *,
    background: pd.DataFrame | None = None,
    queue: Path | None = None,
    images_dir: Path | None = None,
    model_name: str = "",
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
):
    """The triage page's FastAPI app for a :class:`tasks.scored_model.Bundle`.

    ``params`` and ``background`` go to :func:`tasks.stages.explain.explain_case` (SHAP's background:
    e.g. :func:`tasks.stages.explain.training_background`; its neutral one when None). ``queue`` is a
    triage queue CSV shown at ``/queue`` (read again on each visit), its images relative to
    ``images_dir``. ``model_name`` labels the pages (e.g. the model URI).
    """
    from fastapi.templating import Jinja2Templates
    from starlette.concurrency import run_in_threadpool

    from tasks.stages.explain import explain_case, validate_case

    params = params or ExplainParams()
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    encoder = bundle.encoder
    image_size = bundle.summary.image_size
    scoring = threading.Lock()  # one case at a time through the model: Keras is not re-entrant
    worklists: OrderedDict[str, Worklist] = OrderedDict()
    app = FastAPI(title="skinrisk triage page", docs_url=None, redoc_url=None, openapi_url=None)

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"model_name": model_name, **context}, status_code=status_code)

    def case_page(request: Request, fields: dict[str, str], status_code: int = 200, **context: Any) -> HTMLResponse:
        return page(
            request,
            "case.html",
            status_code,
            sexes=encoder.sexes,
            sites=encoder.localizations,
            age_required=encoder.missing_policy == "drop",
            fields=fields,
            **context,
        )

    def explained(upload: Upload, raw: dict[str, Any]) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="skinrisk-case-") as folder:
            image = Path(folder) / f"{secrets.token_hex(8)}{Path(upload.filename).suffix.lower()}"
            image.write_bytes(upload.data)
            out = Path(folder) / "explained"
            with scoring:
                result = explain_case(
                    bundle, image, raw["age"], raw["sex"], raw["localization"], out, params, background=background
                )
            return _case_view(result, out, bundle.operating_point)

    @app.get("/", response_class=HTMLResponse)
    async def case_form(request: Request) -> HTMLResponse:
        return case_page(request, {})

    @app.post("/", response_class=HTMLResponse)
    async def case_result(request: Request) -> HTMLResponse:
        fields: dict[str, str] = {}
        try:
            form = await read_form(request, max_upload_bytes)
            fields = form.fields
            raw = validate_case(
                encoder, fields.get("age", ""), fields.get("sex", "").strip(), fields.get("site", "").strip()
            )
            upload = form.files.get("image")
            await run_in_threadpool(_checked_image, upload, image_size)
            view = await run_in_threadpool(explained, upload, raw)
        except SkinriskError as exc:
            return case_page(request, fields, 400, error=str(exc))
        return case_page(request, fields, case=view, filename=upload.filename)

    def queue_page(request: Request, status_code: int = 200, **context: Any) -> HTMLResponse:
        return page(
            request,
            "queue.html",
            status_code,
            images_default=str(images_dir or ""),
            startup_queue=str(queue) if queue else None,
            **context,
        )

    def shown(work: Worklist) -> str:
        key = secrets.token_urlsafe(9)
        worklists[key] = work
        while len(worklists) > KEPT_QUEUES:
            worklists.popitem(last=False)
        return key

    @app.get("/queue", response_class=HTMLResponse)
    async def queue_view(request: Request) -> HTMLResponse:
        if queue is None:
            return queue_page(request)
        try:
            work = worklist(await run_in_threadpool(read_queue, queue, str(queue)), str(queue), images_dir)
        except SkinriskError as exc:
            return queue_page(request, 400, error=str(exc))
        return queue_page(request, worklist=work, key=shown(work))

    @app.post("/queue", response_class=HTMLResponse)
    async def queue_upload(request: Request) -> HTMLResponse:
        try:
            form = await read_form(request, max_upload_bytes)
            upload = form.files.get("queue")
            if upload is None:
                raise DataError("no queue file: choose the CSV that `skinrisk triage --out` writes")
            folder = _images_folder(form.fields.get("images", ""))
            work = worklist(await run_in_threadpool(read_queue, upload.data, upload.filename), upload.filename, folder)
        except SkinriskError as exc:
            return queue_page(request, 400, error=str(exc))
        return queue_page(request, worklist=work, key=shown(work))

    @app.get("/queue/{key}/thumbnail/{rank}")
    async def thumbnail(key: str, rank: int) -> Response:
        work = worklists.get(key)
        if work is None or not 1 <= rank <= len(work.rows) or work.rows[rank - 1]["image_path"] is None:
            return Response(status_code=404)
        try:
            png = await run_in_threadpool(thumbnail_png, work.rows[rank - 1]["image_path"])
        except OSError:  # unreadable or not an image: the row shows no thumbnail
            return Response(status_code=404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> HTMLResponse:
        # a bug, not bad input: the log has the traceback, the page only says what happened
        log.error("triage page: %s %s failed", request.method, request.url.path, exc_info=exc)
        return page(
            request, "error.html", 500, error=f"unexpected {type(exc).__name__}; the server log has the details"
        )

    return app


def serve(
    bundle,
    params: ExplainParams | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    background: pd.DataFrame | None = None,
    queue: Path | None = None,
    images_dir: Path | None = None,
    model_name: str = "",
) -> None:
    """Serve :func:`create_app` with uvicorn until interrupted. A ``queue`` or ``images_dir`` that
    cannot be used stops it before it starts (SkinriskError)."""
    import uvicorn

    if images_dir is not None and not Path(images_dir).is_dir():
        raise DataError(f"images folder {images_dir} not found; give the folder the queue's images are in")
    if queue is not None:
        read_queue(Path(queue), str(queue))  # fail now, not on the first visit
    app = create_app(
        bundle,
        params,
        background=background,
        queue=Path(queue) if queue else None,
        images_dir=Path(images_dir) if images_dir else None,
        model_name=model_name,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")

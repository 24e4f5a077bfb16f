"""The triage page (`skinrisk app`): what a clinician sees, and what bad input gets.

The error paths run through FastAPI's TestClient on a stub model (the page refuses bad input before
any scoring); the rest runs the tiny trained model, and a real browser (Playwright driving Debian's
Chromium) uses the page as a person would.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tasks.clinical import ClinicalEncoder
from tasks.errors import DataError
from tasks.params import ExplainParams
from tasks.schema import PreprocessSummary, raw_image_path
from tasks.scored_model import Bundle
from tests.support import PROJECT_ROOT, free_port

pytestmark = pytest.mark.integration

SITES = ("back", "face", "scalp")  # a vocabulary of the stub's own, to see the form use the model's
STUB = Bundle(
    model=None,  # never reached: every request below is refused before scoring
    encoder=ClinicalEncoder(age_mean=50.0, age_std=15.0, age_fill=50.0, missing_policy="drop", localizations=SITES),
    summary=PreprocessSummary(image_size=32, risk_map={}, counts={}, lesions={}, n_images=0),
    operating_point={"target": "risk", "threshold": 0.2, "target_recall": 0.95},
)
QUEUE_HEADER = "rank,image,age,sex,localization,p_low,p_moderate,p_high,risk_level,refer,action\n"


def _png(size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (150, 90, 70)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def _client(bundle=STUB, **kwargs):
    from fastapi.testclient import TestClient

    from tasks.app import create_app

    return TestClient(create_app(bundle, **kwargs), raise_server_exceptions=False)


def _message(html: str) -> str:
    found = re.search(r'<p class="error" role="alert" id="error">(.*?)</p>', html, flags=re.DOTALL)
    assert found, "the page shows no error message"
    return found.group(1)


@pytest.fixture(scope="module")
def stub_client():
    return _client(model_name="stub-model")


def test_the_form_offers_the_models_vocabularies(stub_client):
    page = stub_client.get("/")
    assert page.status_code == 200
    sites = re.findall(r'<option value="(\w+)"', page.text.split('id="site"')[1].split("</select>")[0])
    sexes = re.findall(r'<option value="(\w+)"', page.text.split('id="sex"')[1].split("</select>")[0])
    assert sites == list(SITES) and sexes == list(STUB.encoder.sexes)
    assert "required by this model" in page.text  # missing_policy drop: the age is required
    assert "stub-model" in page.text and "http" not in page.text.split("</head>")[0], "no CDN: nothing fetched"


@pytest.mark.parametrize(
    ("fields", "image", "expected"),
    [
        ({"age": "50", "sex": "male", "site": "back"}, None, "no image: choose the lesion photograph"),
        ({"age": "50", "sex": "male", "site": "back"}, ("", b""), "no image"),  # the file input left empty
        ({"age": "50", "sex": "male", "site": "back"}, ("notes.jpg", b"not a picture"), "notes.jpg is not a readable"),
        ({"age": "50", "sex": "male", "site": "back"}, ("empty.png", b""), "empty.png is empty"),
        ({"age": "50", "sex": "other", "site": "back"}, ("a.png", _png()), "unknown sex 'other'"),
        ({"age": "50", "sex": "male", "site": "elbow"}, ("a.png", _png()), "unknown localization 'elbow'"),
        ({"age": "50", "sex": "male", "site": ""}, ("a.png", _png()), "localization: missing; accepted:"),
        ({"age": "130", "sex": "male", "site": "back"}, ("a.png", _png()), "outside 0-100 years"),
        ({"age": "forty", "sex": "male", "site": "back"}, ("a.png", _png()), "is not a number"),
        ({"age": "", "sex": "male", "site": "back"}, ("a.png", _png()), "age: missing, and this model was trained"),
    ],
    ids=[
        "no-image",
        "empty-file-input",
        "not-an-image",
        "empty-file",
        "unknown-sex",
        "unknown-site",
        "missing-site",
        "age-out-of-range",
        "age-not-a-number",
        "age-missing-under-drop",
    ],
)
def test_a_bad_case_gets_the_form_back_with_one_line(stub_client, fields, image, expected):
    files = {"image": (image[0], image[1], "image/png")} if image else {"placeholder": ("", b"")}
    answer = stub_client.post("/", data=fields, files=files)
    assert answer.status_code == 400
    message = _message(answer.text)
    assert expected.replace("'", "&#39;") in message, message
    assert "\n" not in message.strip() and "Traceback" not in answer.text
    assert '<form method="post" action="/"' in answer.text, "the form is shown again"
    if fields["sex"] == "male":
        assert '<option value="male" selected>' in answer.text, "what was entered is kept"


def test_a_request_that_is_no_form_upload_is_refused(stub_client):
    answer = stub_client.post("/", data={"age": "50", "sex": "male", "site": "back"})  # urlencoded
    assert answer.status_code == 400
    assert "multipart/form-data" in _message(answer.text)


def test_an_oversized_upload_is_refused():
    client = _client(max_upload_bytes=2000)
    answer = client.post(
        "/", data={"age": "50", "sex": "male", "site": "back"}, files={"image": ("big.png", b"x" * 5000, "image/png")}
    )
    assert answer.status_code == 400
    assert "upload larger than" in _message(answer.text)


def test_an_unexpected_failure_shows_a_line_not_a_traceback(stub_client):
    # a valid case reaches scoring, where the stub has no model: a bug as far as the page knows
    answer = stub_client.post(
        "/", data={"age": "50", "sex": "male", "site": "back"}, files={"image": ("a.png", _png(), "image/png")}
    )
    assert answer.status_code == 500
    assert _message(answer.text).startswith("unexpected ")
    assert "Traceback" not in answer.text and "File &#34;" not in answer.text


@pytest.mark.parametrize(
    ("csv", "expected"),
    [
        (None, "no queue file"),
        (b"", "is not a readable CSV"),
        (b"\xff\xfe\x00\x01garbage\x00", "is not a readable CSV"),
        (b"image,age,sex\na.jpg,50,male\n", "missing column(s) [&#39;p_high&#39;, &#39;risk_level&#39;"),
        (QUEUE_HEADER.encode() + b"1,a.jpg,50,male,back,0.5,0.2,high-ish,low,False,x\n", "line 2: p_high"),
        (QUEUE_HEADER.encode() + b"1,a.jpg,50,male,back,0.5,0.2,0.3,low,maybe,x\n", "line 2: refer &#39;maybe&#39;"),
    ],
    ids=["no-file", "empty", "binary", "missing-columns", "bad-probability", "bad-refer"],
)
def test_a_bad_queue_gets_the_form_back_with_one_line(stub_client, csv, expected):
    files = {"queue": ("queue.csv", csv, "text/csv")} if csv is not None else {"placeholder": ("", b"")}
    answer = stub_client.post("/queue", files=files)
    assert answer.status_code == 400
    assert expected in _message(answer.text), _message(answer.text)
    assert '<form method="post" action="/queue"' in answer.text


def test_a_queue_with_a_missing_images_folder_is_refused(stub_client, tmp_path):
    csv = QUEUE_HEADER + "1,a.jpg,50,male,back,0.5,0.2,0.3,low,False,routine monitoring\n"
    answer = stub_client.post(
        "/queue", data={"images": str(tmp_path / "nowhere")}, files={"queue": ("q.csv", csv.encode(), "text/csv")}
    )
    assert answer.status_code == 400
    assert "images folder" in _message(answer.text) and "not found" in _message(answer.text)


def test_an_uploaded_queue_is_ranked_by_p_high_with_thumbnails_inside_its_folder(stub_client, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (photos / name).write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png())
    csv = QUEUE_HEADER + "".join(
        f"{i},{image},50,male,back,0.1,0.1,{p_high},low,{refer},act\n"
        for i, (image, p_high, refer) in enumerate(
            [("a.png", 0.10, False), ("b.png", 0.90, True), ("../secret.png", 0.50, False), ("c.png", 0.70, True)]
        )
    )
    answer = stub_client.post(
        "/queue", data={"images": str(photos)}, files={"queue": ("q.csv", csv.encode(), "text/csv")}
    )
    assert answer.status_code == 200
    p_high = [float(p) for p in re.findall(r'<td class="num p-high">([\d.]+)</td>', answer.text)]
    assert p_high == [0.9, 0.7, 0.5, 0.1]
    thumbnails = re.findall(r'<img src="(/queue/[^"]+/thumbnail/(\d+))"', answer.text)
    assert [rank for _, rank in thumbnails] == ["1", "2", "4"], "the row outside the folder has none"
    for url, _ in thumbnails:
        thumb = stub_client.get(url)
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 96
    key = thumbnails[0][0].split("/")[2]
    assert stub_client.get(f"/queue/{key}/thumbnail/3").status_code == 404, "../secret.png is not served"
    assert stub_client.get("/queue/unknown/thumbnail/1").status_code == 404


def test_the_startup_queue_is_read_on_each_visit(tmp_path):
    queue = tmp_path / "queue.csv"
    queue.write_text(QUEUE_HEADER + "1,a.png,50,male,back,0.1,0.1,0.8,high,True,refer\n")
    client = _client(queue=queue, images_dir=tmp_path)
    assert client.get("/queue").status_code == 200
    queue.write_text("image,age\n")  # replaced by something that is not a queue
    answer = client.get("/queue")
    assert answer.status_code == 400 and "missing column(s)" in _message(answer.text)


def test_serve_refuses_an_unusable_queue_before_starting(tmp_path):
    from tasks.app import serve

    with pytest.raises(DataError, match="not found"):
        serve(STUB, queue=tmp_path / "nowhere.csv", images_dir=tmp_path)
    with pytest.raises(DataError, match="images folder"):
        serve(STUB, queue=None, images_dir=tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# With the trained model


@pytest.fixture(scope="module")
def bundle(trained, learnable):
    from tasks.scored_model import load_bundle

    out, result, _ = trained
    return load_bundle(str(result.model_path), learnable / "processed", out / "models")


@pytest.fixture(scope="module")
def background(learnable):
    from tasks.stages.explain import training_background

    return training_background(learnable / "processed", 10, 0)


PARAMS = ExplainParams(shap_background=10)


def _test_cases(learnable: Path, n: int) -> pd.DataFrame:
    cases = pd.read_csv(learnable / "processed" / "cases.csv").query("split == 'test'")
    return cases.dropna(subset=["age"]).head(n)


@pytest.fixture(scope="module")
def queue_csv(bundle, learnable, tmp_path_factory) -> Path:
    """The queue `skinrisk triage` writes for 8 test cases, images relative to raw/images."""
    from tasks.triage import triage

    folder = tmp_path_factory.mktemp("queue")
    cases = _test_cases(learnable, 8)
    pd.DataFrame(
        {
            "image": [f"{image_id}.jpg" for image_id in cases["image_id"]],
            "age": cases["age"],
            "sex": cases["sex"],
            "localization": cases["localization"],
        }
    ).to_csv(folder / "cases.csv", index=False)
    triage(bundle, folder / "cases.csv", raw_image_path(learnable / "raw", "_").parent, folder / "queue.csv")
    return folder / "queue.csv"


@pytest.mark.slow
def test_the_page_shows_what_explain_case_computes(bundle, background, learnable, tmp_path):
    from tasks.stages.explain import explain_case

    case = _test_cases(learnable, 1).iloc[0]
    image = raw_image_path(learnable / "raw", case["image_id"])
    client = _client(bundle, params=PARAMS, background=background)
    answer = client.post(
        "/",
        data={"age": str(case["age"]), "sex": case["sex"], "site": case["localization"]},
        files={"image": (image.name, image.read_bytes(), "image/jpeg")},
    )
    assert answer.status_code == 200, _message(answer.text)
    shown = {
        level: float(p) for level, p in re.findall(r'data-level="(\w+)">([\d.]+)</td>', answer.text.split("</form>")[0])
    }
    expected = explain_case(
        bundle, image, case["age"], case["sex"], case["localization"], tmp_path, PARAMS, background=background
    )
    assert shown == pytest.approx(expected["probabilities"], abs=6e-4)
    assert f'level-{expected["risk_level"]}">{expected["risk_level"]}</span>' in answer.text
    assert ("do not refer", "refer")[expected["refer"]] in re.sub(r"<[^>]+>", "", answer.text)
    assert f"threshold {expected['threshold']:.3f}" in answer.text
    for name in ("gradcam", "shap"):
        uri = re.search(rf'id="{name}" src="data:image/png;base64,([^"]+)"', answer.text).group(1)
        assert Image.open(io.BytesIO(base64.b64decode(uri))).size[0] > 0


@pytest.mark.slow
def test_the_app_command_starts_the_page_on_the_given_model_and_queue(
    trained, learnable, queue_csv, monkeypatch, tmp_path
):
    import tasks.app
    from tasks.cli import main

    out, result, _ = trained
    started = {}
    monkeypatch.setattr(tasks.app, "serve", lambda bundle, params, **kwargs: started.update(kwargs, bundle=bundle))
    monkeypatch.chdir(tmp_path)  # the command's log
    code = main(
        [
            "app",
            "--params",
            str(PROJECT_ROOT / "params.yaml"),
            "--model",
            str(result.model_path),
            "--processed-dir",
            str(learnable / "processed"),
            "--model-dir",
            str(out / "models"),
            "--queue",
            str(queue_csv),
            "--images",
            str(raw_image_path(learnable / "raw", "_").parent),
            "--port",
            "8123",
        ]
    )
    assert code == 0
    assert started["host"] == "127.0.0.1" and started["port"] == 8123
    assert started["queue"] == queue_csv and started["background"] is not None
    assert started["bundle"].operating_point is not None


# ---------------------------------------------------------------------------------------------
# In a browser


@pytest.fixture(scope="module")
def served(bundle, background, queue_csv, learnable):
    """The page served by uvicorn on a free loopback port, in a thread of this process."""
    import requests
    import uvicorn

    from tasks.app import create_app

    app = create_app(
        bundle,
        PARAMS,
        background=background,
        queue=queue_csv,
        images_dir=raw_image_path(learnable / "raw", "_").parent,
        model_name="tiny test model",
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{url}/", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline and thread.is_alive(), "the page did not start"
        time.sleep(0.2)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.mark.slow
def test_a_clinician_scores_a_case_in_the_browser(served, page, learnable, tmp_path):
    case = _test_cases(learnable, 1).iloc[0]
    page.goto(served)
    page.set_input_files("#image", str(raw_image_path(learnable / "raw", case["image_id"])))
    page.fill("#age", str(int(case["age"])))
    page.select_option("#sex", case["sex"])
    page.select_option("#site", case["localization"])
    with page.expect_navigation() as navigation:
        page.click("button[type=submit]")
    assert navigation.value.status == 200

    probabilities = [float(p) for p in page.locator("#probabilities .probability").all_inner_texts()]
    assert len(probabilities) == 3 and sum(probabilities) == pytest.approx(1.0, abs=0.003)
    assert page.inner_text("#risk-level").lower() in ("low", "moderate", "high")
    referral = page.inner_text("#referral")
    assert re.search(r"Referral: (refer|do not refer) \(P\(high\) [\d.]+ [≥<] threshold [\d.]+", referral), referral
    assert "Action:" in referral
    for image in ("#gradcam", "#shap"):
        assert page.eval_on_selector(image, "img => img.complete && img.naturalWidth") > 0, image

    # the browser itself holds back an age out of range ...
    page.fill("#age", "130")
    page.set_input_files("#image", str(raw_image_path(learnable / "raw", case["image_id"])))
    assert page.eval_on_selector("#age", "e => e.validity.valid") is False
    # ... and the server answers a file that is no image with one line, the form kept
    page.fill("#age", "55")
    page.set_input_files("#image", {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"not a picture"})
    with page.expect_navigation() as navigation:
        page.click("button[type=submit]")
    assert navigation.value.status == 400
    assert page.inner_text("#error").startswith("notes.jpg is not a readable image")
    assert page.input_value("#age") == "55" and page.input_value("#site") == case["localization"]
    assert page.locator("#result").count() == 0


@pytest.mark.slow
def test_a_clinician_opens_the_queue_in_the_browser(served, page, queue_csv):
    page.goto(f"{served}/queue")
    rows = page.locator("#worklist tbody tr")
    expected = pd.read_csv(queue_csv)
    assert rows.count() == len(expected) == 8
    p_high = [float(p) for p in page.locator("#worklist .p-high").all_inner_texts()]
    assert p_high == sorted(p_high, reverse=True)
    assert p_high == pytest.approx(sorted(expected["p_high"], reverse=True), abs=6e-4)
    widths = page.eval_on_selector_all("td.thumb img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : -1)")
    assert len(widths) == 8 and all(w > 0 for w in widths), widths
    first = rows.nth(0).inner_text().lower()  # the level is shown in capitals
    top = expected.iloc[0]
    assert top["risk_level"] in first and top["action"] in first and f"\t{int(top['age'])}\t" in first

    # the same queue uploaded through the form
    page.set_input_files("#queue", str(queue_csv))
    with page.expect_navigation() as navigation:
        page.click("button[type=submit]")
    assert navigation.value.status == 200
    assert page.locator("#worklist tbody tr").count() == 8


def test_a_probability_next_to_the_threshold_never_prints_like_it(tmp_path):
    """0.1417 < 0.1420 must not read "0.142 < 0.142" (seen on the real sample's page)."""
    from tasks.app import _case_view

    for name in ("gradcam.png", "shap.png"):
        (tmp_path / name).write_bytes(_png())
    result = {
        "probabilities": {"low": 0.8583, "moderate": 0.0, "high": 0.14171},
        "risk_level": "high",
        "refer": False,
        "threshold": 0.14199,
        "shap": {"probability": 0.138},
    }
    view = _case_view(result, tmp_path, {"target_recall": 0.9})
    assert (view["p_high_text"], view["threshold_text"]) == ("0.1417", "0.1420")
    assert _case_view({**result, "threshold": 0.5}, tmp_path, None)["threshold_text"] == "0.500"

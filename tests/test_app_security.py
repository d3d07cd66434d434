"""The app against a client that names server files: a real server on localhost driven with raw HTTP.

The `/caption` image input is a Gradio file payload whose `path` a client can set to anything; only files Gradio
received or cached for this app (and data URLs) may be read, and a refusal must not tell which files exist.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from pathlib import Path

import httpx
import pytest
from app_helpers import bad_files, build_app, png_bytes, serve
from gradio_client import Client, handle_file
from PIL import Image

import app
import serving

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with serve(build_app(serving.load_captioner(tiny_checkpoint), tiny_checkpoint)) as url:
        yield url


@pytest.fixture(scope="module")
def planted() -> Path:
    """A real PNG in a fresh folder outside every Gradio folder (not the temp dir, not the working dir)."""
    folder = Path(tempfile.mkdtemp(prefix="planted-", dir=Path.home()))
    path = folder / "secret.png"
    Image.new("RGB", (77, 55), (220, 40, 40)).save(path)
    yield path
    path.unlink()
    folder.rmdir()


def call_caption(server: str, image_payload: dict) -> tuple[str, str]:
    """POST /gradio_api/call/caption then read its event stream -> (event kind, data line)."""
    started = httpx.post(server + "/gradio_api/call/caption",
                         json={"data": [image_payload, "greedy", 1, 10, 1.0, 3, 1.0]}, timeout=60)
    assert started.status_code == 200, started.text
    stream = httpx.get(f"{server}/gradio_api/call/caption/{started.json()['event_id']}", timeout=120).text
    lines = [line for line in stream.splitlines() if line.strip()]
    event = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("event:"))
    data = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("data:"))
    return event, data


def file_payload(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def test_a_planted_file_is_not_opened(server, planted):
    event, data = call_caption(server, file_payload(str(planted)))
    assert event == "error"
    assert "77" not in data and "attention" not in data and "words" not in data  # no size, no maps, no caption


def test_refused_paths_are_indistinguishable(server, planted):
    missing = str(planted.parent / "missing.png")
    answers = {name: call_caption(server, file_payload(path)) for name, path in
               {"planted": str(planted), "passwd": "/etc/passwd", "missing": missing,
                "folder": str(planted.parent)}.items()}
    assert all(event == "error" for event, _ in answers.values()), answers
    assert len(set(answers.values())) == 1, answers  # same answer whatever the path points at


def test_a_url_to_the_server_itself_is_refused(server):
    event, data = call_caption(server, file_payload(server + "/gradio_api/file=/etc/passwd"))
    assert event == "error" and "root:" not in data


def test_a_data_url_still_captions(server):
    picture = Image.new("RGB", (33, 21), "white")
    url = "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode()
    event, data = call_caption(server, {"url": url, "meta": {"_type": "gradio.FileData"}})
    assert event == "complete", data
    assert '"image_size": [33, 21]' in data


def test_an_uploaded_file_still_captions_over_raw_http(server, tmp_path):
    path = tmp_path / "upload.png"
    Image.new("RGB", (40, 30), "white").save(path)
    with open(path, "rb") as file:
        uploaded = httpx.post(server + "/gradio_api/upload", files={"files": ("upload.png", file, "image/png")})
    assert uploaded.status_code == 200, uploaded.text
    event, data = call_caption(server, {**file_payload(uploaded.json()[0]), "orig_name": "upload.png"})
    assert event == "complete", data
    assert '"image_size": [40, 30]' in data


@pytest.mark.parametrize("name", ["not_an_image.png", "truncated.jpg"])
def test_a_refused_upload_still_says_why(server, name, tmp_path):
    data, phrase = bad_files()[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(Exception, match=phrase) as raised:
        Client(server + "/", verbose=False).predict(handle_file(str(path)), api_name="/caption")
    assert name in str(raised.value) and str(tmp_path) not in str(raised.value)


def test_the_file_route_serves_no_server_file(server, planted):
    for path in ("/etc/passwd", str(planted), os.fspath(Path(app.__file__).resolve())):
        assert httpx.get(f"{server}/gradio_api/file={path}").status_code == 403


def test_predict_reads_only_the_uploaded_bytes(server, planted):
    # /predict takes file contents, never a name: a path sent as the upload is just bytes that are no image
    response = httpx.post(server + "/predict", files={"image": ("x.png", str(planted).encode(), "image/png")})
    assert response.status_code == 400 and "not an image" in response.json()["error"]
    assert str(planted) not in response.text
    image = io.BytesIO(png_bytes(Image.new("RGB", (20, 20), "white")))
    assert httpx.post(server + "/predict", files={"image": ("ok.png", image, "image/png")}).status_code == 200

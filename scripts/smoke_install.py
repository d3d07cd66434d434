"""Smoke test of an installed environment: what a user does first, end to end, on whatever versions are installed.

    python scripts/smoke_install.py CHECKPOINT [--work DIR]

Loads CHECKPOINT (and the checkpoint in tests/fixtures written by an earlier version), captions a generated image
greedily and with beam search, runs `caption-images` on a folder (one file in it is not an image), starts app.py on
the checkpoint, reads /health, captions one image through gradio_client's /caption and one through the MCP tool (the
official mcp client), then stops the app with SIGTERM. Exits non-zero on the first failure, saying what failed;
prints the versions it ran on. .ci/run runs it in a virtualenv holding the newest versions pyproject.toml allows and
in one with the oldest (scripts/drift_check.py); offline, a couple of minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.metadata
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_CHECKPOINT = ROOT / "tests" / "fixtures" / "checkpoint_before_redesign"
VERSIONS_OF = ("torch", "transformers", "tokenizers", "huggingface_hub", "gradio", "gradio_client", "datasets",
               "accelerate", "mcp", "numpy")
APP_START_TIMEOUT_S = 240


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONS_OF:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def step(name: str) -> None:
    print(f"smoke: {name}", flush=True)


def check_python_api(checkpoint: str, image) -> None:
    from caption_model import ImageCaptioner

    for folder in (checkpoint, str(FIXTURE_CHECKPOINT)):
        step(f"load {folder}, caption greedy and beam 3")
        captioner = ImageCaptioner.from_pretrained(folder)
        for beams in (1, 3):
            out = captioner.caption(image, num_beams=beams, max_length=12)
            gh, gw = captioner.grid_size
            assert out.attention.shape == (len(out.words), gh, gw), (out.attention.shape, out.words)
            assert np.allclose(out.attention.sum(axis=(1, 2)), 1.0, atol=1e-4)
            print(f"  beams={beams}: {out.text!r}", flush=True)
    captioner = ImageCaptioner.from_pretrained(checkpoint)
    assert captioner.caption(image, num_beams=1).words, "the freshly trained checkpoint wrote no words"


def check_cli(checkpoint: str, images: list, work: Path) -> None:
    step("caption-images on a folder (3 images, 1 file that is not an image)")
    folder = work / "photos"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"shape{i}.png")
    (folder / "notes.jpg").write_text("not an image")
    script = Path(sys.executable).with_name("caption-images")
    out = work / "captions.jsonl"
    proc = subprocess.run([str(script), str(folder), "--out", str(out), "--model", checkpoint, "--beams", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, f"expected exit 3 (one file skipped), got {proc.returncode}: {proc.stderr[-2000:]}"
    assert "notes.jpg" in proc.stderr, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["file"]).name for r in rows) == ["shape0.png", "shape1.png", "shape2.png"], rows
    print(f"  {len(rows)} rows, e.g. {rows[0]['caption']!r}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_app(checkpoint: str, image, work: Path) -> None:
    from gradio_client import Client, handle_file

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    step(f"app.py --model CHECKPOINT on {url}: /health, then /caption through gradio_client")
    log = open(work / "app.log", "w")
    app = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", checkpoint, "--port", str(port)],
                           stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        health = wait_for_health(url, app, work / "app.log")
        print(f"  /health: {health}", flush=True)
        assert health["status"] == "ok", health
        image_path = work / "upload.png"
        image.save(image_path)
        text, data = Client(url + "/", verbose=False).predict(handle_file(str(image_path)), api_name="/caption")
        assert text and data["words"] and len(data["attention"]) == len(data["words"]), (text, data.keys())
        print(f"  /caption: {text!r}", flush=True)
        answer = asyncio.run(mcp_caption(url + "/gradio_api/mcp/", image))
        assert answer["caption"] and len(answer["peaks"]) == len(answer["words"]), answer
        print(f"  MCP caption tool: {answer['caption']!r}", flush=True)
    finally:
        log.close()
        if app.poll() is None:  # (an app that died on its own was reported by wait_for_health)
            stop(app)


async def mcp_caption(url: str, image) -> dict:
    """List the MCP server's tools and call `caption` on `image` (a data URL): its structured result."""
    from mcp import ClientSession
    from mcp.client import streamable_http

    # streamable_http_client is new in mcp 1.24; the older name stays (deprecated) through 1.x
    connect = getattr(streamable_http, "streamable_http_client", None) or streamable_http.streamablehttp_client
    png = io.BytesIO()
    image.save(png, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    async with connect(url) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = [tool.name for tool in (await session.list_tools()).tools]
            assert tools == ["caption"], tools
            result = await session.call_tool("caption", {"image": data_url, "decoding": "greedy"})
    assert not result.isError, result.content
    assert json.loads(result.content[0].text) == result.structuredContent
    assert any(item.type == "image" for item in result.content), [item.type for item in result.content]
    return result.structuredContent


def stop(app: subprocess.Popen) -> None:
    """SIGTERM, then the app must exit within 30 s (a Space restart, a Ctrl-C)."""
    started = time.monotonic()
    app.send_signal(signal.SIGTERM)
    try:
        app.wait(timeout=30)
        print(f"  SIGTERM: the app exited in {time.monotonic() - started:.1f} s", flush=True)
    except subprocess.TimeoutExpired:
        app.kill()
        raise AssertionError("the app did not exit within 30 s of SIGTERM")


def wait_for_health(url: str, app: subprocess.Popen, log_path: Path) -> dict:
    deadline = time.monotonic() + APP_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise AssertionError(f"app.py exited with {app.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no /health within {APP_START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (train.py's best/)")
    parser.add_argument("--work", help="scratch folder (default: a new temporary one, removed afterwards)")
    args = parser.parse_args(argv)
    print("smoke: versions " + json.dumps(versions()), flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    from caption_model.training.shapes import generate_shapes_example

    rng = np.random.default_rng(7)
    images = [generate_shapes_example(rng).image for _ in range(3)]
    started = time.monotonic()
    try:
        check_python_api(args.checkpoint, images[0])
        check_cli(args.checkpoint, images, work)
        check_app(args.checkpoint, images[1], work)
    except AssertionError as error:
        print(f"smoke: FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"smoke: passed in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The app's MCP server (mcp_server.py), driven by the real `mcp` client over streamable HTTP against a real server
on localhost: one `caption` tool with typed, bounded parameters and an output schema; its answer is JSON (text and
structuredContent) plus the heatmap as a PNG; errors name the parameter; the server stops at SIGTERM after MCP
traffic."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from app_helpers import ROOT, build_app, free_port, png_bytes, serve
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from PIL import Image

import mcp_server
import serving
from caption_model.training.shapes import generate_shapes_example

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
    return serving.load_captioner(tiny_checkpoint)


@pytest.fixture(scope="module")
def server(captioner, tiny_checkpoint):
    with serve(build_app(captioner, tiny_checkpoint)) as url:
        yield url


@pytest.fixture(scope="module")
def picture():
    return generate_shapes_example(np.random.default_rng(11)).image


def data_url(picture: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode()


async def list_and_call(url: str, arguments: dict | None) -> tuple[list, object]:
    """List the server's tools and, with `arguments`, call its caption tool."""
    async with streamable_http_client(url + "/gradio_api/mcp/") as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
            result = await session.call_tool("caption", arguments) if arguments is not None else None
            return tools, result


def call(url: str, arguments: dict):
    return asyncio.run(list_and_call(url, arguments))[1]


def error_text(result) -> str:
    assert result.isError, result.content
    return " ".join(c.text for c in result.content if c.type == "text")


def test_one_caption_tool_with_typed_bounded_parameters_and_an_output_schema(server, captioner):
    tools, _ = asyncio.run(list_and_call(server, None))
    assert [t.name for t in tools] == ["caption"]  # the UI's events are not tools
    tool = tools[0]
    assert tool.description == mcp_server.TOOL_DESCRIPTION  # as written, not docstring lines joined by ", "
    properties = tool.inputSchema["properties"]
    assert tool.inputSchema["required"] == ["image"]
    longest = captioner.config.max_position_embeddings - 1
    assert properties["num_beams"]["type"] == "integer"
    assert (properties["num_beams"]["minimum"], properties["num_beams"]["maximum"]) == (1, mcp_server.MAX_BEAMS)
    assert properties["max_length"]["type"] == "integer" and properties["max_length"]["maximum"] == longest
    assert properties["no_repeat_ngram_size"]["type"] == "integer"
    assert properties["decoding"]["enum"] == ["beam", "greedy"]
    output = tool.outputSchema
    assert {"caption", "words", "score", "grid_size", "image_size", "peaks", "attention"} <= set(output["properties"])


def test_the_answer_is_json_with_peaks_and_a_heatmap_picture(server, captioner, tiny_checkpoint, picture):
    result = call(server, {"image": data_url(picture), "decoding": "greedy"})
    assert not result.isError, result.content
    text = next(c.text for c in result.content if c.type == "text")
    answer = json.loads(text)  # plain JSON, not a Python literal
    assert answer == result.structuredContent
    service = serving.CaptionService(captioner, tiny_checkpoint)
    _, expected = service.caption(png_bytes(picture), 1, display_side=serving.DISPLAY_MAX_SIDE)
    assert answer["caption"] == expected.text and answer["words"] == list(expected.words)
    assert answer["image_size"] == list(picture.size) and answer["attention"] is None  # maps are opt-in
    grid = tuple(captioner.grid_size)
    maps = serving.word_maps(expected, grid)
    assert len(answer["peaks"]) == len(expected.words)
    for peak, word, word_map in zip(answer["peaks"], expected.words, maps):
        assert peak["word"] == word
        assert (peak["row"], peak["col"]) == np.unravel_index(int(word_map.argmax()), grid)
        assert 0 <= peak["x"] <= picture.width and 0 <= peak["y"] <= picture.height
    assert answer["heatmap_word"] == serving.first_content_word(expected.words)
    images = [c for c in result.content if c.type == "image"]
    assert len(images) == 1 and images[0].mimeType == "image/png"
    shown = Image.open(io.BytesIO(base64.b64decode(images[0].data)))
    assert shown.format == "PNG" and max(shown.size) <= mcp_server.IMAGE_SIDE
    assert shown.size[0] / shown.size[1] == pytest.approx(picture.width / picture.height, rel=0.02)


def test_full_maps_on_request_and_a_strip_of_every_word(server, picture):
    result = call(server, {"image": data_url(picture), "decoding": "greedy", "include_maps": True,
                           "heatmap_strip": True})
    answer = result.structuredContent
    assert len(answer["attention"]) == len(answer["words"]) > 0
    sums = [float(np.sum(m)) for m in answer["attention"]]
    assert np.allclose(sums, 1.0, atol=1e-3)  # 4 decimals per cell
    assert answer["heatmap_word"] is None
    strip = Image.open(io.BytesIO(base64.b64decode(next(c.data for c in result.content if c.type == "image"))))
    assert strip.width > 2 * strip.height  # the image, then one tile per word


def test_errors_name_the_parameter(server, captioner, picture):
    longest = captioner.config.max_position_embeddings - 1
    message = error_text(call(server, {"image": data_url(picture), "max_length": 500}))
    assert "max_length" in message and str(longest) in message and "can't be captioned" not in message
    message = error_text(call(server, {"image": data_url(picture), "num_beams": 2.5}))
    assert "num_beams" in message
    message = error_text(call(server, {"image": data_url(picture), "decoding": "greedy", "heatmap_word": 99}))
    assert "heatmap_word" in message
    message = error_text(call(server, {"image": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}))
    assert "image: cannot be captioned" in message


def test_the_tool_reads_no_server_file_and_no_private_address(server):
    message = error_text(call(server, {"image": "/etc/passwd"}))
    assert "image:" in message and "root:" not in message
    message = error_text(call(server, {"image": "file:///etc/passwd"}))
    assert "image:" in message and "root:" not in message
    message = error_text(call(server, {"image": f"{server}/health"}))  # this server: a loopback address
    assert "image: could not fetch" in message and '"status"' not in message


def test_sigterm_stops_the_app_within_seconds_after_mcp_traffic(tiny_checkpoint, picture):
    """app.py as users run it: one MCP call, then SIGTERM (a Space restart, Ctrl-C's cousin)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", tiny_checkpoint, "--port", str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 240
        while True:
            assert app.poll() is None, app.stdout.read()
            try:
                urllib.request.urlopen(url + "/health", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the app did not answer /health"
                time.sleep(0.5)
        assert not call(url, {"image": data_url(picture), "decoding": "greedy"}).isError
        started = time.monotonic()
        app.send_signal(signal.SIGTERM)
        app.wait(timeout=20)
        assert time.monotonic() - started < serving.SHUTDOWN_TIMEOUT_S + 5
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()

"""The app's MCP server, driven by the real `mcp` client over streamable HTTP against a real server on localhost:
the caption tool is listed with its docstring, takes a data URL and answers the caption, words and heatmaps."""

from __future__ import annotations

import ast
import asyncio
import base64

import pytest
from app_helpers import build_app, png_bytes, serve
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from PIL import Image

import serving

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with serve(build_app(serving.load_captioner(tiny_checkpoint), tiny_checkpoint)) as url:
        yield url


async def list_and_call(url: str, arguments: dict | None) -> tuple[list, object]:
    """List the server's tools and, with `arguments`, call its caption tool."""
    async with streamablehttp_client(url + "/gradio_api/mcp/") as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
            result = None
            if arguments is not None:
                name = next(t.name for t in tools if "caption" in t.name)
                result = await session.call_tool(name, arguments)
            return tools, result


def test_the_caption_tool_is_listed_with_its_description(server):
    tools, _ = asyncio.run(list_and_call(server, None))
    caption = [t for t in tools if "caption" in t.name]
    assert len(caption) == 1, [t.name for t in tools]  # the UI's private events are not tools
    assert "heatmap" in caption[0].description
    assert {"image", "decoding", "num_beams"} <= set(caption[0].inputSchema["properties"])


def test_the_caption_tool_captions_a_data_url(server, tiny_checkpoint):
    picture = Image.new("RGB", (48, 36), (235, 235, 235))
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode()
    _, result = asyncio.run(list_and_call(server, {"image": data_url, "decoding": "greedy"}))
    assert not result.isError, result.content
    # Gradio writes the outputs (caption, JSON) as the text of a Python literal
    values = [ast.literal_eval(c.text) for c in result.content if c.type == "text"]
    values = [v for value in values for v in (value if isinstance(value, (list, tuple)) else [value])]
    payload = next(v for v in values if isinstance(v, dict))
    assert payload["caption"] in values
    expected = serving.load_captioner(tiny_checkpoint).caption(picture, num_beams=1)
    assert payload["caption"] == expected.text and payload["image_size"] == [48, 36]
    assert len(payload["attention"]) == len(payload["words"]) == len(expected.words)


def test_the_caption_tool_refuses_a_server_path(server):
    _, result = asyncio.run(list_and_call(server, {"image": "/etc/passwd", "decoding": "greedy"}))
    assert result.isError and "root:" not in str(result.content)

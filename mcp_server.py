"""The app's MCP server: one `caption` tool for agents, over streamable HTTP at /gradio_api/mcp/ beside the UI.

Built with the official `mcp` SDK (FastMCP) rather than Gradio's generated server, which can only pass the UI
event's outputs through `str()`: agents got a Python literal instead of JSON, every number typed `number` with no
bounds, no output schema, and no picture. This tool returns

- `structuredContent` described by an `outputSchema` (`CaptionResult` below), and the same JSON as text for
  clients that read text only: caption, words, score, grid, image size and each word's peak cell, with the full
  maps (4 decimals) on request;
- the heatmap of one word over the image (or a strip of every word's) as PNG image content.

Requests are stateless and answered as plain JSON: no event stream stays open, so the server stops at SIGTERM
within a second or two after MCP traffic. Captioning runs on a worker thread through the same CaptionService as
the UI (one forward at a time), so the event loop keeps serving the page while an agent waits.
"""

import base64
import binascii
import io
from typing import Annotated, Literal

import anyio
import numpy as np
import safehttpx
from mcp.server.fastmcp import FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, ImageContent, TextContent
from PIL import Image
from pydantic import BaseModel, Field

import serving
from caption_model.generation import (DEFAULT_NO_REPEAT_NGRAM_SIZE, DEFAULT_REPETITION_PENALTY, Caption,
                                     longest_caption)
from caption_model.heatmap import cell_centres, heatmap_strip, overlay
from caption_model.processing import original_size

MAX_BEAMS = 5  # as the UI's slider
MAX_NO_REPEAT_NGRAM_SIZE = 6
IMAGE_SIDE = 512  # longest side of the heatmap picture returned (enough to see it, small for a context window)
MAP_DECIMALS = 4
TOOL_DESCRIPTION = (
    "Caption an image and show where the model looked for every word. Give the image as an https URL or a data "
    "URL (data:image/png;base64,...). Returns JSON (caption, words, score, grid_size [rows, cols], image_size "
    "[width, height], and per word the grid cell and image pixel where its heatmap peaks; include_maps=true adds "
    "every word's full heatmap) and a PNG of one word's heatmap over the image (heatmap_word, default the first "
    "content word; heatmap_strip=true shows every word)."
)


class WordPeak(BaseModel):
    """Where one word's heatmap is highest."""

    word: str
    row: int = Field(description="grid row of the peak cell, 0 at the top")
    col: int = Field(description="grid column of the peak cell, 0 at the left")
    x: float = Field(description="that cell's centre in image pixels, from the left")
    y: float = Field(description="that cell's centre in image pixels, from the top")
    weight: float = Field(description="the share of the word's attention on that cell (each map sums to 1)")


class CaptionResult(BaseModel):
    """The tool's JSON answer."""

    caption: str
    words: list[str] = Field(description="whole words, in order")
    score: float = Field(description="mean log-probability of the caption's tokens (<= 0)")
    grid_size: list[int] = Field(description="[rows, cols] of the attention grid")
    image_size: list[int] = Field(description="[width, height] of the image, upright")
    peaks: list[WordPeak] = Field(description="one per word")
    heatmap_word: int | None = Field(description="index of the word whose heatmap the image shows (None: a strip "
                                                 "of every word, or no words)")
    attention: list[list[list[float]]] | None = Field(
        default=None, description="with include_maps: per word a [rows][cols] map summing to 1")
    model: str = Field(description="the model served (Hub id or folder)")


def build_mcp_server(service: serving.CaptionService) -> FastMCP:
    """A FastMCP server with the `caption` tool over `service`, for serving.create_app(service, demo, mcp=...),
    which mounts it at /gradio_api/mcp/."""
    server = FastMCP(
        "Image captioner",
        instructions=TOOL_DESCRIPTION,
        stateless_http=True,
        json_response=True,
        streamable_http_path="/",
        # The app is a public web server (a Space, or localhost like any Gradio app): the Host header is the
        # Space's domain, which FastMCP's localhost-only DNS-rebinding check would refuse.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    longest = longest_caption(service.captioner)

    @server.tool(name="caption", description=TOOL_DESCRIPTION, structured_output=True)
    async def caption(
        image: Annotated[str, Field(description="an https URL, or a data URL: data:image/png;base64,...")],
        decoding: Annotated[Literal["beam", "greedy"], Field(description="beam search (better) or greedy "
                                                                         "(faster)")] = "beam",
        num_beams: Annotated[int, Field(ge=1, le=MAX_BEAMS, description="beams for beam search")] = 3,
        max_length: Annotated[int, Field(ge=1, le=longest,
                                         description="longest caption, in tokens")] = min(30, longest),
        length_penalty: Annotated[float, Field(ge=0.0, le=2.0, description="beam search: above 1 favours longer "
                                                                           "captions")] = 1.0,
        no_repeat_ngram_size: Annotated[int, Field(ge=0, le=MAX_NO_REPEAT_NGRAM_SIZE, description=(
            "never repeat a run of this many tokens (0: off)"))] = DEFAULT_NO_REPEAT_NGRAM_SIZE,
        repetition_penalty: Annotated[float, Field(ge=1.0, le=2.0, description=(
            "above 1 makes words already written less likely (1: off)"))] = DEFAULT_REPETITION_PENALTY,
        heatmap_word: Annotated[int | None, Field(ge=0, description=(
            "index into words of the heatmap to return as an image (default: the first content word)"))] = None,
        heatmap_strip: Annotated[bool, Field(description="return a strip of every word's heatmap instead")] = False,
        include_maps: Annotated[bool, Field(description="add every word's full heatmap to the JSON")] = False,
    ) -> Annotated[CallToolResult, CaptionResult]:
        source = await read_image_argument(image)
        beams = 1 if decoding == "greedy" else num_beams
        try:
            picture, result = await anyio.to_thread.run_sync(
                lambda: service.caption(source, beams, max_length, length_penalty, no_repeat_ngram_size,
                                        repetition_penalty, display_side=serving.DISPLAY_MAX_SIDE))
        except ValueError as error:  # load_image: not an image, truncated, a decompression bomb
            raise ToolError(f"image: cannot be captioned: {error}") from error
        if heatmap_word is not None and heatmap_word >= len(result.words):
            raise ToolError(f"heatmap_word: expected an index below {len(result.words)} (the caption has "
                            f"{len(result.words)} words: {result.words}), got {heatmap_word}")
        shown = None if heatmap_strip else heatmap_word if heatmap_word is not None else \
            serving.first_content_word(result.words)
        answer = describe(service, result, picture, shown, include_maps)
        content: list = [TextContent(type="text", text=answer.model_dump_json())]
        if result.words:
            content.append(ImageContent(type="image", mimeType="image/png",
                                        data=heatmap_png(service, picture, result, shown)))
        return CallToolResult(content=content, structuredContent=answer.model_dump(mode="json"))

    return server


async def read_image_argument(image: str) -> bytes:
    """The tool's `image` argument -> the file's bytes: a data URL decoded, an http(s) URL fetched with SSRF
    protection (safehttpx: public addresses only, as Gradio fetches URLs). ToolError naming `image` otherwise."""
    image = image.strip()
    if image.startswith("data:"):
        header, _, payload = image.partition(",")
        if not header.endswith(";base64") or not payload:
            raise ToolError("image: expected a base64 data URL (data:image/png;base64,...), got "
                            f"{header[:40]!r}...")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ToolError(f"image: the data URL's base64 does not decode ({error})") from error
    if not image.startswith(("https://", "http://")):
        raise ToolError(f"image: expected an https URL or a data URL (data:image/png;base64,...), got "
                        f"{image[:60]!r}")
    try:
        response = await safehttpx.get(image)
    except Exception as error:  # safehttpx raises ValueError for private hosts, httpx errors for the rest
        raise ToolError(f"image: could not fetch {image[:100]!r}: {error}") from error
    if response.status_code != 200:
        raise ToolError(f"image: fetching {image[:100]!r} answered HTTP {response.status_code}")
    if len(response.content) > serving.MAX_UPLOAD_BYTES:
        raise ToolError(f"image: {len(response.content)} bytes is more than the "
                        f"{serving.MAX_UPLOAD_BYTES // 2**20} MB accepted")
    return response.content


def describe(service: serving.CaptionService, result: Caption, picture: Image.Image, shown: int | None,
             include_maps: bool) -> CaptionResult:
    grid = tuple(service.captioner.grid_size)
    size = original_size(picture)
    maps = serving.word_maps(result, grid)  # (len(words), gh, gw)
    xs, ys = cell_centres(grid, size, service.captioner.config.image_size)  # (gw,), (gh,) image pixels
    peaks = []
    for word, word_map in zip(result.words, maps):
        row, col = np.unravel_index(int(word_map.argmax()), grid)
        peaks.append(WordPeak(word=word, row=int(row), col=int(col), x=round(float(xs[col]), 1),
                              y=round(float(ys[row]), 1), weight=round(float(word_map[row, col]), MAP_DECIMALS)))
    return CaptionResult(
        caption=result.text, words=list(result.words), score=round(float(result.score), MAP_DECIMALS),
        grid_size=list(grid), image_size=[int(size[0]), int(size[1])], peaks=peaks, heatmap_word=shown,
        attention=np.round(maps, MAP_DECIMALS).tolist() if include_maps else None, model=service.model_id,
    )


def heatmap_png(service: serving.CaptionService, picture: Image.Image, result: Caption, shown: int | None) -> str:
    """Base64 PNG: word `shown`'s heatmap over the picture, or (None) a strip of every word's."""
    small = picture.copy()
    small.thumbnail((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BICUBIC)
    if shown is None:
        drawn = heatmap_strip(small, result.words, result.attention, input_size=service.captioner.config.image_size)
    else:
        word_map = serving.word_maps(result, tuple(service.captioner.grid_size))[shown]
        drawn = overlay(small, word_map, alpha=0.5, input_size=service.captioner.config.image_size)
    buffer = io.BytesIO()
    drawn.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")

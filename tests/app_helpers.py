"""Helpers for the app tests: the served app, a real uvicorn server in a thread, and the bad files every entry point
must refuse."""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # app.py and benchmarks/ live at the repo root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(app, timeout: float = 60.0) -> Iterator[str]:
    """Run an ASGI `app` with uvicorn on a free localhost port in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def build_app(captioner, model_id: str):
    """The app as `python app.py` serves it: the Blocks UI over one CaptionService, mounted beside the HTTP routes."""
    import app
    import mcp_server
    import serving

    service = serving.CaptionService(captioner, model_id)
    return serving.create_app(service, app.create_demo(service), mcp_server.build_mcp_server(service))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save_args)
    return buffer.getvalue()


def decompression_bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A valid PNG header announcing width x height pixels (1.6 G by default) with a tiny body."""
    data = png_bytes(Image.new("1", (8, 8)))
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]  # new size, same bit depth / colour type / ...
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def noisy_photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a phrase the error message must contain)."""
    jpeg = jpeg_bytes(noisy_photo(256, 256))
    return {
        "not_an_image.png": (b"this is a text file, not a picture\n" * 20, "not an image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "bomb.png": (decompression_bomb_png(), "decompression bomb"),
        "empty.jpg": (b"", "empty"),
    }


def good_images() -> dict[str, bytes]:
    """Every kind of PIL-readable input the app must caption: modes, EXIF rotation, sizes, an animated GIF."""
    base = noisy_photo(120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((220, 40, 40), (40, 80, 220), (40, 170, 60))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "rgb.png": png_bytes(base),
        "grey.png": png_bytes(base.convert("L")),
        "rgba.png": png_bytes(base.convert("RGBA")),
        "palette.png": png_bytes(base.convert("P")),
        "cmyk.jpg": jpeg_bytes(base.convert("CMYK")),
        "sixteen_bit.png": png_bytes(Image.fromarray((np.arange(80 * 120).reshape(80, 120) * 7).astype(np.uint16))),
        "exif_rotated.jpg": jpeg_bytes(base, exif=exif.tobytes()),
        "tiny.png": png_bytes(Image.new("RGB", (1, 1), (200, 30, 30))),
        "large.jpg": jpeg_bytes(noisy_photo(4000, 3000), quality=70),
        "animated.gif": gif.getvalue(),
        "photo.webp": _webp(base),
    }


def _webp(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "WEBP")
    return buffer.getvalue()

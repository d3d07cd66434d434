"""Heatmap strips of caption-images --heatmaps: the image, then one overlay per word with the word under it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..generation import Caption
from ..heatmap import DEFAULT_INPUT_SIZE
from .files import file_key

STRIP_HEIGHT = 192  # px of each tile in a heatmap strip
LABEL_HEIGHT = 24  # px of the word under each tile


def heatmap_strip(image: Image.Image, caption: Caption, height: int = STRIP_HEIGHT,
                  input_size: int = DEFAULT_INPUT_SIZE) -> Image.Image:
    """The image, then one overlay per word (caption_model.heatmap.overlay; `input_size` the model's input side),
    each tile labelled -> one RGB image."""
    from ..heatmap import overlay  # matplotlib: only when strips are asked for

    width = max(1, round(image.width * height / image.height))
    small = image.resize((width, height), Image.Resampling.BICUBIC)
    tiles = [(small, "(image)")]
    tiles += [(overlay(small, caption.attention[i], input_size=input_size), word)
              for i, word in enumerate(caption.words)]
    strip = Image.new("RGB", (width * len(tiles), height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(strip)
    font = _font()
    for index, (tile, label) in enumerate(tiles):
        strip.paste(tile, (index * width, 0))
        draw.text((index * width + width / 2, height + LABEL_HEIGHT / 2), label, fill="black", font=font, anchor="mm")
    return strip


def _font():
    try:
        return ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def heatmap_name(file: str) -> str:
    """A strip's file name: the image's stem and a short hash of its path (images in different folders may
    share a name)."""
    digest = hashlib.sha1(file_key(file).encode("utf-8")).hexdigest()[:8]
    return f"{Path(file).stem}-{digest}.png"

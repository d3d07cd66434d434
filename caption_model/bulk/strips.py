"""Heatmap strips of caption-images --heatmaps: their file names; the strip itself (the image, then one overlay per
word with the word under it) is caption_model.heatmap.heatmap_strip, which the app's MCP tool also draws."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..heatmap import LABEL_HEIGHT, STRIP_HEIGHT, heatmap_strip  # noqa: F401  (the strip lives beside overlay)
from .files import file_key


def heatmap_name(file: str) -> str:
    """A strip's file name: the image's stem and a short hash of its path (images in different folders may
    share a name)."""
    digest = hashlib.sha1(file_key(file).encode("utf-8")).hexdigest()[:8]
    return f"{Path(file).stem}-{digest}.png"

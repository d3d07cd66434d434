"""Attention map -> smooth, colour-mapped overlay on the original image."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image

from .processing import ImageInput, load_image


def upsample(attention_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(gh, gw) map -> (H, W) float32 in [0, 1], bicubic (smooth, not blocky); cell (i, j) covers its own
    1/gh x 1/gw of the image, as in the model's preprocessing (the whole image, no crop)."""
    attention_map = np.asarray(attention_map, dtype=np.float32)
    if attention_map.ndim != 2:
        raise ValueError(f"expected one attention map of shape (gh, gw), got shape {attention_map.shape}")
    low, high = float(attention_map.min()), float(attention_map.max())
    scaled = (attention_map - low) / (high - low) if high > low else np.zeros_like(attention_map)
    width, height = size
    image = Image.fromarray(scaled).resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def overlay(image: ImageInput, attention_map: np.ndarray, alpha: float = 0.5, colormap: str = "inferno") -> Image.Image:
    """Blend the colour-mapped `attention_map` (gh, gw) over `image`; returns an RGB PIL image of the image's size.

    `alpha` is the heatmap opacity in [0, 1] at the map's peak, fading with the map, so low-attention pixels keep
    the photo's own colours; `colormap` any matplotlib colour map (perceptual by default).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is the heatmap opacity and must be in [0, 1], got {alpha}")
    base = load_image(image)
    heat = upsample(attention_map, base.size)  # (H, W) in [0, 1]
    colours = colormaps[colormap](heat)[..., :3]  # (H, W, 3) floats in [0, 1]
    # the opacity follows the map: where the model did not look, the photo stays as it is (no grey veil)
    weight = alpha * heat[..., None]  # (H, W, 1)
    blended = (1.0 - weight) * (np.asarray(base, dtype=np.float32) / 255.0) + weight * colours
    return Image.fromarray(np.round(blended * 255.0).astype(np.uint8), "RGB")

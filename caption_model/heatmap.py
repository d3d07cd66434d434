"""Attention map -> smooth, colour-mapped overlay on the original image; the cell -> image-pixel geometry.

Cell geometry (one owner: `cell_centres`): the whole image is resized to the model input S x S (no crop) and the
encoder's grid has stride s = S / g input pixels per cell. torchvision's ResNet centres the receptive field of
grid cell (i, j) on input pixel index (s*i, s*j), i.e. at (x, y) = (s*j + 0.5, s*i + 0.5) in continuous input
coordinates (pixel k spans [k, k + 1)), which is (x * W / S, y * H / S) in the original W x H image: half a pixel
right of the cell's slice start, not the middle of its 1/g slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .config import CaptionerConfig
from .processing import ImageInput, load_image

DEFAULT_INPUT_SIZE = CaptionerConfig.__dataclass_fields__["image_size"].default  # S when a caller does not say
CUBIC_A = -0.5  # Keys' cubic convolution parameter (PIL's and OpenCV's bicubic)


def cell_centres(grid_shape: tuple[int, int], image_size: tuple[int, int],
                 input_size: int = DEFAULT_INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Receptive-field centres of the (gh, gw) grid's cells in the original image: (xs (gw,), ys (gh,)) float64.

    Continuous pixel coordinates (pixel k spans [k, k + 1)): cell (i, j) is centred at (xs[j], ys[i]), the pixel
    (column, row) = (floor(xs[j]), floor(ys[i])). image_size: (W, H); input_size: the model input side S.
    """
    (gh, gw), (width, height), side = grid_shape, image_size, float(input_size)
    xs = ((side / gw) * np.arange(gw) + 0.5) * width / side  # (gw,)
    ys = ((side / gh) * np.arange(gh) + 0.5) * height / side  # (gh,)
    return xs, ys


def cell_geometry(grid_shape: tuple[int, int], image_size: tuple[int, int],
                  input_size: int = DEFAULT_INPUT_SIZE) -> dict:
    """How cells map to image pixels, as JSON for programs that draw the maps (the /caption API, the CLI)."""
    xs, ys = cell_centres(grid_shape, image_size, input_size)
    gh, gw = grid_shape
    return {
        "input_size": int(input_size),  # S: the image is resized to S x S (no crop) for the model
        "stride": [input_size / gh, input_size / gw],  # [rows, cols]: input pixels per cell
        "cell_centres_x": np.round(xs, 3).tolist(),  # [gw] x of column j's receptive-field centre, image pixels
        "cell_centres_y": np.round(ys, 3).tolist(),  # [gh] y of row i's receptive-field centre, image pixels
        "cell_centre_formula": "x = (stride_x*j + 0.5) * width / input_size, y = (stride_y*i + 0.5) * height / "
                               "input_size; continuous pixel coordinates (pixel k spans [k, k+1))",
    }


def _cubic_weights(positions: np.ndarray, n_cells: int) -> np.ndarray:
    """(n,) fractional cell indices -> (n, n_cells) Keys cubic interpolation weights, edge cells repeated."""
    base = np.floor(positions).astype(np.int64)  # (n,)
    t = positions - base  # (n,) in [0, 1)
    weights = np.zeros((positions.size, n_cells), dtype=np.float32)
    rows = np.arange(positions.size)
    for offset in (-1, 0, 1, 2):
        d = np.abs(t - offset)  # (n,) distance to the tap
        w = np.where(d <= 1, ((CUBIC_A + 2) * d - (CUBIC_A + 3)) * d * d + 1,
                     np.where(d < 2, CUBIC_A * (((d - 5) * d + 8) * d - 4), 0.0))
        np.add.at(weights, (rows, np.clip(base + offset, 0, n_cells - 1)), w)
    return weights


def _axis_weights(centres: np.ndarray, length: int) -> np.ndarray:
    """(length, g) weights that interpolate g cells, cell k sitting at `centres[k]`, onto pixel centres k + 0.5;
    beyond the outermost centres the edge cell's value holds (np.interp clamps)."""
    positions = np.interp(np.arange(length) + 0.5, centres, np.arange(centres.size, dtype=np.float64))  # (length,)
    return _cubic_weights(positions, centres.size)


def upsample(attention_map: np.ndarray, size: tuple[int, int], input_size: int = DEFAULT_INPUT_SIZE) -> np.ndarray:
    """(gh, gw) map -> (H, W) float32 in [0, 1] (min-max scaled), bicubic (smooth, not blocky), every cell's value
    at its receptive-field centre (`cell_centres`); `input_size` is the model's input side S."""
    attention_map = np.asarray(attention_map, dtype=np.float32)
    if attention_map.ndim != 2:
        raise ValueError(f"expected one attention map of shape (gh, gw), got shape {attention_map.shape}")
    low, high = float(attention_map.min()), float(attention_map.max())
    scaled = (attention_map - low) / (high - low) if high > low else np.zeros_like(attention_map)
    width, height = size
    xs, ys = cell_centres(attention_map.shape, (width, height), input_size)
    # separable: rows then columns, two small matrix products instead of a per-pixel 4x4 gather
    heat = _axis_weights(ys, height) @ scaled @ _axis_weights(xs, width).T  # (H, gh) @ (gh, gw) @ (gw, W)
    # cubic overshoot (two strong neighbours peak between them) is scaled back to 1, not clipped into a plateau:
    # the brightest pixel stays where the interpolated map peaks
    peak = float(heat.max())
    if peak > 1.0:
        heat *= 1.0 / peak
    return np.clip(heat, 0.0, 1.0, out=heat)


def recentre(word_maps: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Move each map (N, gh, gw) back by its word's offset (N, 2) = (dx, dy) in cells -> (N, gh, gw), each summing
    to 1: cell (i, j) takes the map's value at (i + dy, j + dx), Keys-cubic interpolated (edge cells repeated,
    the cubic's small negative lobes clipped). A map that peaks dx cells right of its object then peaks on it."""
    maps = np.asarray(word_maps, dtype=np.float64)
    offsets = np.asarray(offsets, dtype=np.float64).reshape(-1, 2)
    if maps.ndim != 3 or offsets.shape[0] != maps.shape[0]:
        raise ValueError(f"expected maps (N, gh, gw) and offsets (N, 2), got shapes {maps.shape} and {offsets.shape}")
    gh, gw = maps.shape[1:]
    moved = np.empty_like(maps)
    for k, (dx, dy) in enumerate(offsets):
        rows = _cubic_weights(np.arange(gh) + dy, gh)  # (gh, gh): new row i reads old rows around i + dy
        cols = _cubic_weights(np.arange(gw) + dx, gw)  # (gw, gw)
        moved[k] = np.clip(rows @ maps[k] @ cols.T, 0.0, None)  # (gh, gh) @ (gh, gw) @ (gw, gw)
        total = moved[k].sum()
        moved[k] = moved[k] / total if total > 0 else maps[k]
    return moved.astype(np.float32)


PHRASE_VOTE_SIGMA = 1.0  # cells: how far a neighbour's vote reaches (chosen on shapes images, benchmarks/README.md)


def _blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """(N, gh, gw) -> (N, gh, gw), each map convolved with a Gaussian of `sigma` cells (zero beyond the grid)."""
    def kernel(n: int) -> np.ndarray:  # (n, n): weight of cell j's value at cell i
        offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
        return np.exp(-0.5 * (offsets / sigma) ** 2) / np.exp(-0.5 * (np.arange(1 - n, n) / sigma) ** 2).sum()
    return kernel(maps.shape[1]) @ maps @ kernel(maps.shape[2]).T  # (gh, gh) @ (N, gh, gw) @ (gw, gw)


def phrase_maps(word_maps: np.ndarray, vote_sigma: float = PHRASE_VOTE_SIGMA) -> np.ndarray:
    """The "phrase" reading of a caption's word maps (N, gh, gw), each summing to 1 -> (N, gh, gw), each summing to 1.

    log map_t + sum over the neighbours n = t-1, t+1 of peaked(n) * log blur(map_n), softmax over cells, where
    peaked(n) = 1 - entropy(map_n) / log P is 0 for a uniform map and 1 for a single cell, and blur spreads the
    neighbour's vote over `vote_sigma` cells (a colour word and its noun peak on different edges of the same
    object, often a cell apart). "a red circle" with two red objects splits "red" between them and "circle"
    decides; a diffuse "a" counts for almost nothing.
    """
    maps = np.asarray(word_maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError(f"expected word maps of shape (N, gh, gw), got shape {maps.shape}")
    N, P = maps.shape[0], maps.shape[1] * maps.shape[2]
    if N == 0 or P == 1:
        return maps.astype(np.float32)
    log_maps = np.log(np.clip(maps.reshape(N, P), 1e-30, None))  # (N, P)
    entropy = -(np.exp(log_maps) * log_maps).sum(-1) / np.log(P)  # (N,), 0 = one cell, 1 = uniform
    votes = _blur(maps, vote_sigma).reshape(N, P) if vote_sigma > 0 else maps.reshape(N, P)  # (N, P)
    weighted = np.clip(1.0 - entropy, 0.0, None)[:, None] * np.log(np.clip(votes, 1e-30, None))  # (N, P)
    combined = log_maps.copy()
    combined[1:] += weighted[:-1]  # the previous word
    combined[:-1] += weighted[1:]  # the next word
    combined -= combined.max(-1, keepdims=True)
    phrase = np.exp(combined)
    return (phrase / phrase.sum(-1, keepdims=True)).reshape(maps.shape).astype(np.float32)


def legend_colours(count: int = 11, colormap: str = "inferno") -> list[tuple[float, tuple[int, int, int]]]:
    """`count` (map value, RGB colour) stops from low to high attention, for a colour legend: the overlay draws a
    value v in that colour at opacity alpha * v, so low values leave the photo as it is."""
    from matplotlib import colormaps  # lazy: the geometry functions above are used where matplotlib is not

    values = np.linspace(0.0, 1.0, count)  # (count,)
    rgb = np.round(colormaps[colormap](values)[:, :3] * 255).astype(int)  # (count, 3)
    return [(float(v), (int(r), int(g), int(b))) for v, (r, g, b) in zip(values, rgb)]


def overlay(image: ImageInput, attention_map: np.ndarray, alpha: float = 0.5, colormap: str = "inferno",
            input_size: int = DEFAULT_INPUT_SIZE) -> Image.Image:
    """Blend the colour-mapped `attention_map` (gh, gw) over `image`; returns an RGB PIL image of the image's size.

    `alpha` is the heatmap opacity in [0, 1] at the map's peak, fading with the map, so low-attention pixels keep
    the photo's own colours; `colormap` any matplotlib colour map (perceptual by default); `input_size` the
    model's input side S (cell geometry, see `cell_centres`).
    """
    from matplotlib import colormaps

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is the heatmap opacity and must be in [0, 1], got {alpha}")
    base = load_image(image)
    heat = upsample(attention_map, base.size, input_size)  # (H, W) in [0, 1]
    colours = colormaps[colormap](heat)[..., :3]  # (H, W, 3) floats in [0, 1]
    # the opacity follows the map: where the model did not look, the photo stays as it is (no grey veil)
    weight = alpha * heat[..., None]  # (H, W, 1)
    blended = (1.0 - weight) * (np.asarray(base, dtype=np.float32) / 255.0) + weight * colours
    return Image.fromarray(np.round(blended * 255.0).astype(np.uint8), "RGB")


STRIP_HEIGHT = 192  # px of each tile in a heatmap strip
LABEL_HEIGHT = 24  # px of the word under each tile


def heatmap_strip(image: Image.Image, words: Sequence[str], attention: np.ndarray, height: int = STRIP_HEIGHT,
                  input_size: int = DEFAULT_INPUT_SIZE) -> Image.Image:
    """The image, then one overlay per word (`attention` (N, gh, gw), one map per word of `words`, as a Caption
    holds them; `input_size` the model's input side), each tile labelled with its word -> one RGB image."""

    width = max(1, round(image.width * height / image.height))
    small = image.resize((width, height), Image.Resampling.BICUBIC)
    tiles = [(small, "(image)")]
    tiles += [(overlay(small, attention[i], input_size=input_size), word) for i, word in enumerate(words)]
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

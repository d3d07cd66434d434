"""Images in: any PIL-readable input becomes an upright RGB image (or a ValueError that says why not), then the
normalised pixel tensor the encoder reads."""

from __future__ import annotations

import io
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .config import CaptionerConfig
from .cpu.threads import available_cpus

ImageInput = Union[Image.Image, str, os.PathLike, bytes, np.ndarray]

# More than any real photo (~ 12k x 12k); beyond it an image is treated as a decompression bomb.
MAX_IMAGE_PIXELS = 150_000_000


class ImageLoadError(ValueError):
    """The input is not an image we can read (not an image, truncated, or a decompression bomb)."""


def _open(source: ImageInput) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return Image.fromarray(source)
    if isinstance(source, bytes):
        if not source:
            raise ImageLoadError("expected image bytes, got an empty file")
        return Image.open(io.BytesIO(source))
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ImageLoadError(f"expected an image file, but {os.fspath(source)!r} does not exist")
        if os.path.getsize(source) == 0:
            raise ImageLoadError(f"expected an image file, got an empty file: {os.fspath(source)!r}")
        return Image.open(source)
    raise ImageLoadError(f"expected a PIL image, a path, bytes or a numpy array, got {type(source).__name__}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparent pixels go on white, 16-bit images are rescaled, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit files map 0..65535 onto 0..255 (a 25% grey stays 25% grey); wider "I"/"F" data is min-max scaled.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        if image.mode.startswith("I;16") or (low >= 0 and high <= 65535 and image.mode == "I"):
            scaled = array * (255.0 / 65535.0)
        elif image.mode == "F" and low >= 0 and high <= 1.0:
            scaled = array * 255.0
        else:
            scaled = (array - low) * (255.0 / (high - low) if high > low else 0.0)
        return Image.fromarray(np.round(scaled).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


ORIGINAL_SIZE = "original_size"  # image.info key: (W, H) of the upright image before any reduced decoding
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


def original_size(image: Image.Image) -> tuple[int, int]:
    """(W, H) of the upright image as the user's file has it, also when load_image decoded a reduced copy."""
    return tuple(image.info.get(ORIGINAL_SIZE, image.size))


def load_image(source: ImageInput, min_side: int | None = None, display_side: int | None = None) -> Image.Image:
    """Open `source` as an upright RGB PIL image (EXIF orientation applied; first frame of animations).

    The result may be smaller than the file when asked, never smaller than asked: both sides >= `min_side` (what
    the model resizes to S x S) and the longer side >= `display_side` (a display copy). A JPEG is then decoded at
    1/2, 1/4 or 1/8 scale (PIL's draft mode: the decoder skips the detail), so a 12 MP photo costs little more
    than a small one. `original_size(image)` gives the file's full upright (W, H) either way.
    Raises ImageLoadError (a ValueError) for a file that is not an image, a truncated image or a decompression bomb.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the input"
    try:
        with warnings.catch_warnings():  # PIL warns from 89 M pixels; our own limit below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open(source)
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"it is {width}x{height} = {width * height:,} pixels")
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        size = (height, width) if orientation in _SWAPS_AXES else (width, height)  # upright
        size = tuple(image.info.get(ORIGINAL_SIZE, size))  # an image load_image already reduced keeps its file's
        if (min_side or display_side) and image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK", "YCbCr"):
            fit = (display_side or 0) / max(width, height)  # the display copy needs only its longer side
            need = (max(min_side or 0, math.ceil(width * fit)), max(min_side or 0, math.ceil(height * fit)))
            image.draft(image.mode, need)  # the smallest 1/2^k scale still >= need in both sides
        image.load()
        image = _to_rgb(ImageOps.exif_transpose(image))
        image.info[ORIGINAL_SIZE] = size
        return image
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"refusing {name} as a likely decompression bomb: {error} (the limit is {MAX_IMAGE_PIXELS:,} pixels)"
        ) from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(f"expected an image file (JPEG, PNG, GIF, WebP, ...), but {name} is not an image") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"could not read {name}: the image is truncated or corrupt ({error})") from error


def _resized(image: ImageInput, side: int) -> np.ndarray:
    """One image -> (S, S, 3) uint8; a large JPEG is decoded straight at a reduced scale that still covers S x S."""
    return np.asarray(load_image(image, min_side=side).resize((side, side), Image.Resampling.BICUBIC))


def in_threads(function: Callable[[Any], Any], items: Sequence[Any], threads: int | None = None) -> list[Any]:
    """[function(item) for item in items], on up to `threads` (default: the usable CPUs, at most 4) threads when there
    are several items. For PIL work, which releases the GIL while it decodes, encodes and resizes: ~1.8x on 2 cores.
    A pool per call, not one kept: a forked DataLoader worker would inherit a kept pool without its threads."""
    threads = min(threads or min(available_cpus(), 4), len(items))
    if threads < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(function, items))  # in order; the first failing item raises, as in a loop


def preprocess(images: Sequence[ImageInput] | ImageInput, config: CaptionerConfig) -> torch.Tensor:
    """Images (PIL, paths, bytes, arrays) -> (B, 3, S, S) normalised float pixels. The whole image is resized to
    S x S (no crop), so every part of it reaches the attention grid."""
    # Why not the ResNet-50 weights' own resize-232 + centre-crop-224: on Flickr8k's 4:3 and 3:2 photos the crop drops
    # 14-18% of each end of the long side (30-38% of the area, benchmarks/crop_coverage.py), and with it whatever a
    # caption names there: no heatmap could point at it, and the maps would cover only part of the photo the user
    # sees. The squash (also the SAT tutorial's, at 256 x 256) keeps all of it and costs the aspect ratio, which the
    # weights tolerate: torchvision's IMAGENET1K_V2 recipe trains on RandomResizedCrop patches of aspect ratio 3/4 to
    # 4/3 stretched to a square. A reasoned choice: grounding with the pretrained weights was not measured (offline).
    if isinstance(images, (Image.Image, str, os.PathLike, bytes, np.ndarray)):
        images = [images]
    batch = np.stack(in_threads(partial(_resized, side=config.image_size), images))  # (B, S, S, 3) uint8
    pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S)
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    return (pixels - mean) / std

"""Per-word heatmap offsets, measured without boxes: where a word's map peaks relative to what it names.

A trained model's maps can peak a fixed distance beside the object a word names (the shapes preset's peaked on the
top-left edges of objects, 0.5-0.9 cells off their centres), and by how much is a property of the run, not of the
preset. Mirroring the image tells that distance apart from the object's position without knowing where the object
is: caption an image, read the same caption's maps on the image flipped left-right (and top-bottom), and mirror
the flipped map's peak back. A map that peaks at (object + d) on the image peaks at (mirrored object + d) on the
mirror image, i.e. at (object - d) once mirrored back, so half the difference of the two peaks is d. Its median over
the validation images, for every word seen often enough, is `CaptionerConfig.heatmap_offsets`; `to_caption`
then moves each served map back by its word's offset (`heatmap.recentre`). Only the images are used: boxes stay
evaluation-only. The median, not the mean: a mirror image can be unlike the training images (a shapes triangle
upside down, a photo's sky at the bottom), and the word's map then lands elsewhere; on three shapes runs the mean
over-corrected y by 0.3 cells on one, the median did not (benchmarks/README.md "Per-word map offsets").
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from caption_model.generation import generate, read_captions
from caption_model.heatmap import upsample
from caption_model.processing import ImageInput
from caption_model.training.feature_cache import decode_image

logger = logging.getLogger(__name__)

MIN_WORD_COUNT = 10  # a word needs this many occurrences in the captions to get an offset
BATCH_SIZE = 32


def peak_position(word_map: np.ndarray, input_size: int) -> tuple[float, float]:
    """(x, y) in model-input pixels (continuous: pixel k spans [k, k + 1)) of the brightest pixel of the map the
    overlay draws on an input-sized image."""
    heat = upsample(word_map, (input_size, input_size), input_size)  # (S, S)
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return x + 0.5, y + 0.5


def mirror_offsets(maps: np.ndarray, left_right: np.ndarray, top_bottom: np.ndarray,
                   input_size: int) -> np.ndarray:
    """Word maps (N, gh, gw) of a caption on an image, on its left-right mirror and on its top-bottom mirror ->
    (N, 2) offsets (dx, dy) in cells: half the distance between each map's peak and its mirror map's peak mirrored
    back (module docstring)."""
    gh, gw = maps.shape[1:]
    stride_x, stride_y = input_size / gw, input_size / gh  # input pixels per cell
    offsets = np.zeros((len(maps), 2))
    for k in range(len(maps)):
        x, y = peak_position(maps[k], input_size)
        x_mirrored = input_size - peak_position(left_right[k], input_size)[0]  # back in the image's frame
        y_mirrored = input_size - peak_position(top_bottom[k], input_size)[1]
        offsets[k] = (x - x_mirrored) / (2 * stride_x), (y - y_mirrored) / (2 * stride_y)
    return offsets


def measure_heatmap_offsets(model, images: Sequence[ImageInput], min_count: int = MIN_WORD_COUNT,
                            batch_size: int = BATCH_SIZE) -> dict[str, list[float]]:
    """{word: [dx, dy]} in cells (x right, y down): the median offset of each word's map, from the model's own greedy
    captions of `images` read on the images and on their mirror images (module docstring). Words seen fewer than
    `min_count` times are left out. The model's current offsets are ignored while measuring."""
    from tqdm.auto import tqdm

    config = model.config
    saved, config.heatmap_offsets = config.heatmap_offsets, {}
    found: dict[str, list[np.ndarray]] = defaultdict(list)
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="heatmap offsets", leave=False, unit="batch"):
            pixels = model.preprocess(list(images[start:start + batch_size]))  # (B, 3, S, S)
            captions = generate(model, pixels, num_beams=1)
            ids = [c.token_ids for c in captions]
            left_right = read_captions(model, torch.flip(pixels, dims=[-1]), ids)  # the same words, mirrored image
            top_bottom = read_captions(model, torch.flip(pixels, dims=[-2]), ids)
            for caption, flipped_x, flipped_y in zip(captions, left_right, top_bottom):
                offsets = mirror_offsets(caption.attention, flipped_x.attention, flipped_y.attention,
                                         config.image_size)  # (N, 2)
                for word, offset in zip(caption.words, offsets):
                    found[word].append(offset)
    finally:
        config.heatmap_offsets = saved
    return {word: [round(float(v), 3) for v in np.median(pairs, axis=0)]
            for word, pairs in sorted(found.items()) if len(pairs) >= min_count}


def offsets_on_split(model, split, count: int) -> dict[str, list[float]]:
    """`measure_heatmap_offsets` on the first `count` images of a datasets split (images undecoded), logged."""
    began = time.perf_counter()
    images = [decode_image(image) for image in split.select(range(min(count, len(split))))["image"]]
    offsets = measure_heatmap_offsets(model, images)
    shown = ", ".join(f"{w} ({dx:+.2f}, {dy:+.2f})" for w, (dx, dy) in offsets.items())
    logger.info("heatmap offsets (cells) measured on %d validation images in %.0f s: %s", len(images),
                time.perf_counter() - began, shown or "no word seen often enough")
    return offsets

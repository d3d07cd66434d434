"""Per-word map offsets: heatmap.recentre, their measurement by mirror images (training/heatmap_offsets.py),
generation.read_captions and how the served maps use CaptionerConfig.heatmap_offsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caption_model import CaptionerConfig
from caption_model.generation import read_captions
from caption_model.heatmap import recentre
from caption_model.training.heatmap_offsets import measure_heatmap_offsets, mirror_offsets
from conftest import shapes_images, tiny_config

MAX_LEN = 12


@pytest.fixture(scope="module")
def images():
    return shapes_images(4, seed=2024)


@pytest.fixture(scope="module")
def greedy_caps(tiny_trained_captioner, images):
    return tiny_trained_captioner.caption_batch(images, num_beams=1, max_length=MAX_LEN)


def bump(grid: int, x: float, y: float, sigma: float = 1.0) -> np.ndarray:
    """A (grid, grid) map summing to 1, peaked at the fractional cell position (x, y) = (column, row)."""
    rows, cols = np.mgrid[0:grid, 0:grid]
    heat = np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma ** 2))
    return heat / heat.sum()


def test_recentre_moves_a_map_back_by_its_offset_and_keeps_it_a_distribution():
    peaked = np.zeros((12, 12))
    peaked[5, 5] = 1.0
    moved = recentre(np.stack([peaked, peaked]), [(1.0, -2.0), (0.0, 0.0)])  # (2, 12, 12)
    assert moved.shape == (2, 12, 12) and moved.dtype == np.float32
    np.testing.assert_allclose(moved.sum(axis=(1, 2)), 1.0, atol=1e-6)
    assert np.unravel_index(moved[0].argmax(), (12, 12)) == (7, 4)  # one cell left, two down: back on its object
    np.testing.assert_allclose(moved[1], peaked, atol=1e-7)  # no offset, no change
    half = recentre(peaked[None], [(0.5, 0.0)])[0]  # half a cell: split evenly between cells 4 and 5
    assert half[5, 4] == pytest.approx(half[5, 5]) and half[5, 4] > 0.4 and (half >= 0).all()


def test_recentre_refuses_offsets_that_do_not_match_the_maps():
    with pytest.raises(ValueError, match=r"maps \(N, gh, gw\) and offsets \(N, 2\)"):
        recentre(np.ones((3, 4, 4)) / 16, [(0.0, 0.0)])


@pytest.mark.parametrize("offset", [(0.0, 0.0), (1.0, -0.5), (-0.7, 0.8)])
def test_mirror_images_tell_a_maps_offset_apart_from_its_objects_position(offset):
    """A model whose map peaks `offset` cells from the object, wherever the object is: the object's position
    cancels between the image and its mirror images and the offset is what is measured (within 1/8 cell, the
    resolution of the upsampled map's peak)."""
    side, grid = 96, 12
    stride = side / grid
    dx, dy = offset
    measured = []
    for x, y in [(30.0, 50.0), (61.0, 20.0), (45.5, 70.0)]:  # object centres, model-input pixels
        cell = lambda px: (px - 0.5) / stride  # receptive-field centre of cell j is at stride * j + 0.5
        on_image = bump(grid, cell(x) + dx, cell(y) + dy)
        on_left_right = bump(grid, cell(side - x) + dx, cell(y) + dy)  # the object mirrored, the offset not
        on_top_bottom = bump(grid, cell(x) + dx, cell(side - y) + dy)
        measured.append(mirror_offsets(on_image[None], on_left_right[None], on_top_bottom[None], side)[0])
    np.testing.assert_allclose(measured, [offset] * 3, atol=0.13)


def test_read_captions_gives_the_maps_and_scores_decoding_gave(tiny_trained_captioner, images, greedy_caps):
    model = tiny_trained_captioner
    read = read_captions(model, model.preprocess(images[:3]), [c.token_ids for c in greedy_caps[:3]])
    for mine, decoded in zip(read, greedy_caps[:3]):
        assert mine.words == decoded.words and mine.token_ids == decoded.token_ids
        np.testing.assert_allclose(mine.attention, decoded.attention, atol=1e-5)
        assert mine.score == pytest.approx(decoded.score, abs=1e-4)


def test_served_maps_are_moved_back_by_their_words_offsets(tiny_trained_captioner, images, greedy_caps):
    model = tiny_trained_captioner
    caption = greedy_caps[0]
    moved_word, other = caption.words[1], [w for w in caption.words if w != caption.words[1]]
    model.config.heatmap_offsets = {moved_word: [1.5, -1.0], "zebra": [3.0, 3.0]}  # "zebra": never said
    try:
        served = model.caption_batch(images[:1], num_beams=1, max_length=MAX_LEN)[0]
    finally:
        model.config.heatmap_offsets = {}
    assert served.words == caption.words  # offsets move maps, never words
    for k, word in enumerate(caption.words):
        expected = recentre(caption.attention[k:k + 1], [(1.5, -1.0) if word == moved_word else (0.0, 0.0)])[0]
        np.testing.assert_allclose(served.attention[k], expected, atol=1e-6)
    assert other and not np.allclose(served.attention[1], caption.attention[1], atol=1e-4)


def test_measurement_reads_each_caption_on_both_mirror_images(tiny_trained_captioner, monkeypatch):
    """A stand-in model whose maps peak (1, -0.75) cells from the dark square in whatever pixels it is given (but
    in the corner when the square is low on the right: a mirror image unlike the others), on real preprocessed
    images with the square anywhere: every word measures that offset (the median ignores the misreadings);
    words seen fewer than min_count times are left out; the model's own offsets are restored afterwards."""
    from caption_model.generation import Caption
    from caption_model.training import heatmap_offsets

    model = tiny_trained_captioner
    side, (grid, _) = model.config.image_size, model.grid_size
    stride, offset = side / grid, (1.0, -0.75)

    def maps_of(pixels: torch.Tensor) -> list[np.ndarray]:
        maps = []
        for image in pixels:  # (3, S, S): the square is where the pixels are darkest
            rows, cols = np.nonzero(image.sum(0).numpy() < image.sum(0).mean().item())
            x, y = (cols + 0.5).mean(), (rows + 0.5).mean()  # its centre, model-input pixels
            if x > 0.6 * side and y > 0.6 * side:  # a square low on the right is misread: the map lands far away
                maps.append(bump(grid, 0.0, 0.0))
            else:
                maps.append(bump(grid, (x - 0.5) / stride + offset[0], (y - 0.5) / stride + offset[1]))
        return maps

    def captions(pixels, words):
        return [Caption(text=" ".join(w), words=w, attention=np.stack([m] * len(w)), score=0.0, token_ids=[1] * len(w))
                for m, w in zip(maps_of(pixels), words)]

    said = iter([["a", "square"], ["a", "square"], ["square"]] * 4)  # "a" 8 times, "square" 12 times
    words_of = {2: ["a", "square"], 1: ["square"]}  # read_captions gets token ids back: their count says which

    def generate(m, pixels, num_beams):
        return captions(pixels, [next(said) for _ in range(len(pixels))])

    def read_captions(m, pixels, ids):
        return captions(pixels, [words_of[len(i)] for i in ids])

    monkeypatch.setattr(heatmap_offsets, "generate", generate)
    monkeypatch.setattr(heatmap_offsets, "read_captions", read_captions)
    rng = np.random.default_rng(5)
    images = []
    for corner in [False] * 9 + [True] * 3:
        image = np.full((120, 120, 3), 250, dtype=np.uint8)
        x0, y0 = rng.integers(70, 80, size=2) if corner else rng.integers(10, 60, size=2)
        image[y0:y0 + 36, x0:x0 + 36] = 20
        images.append(image)
    model.config.heatmap_offsets = {"kept": [0.25, 0.25]}
    try:
        measured = measure_heatmap_offsets(model, images, min_count=10, batch_size=5)
        assert model.config.heatmap_offsets == {"kept": [0.25, 0.25]}
    finally:
        model.config.heatmap_offsets = {}
    assert set(measured) == {"square"}  # "a": 8 < 10 times
    np.testing.assert_allclose(measured["square"], offset, atol=0.13)


@pytest.mark.parametrize("offsets, message", [
    ([1.0, 2.0], "must be a dict"),
    ({"red": [1.0]}, "pairs of finite numbers"),
    ({"red": [1.0, float("nan")]}, "pairs of finite numbers"),
    ({"red": "up"}, "pairs of finite numbers"),
])
def test_config_refuses_offsets_that_are_not_word_to_pair(offsets, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(heatmap_offsets=offsets)


def test_offsets_round_trip_through_the_config_dict():
    config = tiny_config(heatmap_offsets={"red": (1, -0.5)})
    assert config.heatmap_offsets == {"red": [1.0, -0.5]}
    assert CaptionerConfig.from_dict(config.to_dict()).heatmap_offsets == {"red": [1.0, -0.5]}

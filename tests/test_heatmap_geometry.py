"""Cell -> image-pixel geometry (heatmap.cell_centres): what the overlay draws, what the metric judges and what
the /caption JSON says all put cell (i, j) at its receptive-field centre ((s j + 0.5) W / S, (s i + 0.5) H / S)."""

from __future__ import annotations

import numpy as np
import pytest
from app_helpers import ROOT  # noqa: F401 (puts the repository root, serving.py, on sys.path)

from caption_model import Caption
from caption_model.heatmap import cell_centres, cell_geometry, upsample
from caption_model.training.metrics import pointing_records

# (grid (gh, gw), image (W, H), model input S): square and non-square images, up- and downscaled, several grids
CASES = [((8, 8), (480, 300), 128), ((7, 7), (640, 480), 224), ((14, 14), (333, 517), 224),
         ((4, 6), (200, 97), 128), ((8, 8), (4032, 3024), 128), ((16, 16), (160, 480), 256)]


def peak_of(heat: np.ndarray) -> tuple[float, float]:
    """Centre (x, y) of the brightest pixel of an (H, W) map, in continuous pixel coordinates."""
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return x + 0.5, y + 0.5


def test_cell_centres_follow_the_encoder_receptive_fields():
    xs, ys = cell_centres((2, 4), (200, 100), 128)  # stride 32 across, 64 down, of a 128 px input
    np.testing.assert_allclose(xs, [(32 * j + 0.5) * 200 / 128 for j in range(4)])
    np.testing.assert_allclose(ys, [(64 * i + 0.5) * 100 / 128 for i in range(2)])
    # half a cell left of / above the middle of each cell's slice, less half an input pixel
    np.testing.assert_allclose((np.arange(4) + 0.5) * 200 / 4 - xs, 25 - 0.5 * 200 / 128)


@pytest.mark.parametrize("grid, size, side", CASES)
def test_a_map_peaked_at_one_cell_upsamples_to_a_peak_at_its_receptive_field_centre(grid, size, side):
    (gh, gw), (width, height) = grid, size
    xs, ys = cell_centres(grid, size, side)
    rng = np.random.default_rng(gh * gw)
    cells = [(0, 0), (gh - 1, gw - 1), (gh // 2, 1), *zip(rng.integers(1, gh - 1, 3), rng.integers(1, gw - 1, 3))]
    for i, j in cells:
        attention = np.full(grid, 0.01, dtype=np.float32)
        attention[i, j] = 1.0
        heat = upsample(attention, size, side)
        assert heat.shape == (height, width) and heat.dtype == np.float32
        x, y = peak_of(heat)
        # interior cells: the pixel holding the centre; edge cells keep their value out to the image border,
        # where the first brightest pixel may sit up to half an input pixel (0.5 W / S) from the centre
        tol_x = 1.0 if 0 < j < gw - 1 else 1.0 + 0.5 * width / side
        tol_y = 1.0 if 0 < i < gh - 1 else 1.0 + 0.5 * height / side
        assert abs(x - xs[j]) <= tol_x and abs(y - ys[i]) <= tol_y, ((i, j), (x, y), (xs[j], ys[i]))
        if 0 < j < gw - 1 and width / gw >= 8:  # the old geometry (middle of the 1/gw slice) is half a cell away
            assert abs(x - (j + 0.5) * width / gw) > width / gw / 4


def test_upsample_is_smooth_bounded_and_peaks_between_equal_neighbours():
    attention = np.zeros((8, 8), dtype=np.float32)
    attention[3, 2] = attention[3, 3] = 1.0
    heat = upsample(attention, (480, 300), 128)
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    xs, ys = cell_centres((8, 8), (480, 300), 128)
    x, y = peak_of(heat)
    assert abs(x - (xs[2] + xs[3]) / 2) <= 1.0 and abs(y - ys[3]) <= 1.0  # not a flat plateau from the overshoot
    assert np.abs(np.diff(heat, axis=1)).max() < 0.1  # smooth: no cell edges
    np.testing.assert_array_equal(upsample(np.full((8, 8), 0.2), (50, 40)), np.zeros((40, 50), np.float32))


def test_the_metric_peak_is_the_overlay_peak():
    """pointing_records' offsets come from the brightest pixel of upsample, for any map, not from a cell centre."""
    rng = np.random.default_rng(1)
    size, side = (333, 251), 128
    for _ in range(5):
        attention = rng.random((2, 8, 8)).astype(np.float32) ** 4
        box = (100.0, 80.0, 160.0, 140.0)  # centre (130, 110); cells 41.6 x 31.4 px
        (colour, shape) = pointing_records(["red", "square"], attention, [("red", "square", box)], size, side)
        for record, heat in ((colour, upsample(attention[0], size, side)), (shape, upsample(attention[1], size, side))):
            x, y = peak_of(heat)
            assert record["dx"] == pytest.approx((x - 130) / (333 / 8))
            assert record["dy"] == pytest.approx((y - 110) / (251 / 8))
            inside = 100 - 333 / 16 <= x <= 160 + 333 / 16 and 80 - 251 / 16 <= y <= 140 + 251 / 16
            assert record["hit"] == inside


@pytest.mark.parametrize("grid, size, side", CASES[:4])
def test_the_caption_json_maps_the_peak_cell_to_the_pixel_the_overlay_lights(grid, size, side):
    import serving

    i, j = grid[0] - 2, 1
    attention = np.full((2, *grid), 1e-3, dtype=np.float32)
    attention[1, i, j] = 1.0
    attention /= attention.sum(axis=(1, 2), keepdims=True)
    result = Caption(text="a square", words=["a", "square"], attention=attention, score=-0.5)
    data = serving.caption_payload(result, grid, size, "some/model", side)
    geometry = data["cell_geometry"]
    assert geometry == cell_geometry(grid, size, side) and geometry["input_size"] == side
    # a program finds the word's peak cell in "attention" and draws it where the overlay is brightest
    maps = np.asarray(data["attention"])
    row, col = np.unravel_index(int(np.argmax(maps[1])), grid)
    x, y = geometry["cell_centres_x"][col], geometry["cell_centres_y"][row]
    px, py = peak_of(upsample(maps[1], tuple(data["image_size"]), side))
    assert abs(x - px) <= 1.0 and abs(y - py) <= 1.0, ((x, y), (px, py))
    stride_y, stride_x = geometry["stride"]
    assert x == pytest.approx((stride_x * col + 0.5) * size[0] / side, abs=1e-3)  # the formula it states
    assert y == pytest.approx((stride_y * row + 0.5) * size[1] / side, abs=1e-3)

"""benchmarks/grounding.py: its map readings are what they say, and its targets are issue 12's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from caption_model.heatmap import phrase_maps
from conftest import build_tiny_captioner, shapes_images

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def grounding():
    sys.path.insert(0, str(BENCHMARKS))  # grounding.py imports shapes_cli from beside itself
    spec = importlib.util.spec_from_file_location("grounding_benchmark", BENCHMARKS / "grounding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _maps(model, images, beams):
    return model.caption_batch(images, num_beams=beams, max_length=8)


@pytest.mark.parametrize("beams", [1, 3])
def test_map_readings_change_the_maps_not_the_captions(grounding, beams):
    images = shapes_images(3, seed=5)
    served = _maps(build_tiny_captioner(seed=1), images, beams)
    raw_model = build_tiny_captioner(seed=1, grounded_heatmaps=False)
    raw = _maps(raw_model, images, beams)
    assert any(not np.allclose(a.attention, b.attention, atol=1e-4) for a, b in zip(raw, served))  # not vacuous
    for name, expected in (("model", served), ("raw", raw)):
        model = build_tiny_captioner(seed=1)
        grounding.use_map(model, name)
        got = _maps(model, images, beams)
        assert [c.text for c in got] == [c.text for c in served]
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a.attention, b.attention, atol=1e-6)
    for name in ("evidence", "posterior"):
        model = build_tiny_captioner(seed=1)
        grounding.use_map(model, name)
        got = _maps(model, images, beams)
        assert [c.text for c in got] == [c.text for c in served]
        assert all(np.allclose(c.attention.sum(axis=(1, 2)), 1.0, atol=1e-5) for c in got)
        assert any(not np.allclose(a.attention, b.attention, atol=1e-4) for a, b in zip(got, served))


def test_targets_are_the_issues(grounding):
    passing = {"object_f1": 0.98, "pointing_accuracy": 0.95, "pointing_colour": 0.93, "pointing_shape": 0.93,
               "offset_colour_x": 0.25, "offset_colour_y": -0.25, "offset_shape_x": 0.0, "offset_shape_y": 0.1}
    assert all(grounding.check(passing).values())
    for key, bad in (("object_f1", 0.979), ("pointing_accuracy", 0.949), ("pointing_shape", 0.92),
                     ("offset_colour_y", -0.26), ("offset_shape_x", 0.3)):
        met = grounding.check({**passing, key: bad})
        assert not met[key] and sum(not ok for ok in met.values()) == 1


def test_phrase_reading_runs_through_the_benchmark_and_keeps_the_captions(grounding, tiny_checkpoint):
    from caption_model import ImageCaptioner

    images = shapes_images(3, seed=5)
    served = _maps(ImageCaptioner.from_pretrained(tiny_checkpoint), images, 1)  # trained: some maps are peaked
    assert ImageCaptioner.from_pretrained(tiny_checkpoint).config.heatmap_reading == "word"
    model = ImageCaptioner.from_pretrained(tiny_checkpoint)
    grounding.use_map(model, "phrase")
    got = _maps(model, images, 1)
    assert [c.text for c in got] == [c.text for c in served]
    for a, b in zip(got, served):  # the phrase reading of the served word maps (heatmap.phrase_maps)
        np.testing.assert_allclose(a.attention, phrase_maps(b.attention), atol=1e-6)
    assert any(not np.allclose(a.attention, b.attention, atol=1e-4) for a, b in zip(got, served))
    model.config.heatmap_reading = "phrase"  # a phrase model read back as single words
    grounding.use_map(model, "word")
    for a, b in zip(_maps(model, images, 1), served):
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-6)

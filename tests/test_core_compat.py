"""Checkpoints written before the redesign still load and caption identically.

tests/fixtures/checkpoint_before_redesign was written by the code of main before the package was reorganised
(a tiny model briefly trained), together with the captions that code gave for the four images beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption_model import Caption, ImageCaptioner

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_before_redesign"


@pytest.fixture(scope="module")
def old_checkpoint():
    model = ImageCaptioner.from_pretrained(str(FIXTURE))
    images = [Image.open(FIXTURE / f"image_{i}.png").convert("RGB") for i in range(4)]
    return model, images, json.loads((FIXTURE / "expected_captions.json").read_text())


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_checkpoint_from_before_the_redesign_captions_identically(old_checkpoint, num_beams):
    model, images, expected = old_checkpoint
    # the decoding of that time: no repetition control (it came later, and its default changes some captions)
    captions = model.caption_batch(images, num_beams=num_beams, max_length=12, no_repeat_ngram_size=0)
    assert all(isinstance(c, Caption) for c in captions)
    for caption, before in zip(captions, expected[f"beams_{num_beams}"]):
        assert caption.text == before["text"]
        assert caption.score == pytest.approx(before["score"], abs=1e-4)
        np.testing.assert_allclose(caption.attention, np.asarray(before["attention"]), atol=1e-4)


def test_saving_it_again_records_the_library_version(old_checkpoint, tmp_path):
    import caption_model

    model, images, expected = old_checkpoint
    assert "caption_model_version" not in json.loads((FIXTURE / "config.json").read_text())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["caption_model_version"] == caption_model.__version__
    again = ImageCaptioner.from_pretrained(str(tmp_path))
    caption = again.caption(images[1], num_beams=1, max_length=12, no_repeat_ngram_size=0)
    assert caption.text == expected["beams_1"][1]["text"]

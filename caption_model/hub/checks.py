"""Before publishing: is the checkpoint folder complete, and does it load and caption an image?

    check_checkpoint(dir) -> names of the files to upload (CheckpointError naming what is missing)
    smoke_test(dir)       -> the Caption of one drawn test image (CheckpointError if loading or captioning fails)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from caption_model.config import CONFIG_FILE, METRICS_FILE, SAMPLES_FILE, TRAINING_CONFIG_FILE, WEIGHTS_FILE

if TYPE_CHECKING:
    from caption_model import Caption

REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_VOCAB = ("tokenizer.json", "vocab.txt")  # at least one of these holds the vocabulary
TOKENIZER_EXTRA = ("special_tokens_map.json", "added_tokens.json")
OPTIONAL_FILES = (TRAINING_CONFIG_FILE, METRICS_FILE, SAMPLES_FILE)


class CheckpointError(ValueError):
    """The checkpoint folder is incomplete or does not load/caption."""


def check_checkpoint(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Return the checkpoint files to upload (relative names); raise CheckpointError naming any missing file."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist (expected the folder train.py wrote)")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not (folder / TOKENIZER_CONFIG).is_file():
        missing.append(f"tokenizer files ({TOKENIZER_CONFIG})")
    if not any((folder / name).is_file() for name in TOKENIZER_VOCAB):
        missing.append(f"tokenizer files ({' or '.join(TOKENIZER_VOCAB)})")
    if missing:
        raise CheckpointError(
            f"checkpoint {folder} is incomplete: missing {', '.join(missing)}. Expected the output of "
            f"ImageCaptioner.save_pretrained ({CONFIG_FILE}, {WEIGHTS_FILE}, tokenizer files)."
        )
    for name in (CONFIG_FILE, TRAINING_CONFIG_FILE, METRICS_FILE):  # the card reads them
        try:
            if (folder / name).is_file():
                json.loads((folder / name).read_text())
        except ValueError as e:
            raise CheckpointError(f"checkpoint {folder}: {name} is not valid JSON ({e})") from e
    names = [*REQUIRED_FILES, TOKENIZER_CONFIG, *TOKENIZER_VOCAB, *TOKENIZER_EXTRA, *OPTIONAL_FILES]
    return [name for name in dict.fromkeys(names) if (folder / name).is_file()]


def draw_test_image():
    """A red circle on white, drawn here so the check needs no training code (the Space bundle has none)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 224), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((62, 62, 162, 162), fill=(220, 40, 40))
    return image


def smoke_test(checkpoint_dir: str | os.PathLike) -> Caption:
    """Load the checkpoint and caption one drawn image -> Caption; CheckpointError if either step fails."""
    from caption_model import ImageCaptioner

    try:
        model = ImageCaptioner.from_pretrained(str(checkpoint_dir))
    except Exception as e:  # noqa: BLE001 - any load failure means "do not publish this"
        raise CheckpointError(f"checkpoint {checkpoint_dir} does not load with ImageCaptioner.from_pretrained: "
                              f"{type(e).__name__}: {e}") from e
    if model.tokenizer is None:
        raise CheckpointError(f"checkpoint {checkpoint_dir} loaded without a tokenizer: missing tokenizer files")
    try:
        return model.caption(draw_test_image(), num_beams=1, max_length=20)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {checkpoint_dir} loads but fails to caption an image: "
                              f"{type(e).__name__}: {e}") from e

"""Training: data sources, the collator, feature cache, checkpoints, metrics and the training loop.

    from caption_model.training import train_preset
    best = train_preset("shapes", output_dir="checkpoints/shapes", epochs=2)   # -> checkpoints/shapes/best

`train.py` is the command line over `TrainConfig` / `train`. Importing this package is cheap: the loop (and with it
`datasets` and `accelerate`) loads when training starts.
"""

from __future__ import annotations

import os
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from caption_model.training.config import PRESETS, TrainConfig
    from caption_model.training.loop import train

__all__ = ["PRESETS", "TrainConfig", "preset_plan", "train", "train_preset"]
_HOMES = {"PRESETS": "config", "TrainConfig": "config", "train": "loop"}


def train_preset(preset: str = "shapes", output_dir: str | os.PathLike = "checkpoints/shapes", **overrides) -> Path:
    """Train a preset with some TrainConfig fields overridden (`epochs=2`); returns the best/ checkpoint folder."""
    from caption_model.training.config import preset_config
    from caption_model.training.loop import train

    return train(preset_config(preset, **overrides, output_dir=os.fspath(output_dir))) / "best"


def preset_plan(preset: str = "shapes", **overrides) -> str:
    """What training a preset does, in words for a waiting user: "750 steps (6 epochs of 4000 images, batch 32)"."""
    import math

    from caption_model.training.config import preset_config

    cfg = preset_config(preset, **overrides)
    images = cfg.shapes_sizes[0] if cfg.source == "shapes" else None
    if images is None:
        return f"{cfg.epochs} epochs"
    steps = cfg.max_steps or math.ceil(images / cfg.batch_size) * cfg.epochs
    return f"{steps} steps ({cfg.epochs} epochs of {images} synthetic images, batch {cfg.batch_size})"


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)

"""Pictures of a training run: the loss curve (with the validation score) and sample heatmaps."""

from __future__ import annotations

import json
from pathlib import Path

from caption_model import ImageCaptioner
from caption_model.heatmap import overlay
from caption_model.processing import load_image
from caption_model.training.feature_cache import decode_image


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(log_path: Path, out_path: Path) -> None:
    """Training loss per logged step from log.jsonl, validation object F1 / CIDEr on a second axis."""
    plt = _pyplot()
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["loss"] for r in records if "loss" in r], label="train loss")
    val = [(r["step"], v) for r in records for k, v in r.items()
           if k in ("val_object_f1", "val_CIDEr") and v is not None]
    if val:
        twin = ax.twinx()
        twin.plot(*zip(*val), "o-", color="tab:orange", label="validation")
        twin.set_ylabel("validation " + ("object F1" if any("val_object_f1" in r for r in records) else "CIDEr"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def plot_samples(model: ImageCaptioner, dataset, out_path: Path, count: int = 4, max_words: int = 7) -> None:
    """A few images of `dataset`: each image with its caption, then the heatmap of each word."""
    plt = _pyplot()
    rows = dataset.select(range(min(count, len(dataset))))
    images = [load_image(decode_image(image)) for image in rows["image"]]
    captions = model.caption_batch(images, num_beams=3)
    fig, axes = plt.subplots(len(images), max_words + 1, figsize=(2 * (max_words + 1), 2.2 * len(images)),
                             squeeze=False)
    for row, (image, caption) in enumerate(zip(images, captions)):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(caption.text, fontsize=7, loc="left")
        for col in range(max_words):
            ax = axes[row, col + 1]
            if col < len(caption.words):
                ax.imshow(overlay(image, caption.attention[col], alpha=0.6, input_size=model.config.image_size))
                ax.set_title(caption.words[col], fontsize=9)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)

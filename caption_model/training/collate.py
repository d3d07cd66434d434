"""Rows of a caption dataset -> the keyword arguments of `ImageCaptioner.forward`: the one collate path.

Shapes: I images in the batch, N captions (N = I with one caption per image), T tokens (longest caption + 2).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
import torch

from caption_model.config import IGNORE_INDEX
from caption_model.processing import preprocess
from caption_model.training.feature_cache import FeatureCache, decode_image


class CaptionCollator:
    """Batch rows {image, captions, image_id} for the model.

    tokenizer: a BERT tokenizer; each caption becomes `[CLS] caption [SEP]`, cut at `max_length` tokens and padded
      to the longest in the batch.
    prepare_images: dataset images -> (I, ...) tensor passed as `image_input`: pixels (I, 3, S, S) from
      `model.preprocess`, or frozen-encoder features (I, C', h', w') from a `FeatureCache`.
    all_captions=False: one caption per image, drawn at random. The draw depends only on (seed, epoch, the batch's
      image ids), so a resumed run draws the captions the uninterrupted run drew; `set_epoch` gives a new draw.
    all_captions=True: every caption of every image, each image prepared once; `image_index` (N,) says which
      image each caption reads.
    """

    def __init__(self, tokenizer, max_length: int, prepare_images: Callable[[list], torch.Tensor],
                 image_input: str = "pixel_values", all_captions: bool = False, seed: int = 0):
        if max_length < 3:
            raise ValueError(f"expected max_length >= 3 ([CLS], a word, [SEP]), got {max_length}")
        if image_input not in ("pixel_values", "image_features"):
            raise ValueError(f"expected image_input 'pixel_values' or 'image_features', got {image_input!r}")
        self.tokenizer, self.max_length, self.prepare_images = tokenizer, max_length, prepare_images
        self.image_input, self.all_captions, self.seed, self.epoch = image_input, all_captions, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pick(self, rows: Sequence[dict]) -> tuple[list[str], list[int]]:
        """Captions to encode and, for each, the row of its image."""
        if self.all_captions:
            pairs = [(caption, i) for i, row in enumerate(rows) for caption in row["captions"]]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        ids = "\x00".join(str(row["image_id"]) for row in rows)
        rng = random.Random(zlib.crc32(f"{self.seed * 1_000_003 + self.epoch}:{ids}".encode()))
        return [rng.choice(row["captions"]) for row in rows], list(range(len(rows)))

    def _tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        cls_id = getattr(self.tokenizer, "cls_token_id", None)
        if cls_id is not None and int(enc["input_ids"][0, 0]) != cls_id:
            raise ValueError(f"expected the tokenizer to start captions with [CLS] (id {cls_id}), "
                             f"got id {int(enc['input_ids'][0, 0])}; is add_special_tokens off?")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)  # (N, T)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("expected at least one row to collate, got an empty batch")
        for row in rows:
            if not row.get("captions"):
                raise ValueError(f"expected a non-empty `captions` list, got {row.get('captions')!r} "
                                 f"for image {row.get('image_id')!r}")
        captions, owner = self._pick(rows)
        batch = {self.image_input: self.prepare_images([row["image"] for row in rows]),  # (I, ...)
                 **self._tokenize(captions)}
        if self.all_captions:
            batch["image_index"] = torch.tensor(owner, dtype=torch.long)  # (N,)
        return batch


def collator_for(model, cache: FeatureCache | None = None, *, max_length: int, seed: int = 0,
                 all_captions: bool = False) -> CaptionCollator:
    """The collator of a training run: cached frozen features when a `cache` is given, else pixels. Batches are
    CPU tensors (DataLoader workers can make them); Accelerate moves them to the model's device."""
    if cache is not None:
        return CaptionCollator(model.tokenizer, max_length, cache.get, "image_features", all_captions, seed)

    def pixels(images: list) -> torch.Tensor:
        return preprocess([decode_image(image) for image in images], model.config)  # (I, 3, S, S)
    return CaptionCollator(model.tokenizer, max_length, pixels, "pixel_values", all_captions, seed)

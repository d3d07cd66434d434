"""Images in for caption-images: decode and preprocess the next batches on worker threads while the model captions
the current one, so the model does not wait for JPEG decoding and resizing (PIL releases the GIL while it works;
threads, unlike DataLoader worker processes, hand over PIL images and tensors without copying them)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from ..config import CaptionerConfig
from ..processing import load_image, original_size, preprocess


@dataclass
class LoadedImage:
    file: str
    size: tuple[int, int] | None = None  # (W, H) of the upright image file
    pixels: torch.Tensor | None = None  # (3, S, S) normalised, what the encoder reads
    image: Image.Image | None = None  # the decoded image, kept only when a heatmap strip needs it
    error: str | None = None  # why the file could not be read (then size, pixels and image are None)


def load_for_captioning(file: str, config: CaptionerConfig, decode_side: int, keep_image: bool) -> LoadedImage:
    """Decode `file` (no smaller than `decode_side`: JPEGs in draft mode) and preprocess it, as
    ImageCaptioner.caption_batch would; a file that is not a readable image gives LoadedImage.error."""
    try:
        image = load_image(file, min_side=decode_side)
    except ValueError as error:  # processing.ImageLoadError: not an image, truncated, decompression bomb
        return LoadedImage(file, error=str(error))
    pixels = preprocess([image], config)[0]  # (3, S, S)
    return LoadedImage(file, original_size(image), pixels, image if keep_image else None)


def load_ahead(batches: Sequence[Sequence[str]], load: Callable[[str], LoadedImage], threads: int,
               ahead: int = 2) -> Iterator[list[LoadedImage]]:
    """Each batch's LoadedImages, in order, loaded by `threads` worker threads up to `ahead` batches before the
    one being used."""
    pending: deque[list[Future]] = deque()
    upcoming = iter(batches)
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="caption-images-load")

    def submit_next() -> None:
        batch = next(upcoming, None)
        if batch is not None:
            pending.append([pool.submit(load, file) for file in batch])

    try:
        for _ in range(ahead + 1):
            submit_next()
        while pending:
            futures = pending.popleft()
            submit_next()
            yield [future.result() for future in futures]
    finally:  # also when the caller stops early (an interrupt): drop the batches not started
        pool.shutdown(wait=True, cancel_futures=True)

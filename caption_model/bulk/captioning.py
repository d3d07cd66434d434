"""One process's share of caption-images: its batches, loaded ahead on threads (loading.py), captioned in one
batched forward each (bf16 autocast on a GPU), written as rows to the process's part file, heatmap strips beside.
A file that cannot be read or captioned is named through `report` and left out."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch

from ..captioner import ImageCaptioner
from ..generation import Caption, generate
from ..heatmap import cell_geometry
from .loading import LoadedImage, load_ahead, load_for_captioning
from .shards import PartFile
from .strips import STRIP_HEIGHT, heatmap_name, heatmap_strip


@dataclass
class Decoding:
    """What caption-images asks of each caption (its command-line options)."""

    num_beams: int
    max_length: int
    no_repeat_ngram_size: int
    repetition_penalty: float


@dataclass
class Captioning:
    """What every batch of a run needs: the model, the decoding options and where the strips go."""

    captioner: ImageCaptioner
    decoding: Decoding
    model: str  # the model's name in each row (--model)
    heatmaps: str | None  # the folder of heatmap strips, or None for none
    autocast: bool  # bf16 autocast (a CUDA GPU with --precision auto)


@dataclass
class ShareResult:
    captioned: int  # rows written
    skipped: list[str]  # files named through `report` and left out
    waited: float = 0.0  # seconds the model waited for the loader threads' next batch


def mixed_precision(run: Captioning) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA GPU (fp16 on one without bf16) when asked; else nothing (the CPU's fast mode is
    int8, chosen when the model was loaded)."""
    if not run.autocast:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def caption_pixels(run: Captioning, pixels: torch.Tensor) -> list[Caption | Exception]:
    """(B, 3, S, S) pixels -> one Caption per image in one batched forward; if that fails, one forward per image,
    so a bad image costs only itself."""
    captioner, decoding = run.captioner, run.decoding
    options = dict(num_beams=decoding.num_beams, max_length=decoding.max_length,
                   no_repeat_ngram_size=decoding.no_repeat_ngram_size,
                   repetition_penalty=decoding.repetition_penalty, kernels=captioner.step_kernels)
    pixels = pixels.to(captioner.device, non_blocking=True)
    with mixed_precision(run):
        try:
            return generate(captioner, pixels, **options)
        except Exception:
            results: list[Caption | Exception] = []
            for index in range(len(pixels)):
                try:
                    results += generate(captioner, pixels[index:index + 1], **options)
                except Exception as error:
                    results.append(error)
            return results


def make_row(loaded: LoadedImage, caption: Caption, grid: tuple[int, int], model: str, heatmap: str | None,
             input_size: int) -> dict:
    return {"file": loaded.file, "caption": caption.text, "words": list(caption.words),
            "score": round(caption.score, 6),
            "grid_size": [int(grid[0]), int(grid[1])],  # [gh, gw]: rows and columns of the attention grid
            "image_size": list(loaded.size),  # [width, height] of the (EXIF-upright) image file
            "heatmap": heatmap, "model": model,
            # JSON Lines only: cell (i, j)'s receptive-field centre is (cell_centres_x[j], cell_centres_y[i]) px
            "cell_geometry": cell_geometry(grid, loaded.size, input_size)}


def caption_batch(run: Captioning, batch: list[LoadedImage], report: Callable[[str], None]
                  ) -> tuple[list[dict], list[str]]:
    """One loaded batch -> (its rows, the files skipped); `report(line)` names each skipped file and why."""
    skipped = []
    for loaded in batch:
        if loaded.error is not None:
            skipped.append(loaded.file)
            report(f"skipped {loaded.file}: {loaded.error}")
    readable = [loaded for loaded in batch if loaded.error is None]
    if not readable:
        return [], skipped
    results = caption_pixels(run, torch.stack([loaded.pixels for loaded in readable]))  # (B, 3, S, S) in
    rows = []
    config = run.captioner.config
    for loaded, result in zip(readable, results):
        if isinstance(result, Exception):
            skipped.append(loaded.file)
            report(f"skipped {loaded.file}: could not caption it ({type(result).__name__}: {result})")
            continue
        strip = None
        if run.heatmaps:
            strip = os.path.join(run.heatmaps, heatmap_name(loaded.file))
            heatmap_strip(loaded.image, result.words, result.attention, input_size=config.image_size).save(strip)
        rows.append(make_row(loaded, result, config.grid_size, run.model, strip, config.image_size))
    return rows, skipped


def caption_share(run: Captioning, batches: Sequence[list[str]], part: PartFile, loader_threads: int,
                  report: Callable[[str], None], progress: Callable[[int], None]) -> ShareResult:
    """Caption `batches` (this process's share) into `part`, one flushed line per batch; `progress(n)` after each
    batch of n files; `report(line)` names each file skipped."""
    config = run.captioner.config
    decode_side = max(config.image_size, STRIP_HEIGHT if run.heatmaps else 0)  # decode no larger than needed
    load = partial(load_for_captioning, config=config, decode_side=decode_side, keep_image=bool(run.heatmaps))
    result = ShareResult(0, [])
    loaded = load_ahead(batches, load, loader_threads)
    while True:
        started = time.perf_counter()
        batch = next(loaded, None)
        result.waited += time.perf_counter() - started
        if batch is None:
            break
        rows, skipped = caption_batch(run, batch, report)
        part.write(rows)
        result.captioned += len(rows)
        result.skipped += skipped
        progress(len(batch))
    return result

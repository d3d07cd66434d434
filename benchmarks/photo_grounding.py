"""Plain ("word") or "phrase" heatmaps on photo-like images? Issue 26, item 6: the shapes generator's objects over
textured, noisy, JPEG-compressed backgrounds, a small model trained on them, and both readings of its maps judged
like benchmarks/grounding.py (the brightest pixel of the overlay's map inside the named object's box grown by half
a cell), each without and with per-word offsets (training/heatmap_offsets.py, measured on the validation images:
what the shapes preset serves is "phrase+offsets", what the Flickr presets serve is "word").

    python benchmarks/photo_grounding.py --work /tmp/photo-grounding                   # make data, train, judge
    python benchmarks/photo_grounding.py --work /tmp/photo-grounding --epochs 2 --train-images 2000
    python benchmarks/photo_grounding.py --work /tmp/photo-grounding --checkpoint CKPT  # judge a trained model

Data: `shapes.generate_shapes_example` images whose plain background is replaced by a photo-like texture (a smooth
random colour field, a few soft dark/light patches, sensor noise over the whole image, JPEG quality 85), written as
parquet splits train/validation/test with their 5 captions, then the `shapes` preset trained on them through
`train_preset` (`--source` that folder; validation picks best/ by CIDEr, as for Flickr8k). Judged on `--images`
fresh textured images (their own seed) with greedy decoding: the captions are the same for every reading, only the
map of each word changes. Prints the CPU, one table and one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from PIL import Image  # noqa: E402

from caption_model.training.shapes import generate_shapes_example  # noqa: E402

SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}
JUDGE_SEED = 20261126  # a stream no split draws from
READINGS = {"word": ("word", False), "phrase": ("phrase", False), "word+offsets": ("word", True),
            "phrase+offsets": ("phrase", True)}  # name -> (heatmap_reading, with per-word offsets)


def photo_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(H, W, 3) float: a smooth random colour field (cells of ~60 px) with soft patches, like an out-of-focus
    scene; channels kept in 60..200 so the shapes' saturated colours stay the brightest of their kind."""
    cells = rng.uniform(60, 200, (max(2, height // 60), max(2, width // 60), 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(cells).resize((width, height), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(2, 6))):  # soft light or dark patches (shadows, sky, grass)
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, min(width, height) / 2)
        weight = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius ** 2))[..., None]
        field += weight * rng.uniform(-50, 50)
    return field


def photo_like(example, rng: np.random.Generator) -> Image.Image:
    """The example's image with its uniform background replaced by `photo_background`, noise over everything,
    JPEG-compressed (the objects keep their exact boxes)."""
    pixels = np.asarray(example.image, dtype=np.float32)
    height, width = pixels.shape[:2]
    background = np.all(pixels >= 225, axis=-1, keepdims=True)  # the spec's background; no shape colour is that light
    pixels = np.where(background, photo_background(rng, width, height), pixels)
    pixels += rng.standard_normal(pixels.shape).astype(np.float32) * float(rng.uniform(4, 12))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=85)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def photo_shapes(count: int, seed: int) -> tuple[list, list, list]:
    """`count` photo-like shapes images: (images, objects, captions)."""
    rng = np.random.default_rng(seed)
    images, objects, captions = [], [], []
    for _ in range(count):
        example = generate_shapes_example(rng)
        images.append(photo_like(example, rng))
        objects.append(example.objects)
        captions.append(example.captions)
    return images, objects, captions


def make_data(folder: Path, sizes: dict[str, int]) -> Path:
    """Parquet splits train/validation/test (image, captions) in `folder`, reused when already there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = folder / "COMPLETE"
    if done.is_file() and json.loads(done.read_text()) == sizes:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("captions", pa.list_(pa.string()))])
    for split, size in sizes.items():
        images, _, captions = photo_shapes(size, SPLIT_SEEDS[split])
        encoded = []
        for index, image in enumerate(images):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=95)
            encoded.append({"bytes": buffer.getvalue(), "path": f"{split}-{index:05d}.jpg"})
        pq.write_table(pa.table({"image": encoded, "captions": captions}, schema=schema),
                       folder / f"{split}-00000-of-00001.parquet")
    done.write_text(json.dumps(sizes))
    return folder


def judge(checkpoint: str, count: int, offset_images: list, batch_size: int = 25) -> dict:
    """Object F1 and pointing of each of READINGS on `count` fresh photo-like images, greedy; offsets measured on
    `offset_images` (no boxes)."""
    from grounding import use_map

    from caption_model import ImageCaptioner
    from caption_model.training.heatmap_offsets import measure_heatmap_offsets
    from caption_model.training.metrics import shapes_scores

    images, objects, _ = photo_shapes(count, JUDGE_SEED)
    sizes = [image.size for image in images]
    results = {}
    for name, (reading, with_offsets) in READINGS.items():
        model = ImageCaptioner.from_pretrained(checkpoint)
        use_map(model, reading)  # also drops any stored offsets
        if with_offsets:
            model.config.heatmap_offsets = measure_heatmap_offsets(model, offset_images)
        captions, began = [], time.perf_counter()
        for start in range(0, count, batch_size):
            captions += model.caption_batch(images[start:start + batch_size], num_beams=1, max_length=30)
        results[name] = {**shapes_scores(captions, objects, sizes, model.config.image_size),
                         "seconds": time.perf_counter() - began}
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the data and the checkpoint")
    parser.add_argument("--checkpoint", help="judge this checkpoint instead of training one")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--eval-images", type=int, default=100, help="validation and test images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=300, help="fresh images judged")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    import torch

    from caption_model.cpu.features import describe_cpu

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint, train_seconds = args.checkpoint, None
    if checkpoint is None:
        from caption_model.training import train_preset

        data = make_data(args.work / "data", {"train": args.train_images, "validation": args.eval_images,
                                              "test": args.eval_images})
        began = time.perf_counter()
        checkpoint = str(train_preset("shapes", args.work / "run", source=str(data), epochs=args.epochs,
                                      heatmap_offset_images=0, num_threads=args.threads))
        train_seconds = time.perf_counter() - began
    offset_images = photo_shapes(args.eval_images, SPLIT_SEEDS["validation"])[0]  # the validation split's images
    results = judge(checkpoint, args.images, offset_images)
    print(f"# CPU: {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# {checkpoint}: {args.images} photo-like images (seed {JUDGE_SEED}), greedy; trained in "
          f"{train_seconds or 0:.0f} s")
    print(f"{'reading':14s} {'object F1':>9s} {'pointing':>9s} {'colour':>7s} {'shape':>7s} "
          f"{'colour dx,dy':>14s} {'shape dx,dy':>14s} {'words':>6s}")
    for reading, s in results.items():
        print(f"{reading:14s} {s['object_f1']:9.3f} {s['pointing_accuracy']:9.3f} {s['pointing_colour']:7.3f} "
              f"{s['pointing_shape']:7.3f} {s['offset_colour_x']:+6.2f},{s['offset_colour_y']:+6.2f} "
              f"{s['offset_shape_x']:+6.2f},{s['offset_shape_y']:+6.2f} {s['pointed_words']:6d}")
    summary = {"benchmark": "photo_grounding", "checkpoint": checkpoint, "images": args.images,
               "train_seconds": train_seconds, "cpu": describe_cpu(), "threads": torch.get_num_threads(),
               "readings": {k: {m: float(v) for m, v in s.items()} for k, s in results.items()}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

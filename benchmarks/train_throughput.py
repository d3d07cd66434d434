"""Training throughput of the Flickr8k presets on Flickr8k-shaped data, random backbones (no download).

    python benchmarks/train_throughput.py                                   # both presets, 8091 images
    python benchmarks/train_throughput.py --preset flickr8k --mixed-precision bf16 --device cuda
    python benchmarks/train_throughput.py --images 64 --steps 3 --batch-size 8 --num-threads 1 --device cpu

Makes (once, in --data-dir) a parquet dataset with the `jxie/flickr8k` schema (image struct + caption_0..caption_4):
photo-like JPEGs in Flickr8k's sizes (about 500 x 375, landscape and portrait), five grammar captions each, one
split that train.py cuts by its seeded split like any one-split source. Then, per preset, the real training loop
(`caption_model.training.loop`: setup, train_epoch, evaluate) with a random ResNet-50 and a random BERT of the
preset's size with the bert-base-uncased vocabulary size (30522): one warm-up step, `--steps` steps that fill the
feature cache, the same steps again from the cache (each step with the preset's captions per image: all 5 for the
Flickr8k presets), then a validation pass with the preset's beam (3).
Prints images/s of each phase, peak device memory, the projected wall time of all the preset's Flickr8k epochs
(early stopping may end a real run sooner; 6000 training images, validation on 1000 every epoch, validation + test
at the end; scoring timed once on
--score-captions captions) and one JSON line. Captioning is timed at its slowest: every caption runs to the
preset's `eval_max_length` (30 tokens), where a trained model stops at its end token. Accelerate's loader reads one
batch ahead, so a phase of N steps prepares N + 1 batches.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLICKR8K_IMAGES = 8091  # the Kaggle / original Flickr8k folder
FLICKR8K_SPLITS = (6000, 1000, 1000)  # jxie/flickr8k train/validation/test: what the projection is for
BERT_VOCAB_SIZE = 30522  # bert-base-uncased, also the MiniLM of flickr8k-small
# (width, height) of Flickr8k photos, roughly in their proportions; the rest are drawn in 300..500 px.
SIZE_MIX = [((500, 375), 0.40), ((500, 333), 0.22), ((375, 500), 0.12), ((333, 500), 0.10), ((500, 500), 0.04)]
# The preset's decoder as a random BERT of the same size.
DECODERS = {
    "flickr8k": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "flickr8k-small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
# --tiny (the test suite): a model that trains in seconds on a CPU.
TINY = dict(image_size=64, encoder_stage="layer2", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, attention_dim=32, eval_max_length=8)

SUBJECTS = ["a dog", "a black dog", "a brown dog", "two dogs", "a man", "a woman", "a young boy", "a little girl",
            "two children", "a group of people", "a man in a red shirt", "a woman in a blue jacket"]
ACTIONS = ["runs", "is running", "jumps", "is jumping", "walks", "sits", "stands", "is playing", "is climbing",
           "rides a bike"]
PLACES = ["through the grass", "on the beach", "in the snow", "in the water", "on a rock", "near a fountain",
          "down the street", "in front of a building", "across a field", "on a wooden bridge"]
EXTRAS = ["", "", "with a ball", "with a stick in its mouth", "while people watch", "at the park"]


# --------------------------------------------------------------------------------------------------------------- data
def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn from SIZE_MIX, else a free size in 300..500 px."""
    pick = rng.random()
    for size, share in SIZE_MIX:
        if pick < share:
            return size
        pick -= share
    return int(rng.integers(300, 501)), int(rng.integers(300, 501))


def photo_jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A photo-like JPEG: smooth colour field, a few filled ellipses, sensor-like noise (file sizes vary)."""
    from PIL import Image, ImageDraw

    width, height = size
    field = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2)))
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * float(rng.uniform(10, 30))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def caption(rng: np.random.Generator) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(ACTIONS), rng.choice(PLACES), rng.choice(EXTRAS)]
    return " ".join(w for w in words if w).capitalize() + " ."


def make_dataset(folder: Path, images: int, seed: int = 0, shard: int = 500) -> Path:
    """Parquet shards with the jxie/flickr8k schema in `folder` (reused when already complete); returns it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    done = folder / "COMPLETE"
    if done.is_file() and done.read_text() == f"{images} {seed}":
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), *[(f"caption_{k}", pa.string()) for k in range(5)]])
    rng = np.random.default_rng(seed)
    shards = math.ceil(images / shard)
    with tqdm(total=images, desc="making Flickr8k-shaped images", unit="img") as progress:
        for index in range(shards):
            names = [f"{i:05d}.jpg" for i in range(index * shard, min(images, (index + 1) * shard))]
            rows = {"image": [{"bytes": photo_jpeg(rng, image_size(rng)), "path": n} for n in names],
                    **{f"caption_{k}": [caption(rng) for _ in names] for k in range(5)}}
            pq.write_table(pa.table(rows, schema=schema), folder / f"train-{index:05d}-of-{shards:05d}.parquet")
            progress.update(len(names))
    done.write_text(f"{images} {seed}")
    return folder


def make_tokenizer(folder: Path) -> Path:
    """A BERT WordPiece tokenizer with bert-base-uncased's vocabulary size: the caption words + unused slots."""
    from transformers import BertTokenizerFast

    words = sorted({w for text in SUBJECTS + ACTIONS + PLACES + EXTRAS for w in text.split()} | {"."})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab += [f"[unused{i}]" for i in range(BERT_VOCAB_SIZE - len(vocab))]
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------------------------------------------------- measuring
def synchronize(device) -> None:
    """Wait for queued GPU work, so wall-clock time covers it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_gib(device) -> tuple[float, str]:
    """(GiB, what was measured): CUDA peak allocated, MPS driver memory, else the process's peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max_memory_allocated"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30, "mps driver_allocated_memory"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"  # KiB on Linux


def timed_steps(run, progress, steps: int) -> tuple[float, int]:
    """Run `steps` more optimizer steps of the current epoch with the real loop; (seconds, images)."""
    from caption_model.training.loop import train_epoch

    seen = run.images_seen
    run.total_steps = run.state["step"] + steps
    synchronize(run.accelerator.device)
    started = time.perf_counter()
    train_epoch(run, progress)
    synchronize(run.accelerator.device)
    return time.perf_counter() - started, run.images_seen - seen


def train_phases(run, steps: int) -> dict:
    """Warm-up step, `steps` cache-filling steps, then the same batches again from the cache."""
    from tqdm.auto import tqdm

    batches = math.ceil(len(run.data["train"]) / run.cfg.batch_size)
    if batches < steps + 1:
        raise ValueError(f"expected at least {steps + 1} batches in an epoch (a warm-up step + --steps), got "
                         f"{batches} ({len(run.data['train'])} training images, batch {run.cfg.batch_size}); "
                         f"use more --images, fewer --steps or a smaller --batch-size")
    progress = tqdm(disable=True)
    timed_steps(run, progress, 1)  # warm-up: kernels, allocator, first cache writes
    misses = run.cache.misses
    fill_s, fill_images = timed_steps(run, progress, steps)
    fill_misses, hits = run.cache.misses - misses, run.cache.hits
    run.state.update(step=1, batches_done=1)  # back to the same batches: every image is now cached
    cached_s, cached_images = timed_steps(run, progress, steps)
    return {"fill_images_per_s": fill_images / fill_s, "cached_images_per_s": cached_images / cached_s,
            "fill_cache_misses": fill_misses, "cached_cache_hits": run.cache.hits - hits,
            "cached_cache_misses": run.cache.misses - misses - fill_misses}


def eval_phase(run, images: int) -> dict:
    """Captioning as validation runs it (batched beam search) on the first `images` validation images, every
    caption decoded to `eval_max_length` tokens (no end token: a random model would stop at random)."""
    from caption_model.training.evaluation import caption_dataset

    subset = run.data["validation"].select(range(min(images, len(run.data["validation"]))))
    config = run.raw_model.config
    eos, config.eos_token_id = config.eos_token_id, -1  # an id no step produces
    try:
        synchronize(run.accelerator.device)
        started = time.perf_counter()
        captions = caption_dataset(run.raw_model, subset, run.cfg, desc="benchmark eval")
        synchronize(run.accelerator.device)
        seconds = time.perf_counter() - started
    finally:
        config.eos_token_id = eos
    return {"eval_images": len(subset), "eval_images_per_s": len(subset) / seconds,
            "eval_words_per_caption": float(np.mean([len(c.words) for c in captions]))}


def scoring_seconds(count: int, seed: int = 0) -> float:
    """Seconds to score `count` captions against 5 references each with the COCO-caption metrics (as validation
    does; Java's PTB tokenizer and METEOR when Java is here). It depends on the text only, not on the model."""
    from caption_model.training.metrics import coco_caption_scores

    rng = np.random.default_rng(seed)
    predictions = {str(i): caption(rng) for i in range(count)}
    references = {key: [caption(rng) for _ in range(5)] for key in predictions}
    started = time.perf_counter()
    coco_caption_scores(predictions, references)
    return time.perf_counter() - started


def projected_seconds(cfg, rates: dict, scoring_s: float) -> float:
    """Wall time of the preset on Flickr8k: the cache-filling epoch, the cached ones, every validation (captioning
    + `scoring_s` each), validation and test of best/ at the end."""
    train, validation, test = FLICKR8K_SPLITS
    validations = math.ceil(cfg.epochs / cfg.eval_every_epochs) + 1
    training = train / rates["fill_images_per_s"] + (cfg.epochs - 1) * train / rates["cached_images_per_s"]
    return training + (validations * validation + test) / rates["eval_images_per_s"] + (validations + 1) * scoring_s


# --------------------------------------------------------------------------------------------------------------- runs
def bench_config(args, preset: str, data: Path, tokenizer: Path, work: Path):
    from caption_model.training.config import PRESETS, preset_config

    sizes = TINY if args.tiny else DECODERS[preset]
    return preset_config(
        preset, source=str(data), decoder=None, encoder_weights=None, tokenizer=str(tokenizer), **sizes,
        batch_size=args.batch_size or PRESETS[preset]["batch_size"], device=args.device,
        mixed_precision=args.mixed_precision, num_threads=args.num_threads, num_workers=args.num_workers,
        feature_cache=True, cache_dir=str(work / preset / "feature_cache"), output_dir=str(work / preset),
        log_every_steps=10**9, seed=args.seed)


def bench_preset(args, preset: str, data: Path, tokenizer: Path, work: Path, scoring_s: float) -> dict:
    import torch

    from caption_model.training.loop import setup

    cfg = bench_config(args, preset, data, tokenizer, work)
    started = time.perf_counter()
    run = setup(cfg)  # data check, model, fresh feature cache, optimizer, Accelerate
    setup_s = time.perf_counter() - started
    device = run.accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = {"batch_size": cfg.batch_size, "train_images": len(run.data["train"]), "setup_s": setup_s,
              **train_phases(run, args.steps), **eval_phase(run, args.eval_images)}
    result["peak_memory_gib"], result["memory_measured"] = peak_memory_gib(device)
    result["epochs"] = cfg.epochs
    result["projected_epochs_s"] = projected_seconds(cfg, result, scoring_s)
    run.accelerator.end_training()
    return result


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def report(preset: str, r: dict) -> None:
    print(f"{preset}: batch {r['batch_size']}, {r['train_images']} training images")
    print(f"  cache-filling steps: {r['fill_images_per_s']:8.1f} images/s")
    print(f"  cached steps:        {r['cached_images_per_s']:8.1f} images/s")
    print(f"  evaluation, beam 3:  {r['eval_images_per_s']:8.1f} images/s ({r['eval_images']} images, captioning)")
    print(f"  peak memory:         {r['peak_memory_gib']:8.2f} GiB ({r['memory_measured']})")
    print(f"  {r['epochs']} Flickr8k epochs:  {r['projected_epochs_s'] / 60:8.1f} min projected "
          f"(data check and model setup here: {r['setup_s']:.0f} s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["flickr8k", "flickr8k-small", "all"], default="all")
    parser.add_argument("--images", type=int, default=FLICKR8K_IMAGES, help="images in the generated dataset")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per phase")
    parser.add_argument("--batch-size", type=int, help="default: the preset's (64)")
    parser.add_argument("--eval-images", type=int, default=256, help="validation images captioned")
    parser.add_argument("--score-captions", type=int, default=FLICKR8K_SPLITS[1],
                        help="captions scored once for the scoring time of a validation pass (0: none)")
    parser.add_argument("--device", choices=["cuda", "mps", "cpu"], help="default: the GPU when there is one")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--num-threads", type=int, help="torch CPU threads")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--data-dir", type=Path, help="where the dataset is made (default: a cache folder)")
    parser.add_argument("--tiny", action="store_true", help="tiny model sizes (the test suite)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.steps < 1 or args.images < 3:
        raise SystemExit(f"expected --steps >= 1 and --images >= 3, got {args.steps} and {args.images}")
    data = args.data_dir or Path.home() / ".cache" / "caption_model" / f"flickr8k-shaped-{args.images}-{args.seed}"
    presets = ["flickr8k", "flickr8k-small"] if args.preset == "all" else [args.preset]
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as temp:
        work = Path(temp)
        # A throwaway datasets cache (set before `datasets` is imported): no copy of the data in the user's.
        os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
        from caption_model.training.evaluation import pick_device

        make_dataset(data, args.images, args.seed)
        device = pick_device(args.device)
        tokenizer = make_tokenizer(work / "tokenizer")
        scoring_s = scoring_seconds(args.score_captions, args.seed) if args.score_captions else 0.0
        results = {}
        for preset in presets:
            results[preset] = bench_preset(args, preset, data, tokenizer, work, scoring_s)
            gc.collect()  # the previous preset's model and optimizer go before the next one is built
    summary = {"benchmark": "train_throughput", "device": device.type, "device_name": device_name(device),
               "mixed_precision": args.mixed_precision, "images": args.images, "steps": args.steps,
               "num_threads": args.num_threads, "tiny": args.tiny, "score_captions": args.score_captions,
               "scoring_s": scoring_s, "presets": results}
    print(f"scoring {args.score_captions} captions (COCO metrics): {scoring_s:.1f} s")
    for preset, result in results.items():
        report(preset, result)
    print(json.dumps(summary))
    return summary

if __name__ == "__main__":
    main()

"""What a large photo costs over a small one on every path that takes images, measured side by side.

    python benchmarks/large_inputs.py [CHECKPOINT]     # default checkpoints/shapes/best, 10 interleaved runs
    python benchmarks/latency.py                       # also prints this section, for the full-size fast model

A 4032 x 3024 JPEG (12 MP, a phone photo, EXIF-rotated) against a 500 x 375 one (a Flickr8k photo), greedy
captions of the same model through: the Python API (`caption(path)`), the app's caption step
(`CaptionService.caption(path, display_side=...)`: decode once for the display copy, caption from it), /predict's
service call (uploaded bytes) and the batch CLI's loading + `caption_batch`. Each figure is the median over
interleaved runs; the overhead is big - small. Target (issue: large inputs): <= 20 ms on every path.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from timing import interleaved  # noqa: E402  (benchmarks/, beside this script)

SIZES = {"small": (500, 375), "12MP": (4032, 3024)}


def photo_jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    """A photo-like JPEG (smooth blobs and noise, quality 90) of `size`, stored landscape with EXIF orientation 6."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def path_calls(captioner, files: dict[str, Path]) -> dict:
    """(path name, input size) -> a function captioning that input greedily through that path."""
    import app  # the UI's display size: what the app's caption step decodes for
    import serving
    from caption_model.processing import load_image

    service = serving.CaptionService(captioner, "benchmark")
    side = captioner.config.image_size
    calls = {}
    for size, file in files.items():
        data = file.read_bytes()
        calls["Python API caption(path)", size] = lambda f=file: captioner.caption(f, num_beams=1, max_length=16)
        calls["app caption step", size] = lambda f=file: service.caption(str(f), 1, 16,
                                                                         display_side=app.DISPLAY_MAX_SIDE)
        calls["/predict (bytes)", size] = lambda d=data: service.caption(d, 1, 16)
        calls["batch CLI load + caption_batch", size] = lambda f=file: captioner.caption_batch(
            [load_image(f, min_side=side)], num_beams=1, max_length=16)
    return calls


def large_input_overhead(captioner, runs: int = 10, seed: int = 0) -> dict:
    """Median ms per path for the small and the 12 MP JPEG, and the difference; prints a table."""
    with tempfile.TemporaryDirectory() as folder:
        files = {}
        for name, size in SIZES.items():
            files[name] = Path(folder) / f"{name}.jpg"
            files[name].write_bytes(photo_jpeg(size))
        calls = path_calls(captioner, files)
        seconds = interleaved(calls, runs, warmup=1, seed=seed)  # median per (path, size)
    result = {}
    print(f"{'path':34s} {'500x375 ms':>10s} {'12 MP ms':>9s} {'overhead ms':>11s}")
    for path in dict.fromkeys(p for p, _ in calls):
        small, big = (1000 * seconds[path, s] for s in SIZES)
        result[path] = {"small_ms": small, "large_ms": big, "overhead_ms": big - small}
        print(f"{path:34s} {small:10.1f} {big:9.1f} {big - small:+11.1f} {'ok' if big - small <= 20 else 'OVER 20 ms'}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default=str(ROOT / "checkpoints" / "shapes" / "best"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    from caption_model import ImageCaptioner
    from caption_model.cpu.features import describe_cpu

    if args.threads:
        torch.set_num_threads(args.threads)
    captioner = ImageCaptioner.from_pretrained(args.checkpoint).quantize_int8()
    print(f"# CPU: {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.checkpoint}, fast mode {captioner.fast_mode}")
    print(json.dumps(large_input_overhead(captioner, runs=args.runs)))


if __name__ == "__main__":
    main()

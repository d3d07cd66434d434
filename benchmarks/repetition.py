"""Repetition control before/after: does the default (no_repeat_ngram_size=3) stop loops without hurting captions?

    python benchmarks/repetition.py checkpoints/shapes/best                  # 200 shapes images, greedy + beam 3
    python benchmarks/repetition.py checkpoints/shapes/best --penalty 1.2    # also a repetition penalty

For each decoding mode, on generated shapes images: object F1 and pointing accuracy with the controls off and
with each setting, the fraction of captions identical to the uncontrolled ones, and how many captions repeat a
3-gram of tokens (a loop). Then the captions of the photos in examples/ (a shapes model loops on them) off and on.
Pass (exit 0) when the default setting loses <= 0.005 object F1 in every mode. Prints a table and one JSON line.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from caption_model import ImageCaptioner  # noqa: E402
from shapes_cli import shapes_checkpoint_parser, shapes_test_set  # noqa: E402  (benchmarks/, beside this script)
from caption_model.generation import DEFAULT_NO_REPEAT_NGRAM_SIZE, DEFAULT_REPETITION_PENALTY  # noqa: E402
from caption_model.training.metrics import shapes_scores  # noqa: E402

MAX_F1_LOSS = 0.005
OFF = (0, 1.0)
DEFAULT = (DEFAULT_NO_REPEAT_NGRAM_SIZE, DEFAULT_REPETITION_PENALTY)


def loops(token_ids: list[int], n: int = 3) -> bool:
    """True when some n-gram of tokens occurs twice."""
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    return len(grams) != len(set(grams))


def caption_all(model, images, beams: int, max_length: int, batch_size: int, setting: tuple[int, float]):
    captions, start = [], time.perf_counter()
    for i in range(0, len(images), batch_size):
        captions += model.caption_batch(images[i:i + batch_size], num_beams=beams, max_length=max_length,
                                        no_repeat_ngram_size=setting[0], repetition_penalty=setting[1])
    return captions, time.perf_counter() - start


def label(setting: tuple[int, float]) -> str:
    return "off" if setting == OFF else f"ngram={setting[0]} penalty={setting[1]:g}"


def shapes_table(model, args, settings) -> tuple[dict, bool]:
    images, objects, sizes = shapes_test_set(args.images, args.seed)
    result, ok = {}, True
    print(f"{'mode':8s} {'setting':24s} {'F1':>7s} {'dF1':>7s} {'point':>7s} {'identical':>9s} {'loops':>6s} "
          f"{'words':>6s} {'s':>6s}")
    for beams in [int(b) for b in args.beams.split(",") if b]:
        name = "greedy" if beams == 1 else f"beam {beams}"
        base = None
        for setting in settings:
            caps, seconds = caption_all(model, images, beams, args.max_length, args.batch_size, setting)
            scores = shapes_scores(caps, objects, sizes, model.config.image_size)
            base = base or (caps, scores)
            row = {"object_f1": scores["object_f1"], "object_f1_change": scores["object_f1"] - base[1]["object_f1"],
                   "pointing_accuracy": scores["pointing_accuracy"],
                   "identical_to_off": float(np.mean([a.text == b.text for a, b in zip(caps, base[0])])),
                   "captions_with_a_repeated_3gram": int(sum(loops(c.token_ids) for c in caps)),
                   "mean_words": float(np.mean([len(c.words) for c in caps])), "seconds": seconds}
            if setting == DEFAULT:
                ok &= row["object_f1_change"] >= -MAX_F1_LOSS
            result.setdefault(name, {})[label(setting)] = row
            print(f"{name:8s} {label(setting):24s} {row['object_f1']:7.4f} {row['object_f1_change']:+7.4f} "
                  f"{row['pointing_accuracy']:7.4f} {row['identical_to_off']:9.3f} "
                  f"{row['captions_with_a_repeated_3gram']:6d} {row['mean_words']:6.2f} {seconds:6.1f}")
    return result, ok


def photos_table(model, args, settings) -> dict:
    result = {}
    for path in sorted(glob.glob(str(ROOT / "examples" / "*.jpg"))):
        for beams in [int(b) for b in args.beams.split(",") if b]:
            for setting in settings:
                text = model.caption(path, num_beams=beams, max_length=args.max_length,
                                     no_repeat_ngram_size=setting[0], repetition_penalty=setting[1]).text
                key = f"{Path(path).name} beams={beams} {label(setting)}"
                result[key] = text
                print(f"{key:48s} {text}")
    return result


def main() -> int:
    parser = shapes_checkpoint_parser(__doc__, batch_size=16)
    parser.add_argument("--penalty", type=float, action="append", default=[],
                        help="also measure no_repeat_ngram_size=3 with this repetition_penalty (repeatable)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ImageCaptioner.from_pretrained(args.checkpoint)
    settings = [OFF, DEFAULT] + [(DEFAULT_NO_REPEAT_NGRAM_SIZE, p) for p in args.penalty]
    print(f"# {args.checkpoint}, {args.images} shapes images (seed {args.seed}), CPU {cpu_name()}, "
          f"{torch.get_num_threads()} threads")
    shapes, ok = shapes_table(model, args, settings)
    photos = photos_table(model, args, settings)
    print(f"pass: the default loses <= {MAX_F1_LOSS} object F1 in every mode -> {'PASS' if ok else 'FAIL'}")
    print(json.dumps({"checkpoint": str(args.checkpoint), "images": args.images, "cpu": cpu_name(),
                      "shapes": shapes, "photos": photos, "ok": ok}))
    return 0 if ok else 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())

"""Does the int8 decoder keep the captions? fp32 vs int8 on generated shapes images.

    python benchmarks/int8_quality.py checkpoints/shapes/best                 # 200 images, greedy + beam 3
    python benchmarks/int8_quality.py checkpoints/shapes/best --images 50 --beams 1

Pass (exit 0) when, for every decoding mode, >= 95% of the int8 captions equal the fp32 captions and the shapes
object F1 moves by <= 0.01 (pointing accuracy is reported too). Prints a table and one JSON line.
"""

from __future__ import annotations

import json
import os
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
from caption_model.training.metrics import shapes_scores  # noqa: E402
from caption_model.training.shapes import generate_shapes_example  # noqa: E402
from shapes_cli import shapes_checkpoint_parser  # noqa: E402  (benchmarks/, beside this script)

MIN_AGREEMENT = 0.95
MAX_F1_CHANGE = 0.01


def caption_all(model, images, beams: int, max_length: int, batch_size: int):
    captions, start = [], time.perf_counter()
    for i in range(0, len(images), batch_size):
        captions += model.caption_batch(images[i:i + batch_size], num_beams=beams, max_length=max_length)
    return captions, time.perf_counter() - start


def main() -> int:
    parser = shapes_checkpoint_parser(
        __doc__, batch_size=1, batch_help="images per caption_batch call (1 = what the app does; int8 activation "
        "scales are per batch, so larger batches can change int8 captions slightly)")
    parser.add_argument("--encoder-bf16", choices=["auto", "true", "false"], default="false",
                        help="also the opt-in bf16 ResNet (quantize_int8(encoder_bf16=...)): false (default, what "
                             "the app serves), true, or auto (CPUs with AMX / AVX512-BF16)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    fp32 = ImageCaptioner.from_pretrained(args.checkpoint)
    encoder_bf16 = {"auto": None, "true": True, "false": False}[args.encoder_bf16]
    int8 = ImageCaptioner.from_pretrained(args.checkpoint).quantize_int8(encoder_bf16=encoder_bf16)
    print(f"# fast mode: int8 decoder, ResNet in {str(int8.encoder.dtype).removeprefix('torch.')}")
    rng = np.random.default_rng(args.seed)
    examples = [generate_shapes_example(rng) for _ in range(args.images)]
    images = [ex.image for ex in examples]
    objects = [ex.objects for ex in examples]
    sizes = [ex.image.size for ex in examples]

    result = {"checkpoint": str(args.checkpoint), "images": args.images, "modes": {}}
    ok = True
    print(f"{'mode':8s} {'identical':>9s} {'F1 fp32':>8s} {'F1 int8':>8s} {'dF1':>7s} {'point fp32':>10s} "
          f"{'point int8':>10s} {'s fp32':>7s} {'s int8':>7s}")
    for beams in [int(b) for b in args.beams.split(",") if b]:
        a, ta = caption_all(fp32, images, beams, args.max_length, args.batch_size)
        b, tb = caption_all(int8, images, beams, args.max_length, args.batch_size)
        same = float(np.mean([x.text == y.text for x, y in zip(a, b)]))
        sa, sb = shapes_scores(a, objects, sizes), shapes_scores(b, objects, sizes)
        d_f1 = sb["object_f1"] - sa["object_f1"]
        mode_ok = same >= MIN_AGREEMENT and abs(d_f1) <= MAX_F1_CHANGE
        ok &= mode_ok
        name = "greedy" if beams == 1 else f"beam {beams}"
        print(f"{name:8s} {same:9.3f} {sa['object_f1']:8.4f} {sb['object_f1']:8.4f} {d_f1:+7.4f} "
              f"{sa['pointing_accuracy']:10.4f} {sb['pointing_accuracy']:10.4f} {ta:7.1f} {tb:7.1f} "
              f"{'ok' if mode_ok else 'FAIL'}")
        result["modes"][name] = {
            "identical_fraction": same, "object_f1_fp32": sa["object_f1"], "object_f1_int8": sb["object_f1"],
            "object_f1_change": d_f1, "pointing_fp32": sa["pointing_accuracy"], "pointing_int8": sb["pointing_accuracy"],
            "seconds_fp32": ta, "seconds_int8": tb, "ok": mode_ok,
            "differing_examples": [(x.text, y.text) for x, y in zip(a, b) if x.text != y.text][:5],
        }
    result["ok"] = ok
    print(f"pass: >= {MIN_AGREEMENT:.0%} identical captions and |dF1| <= {MAX_F1_CHANGE} in every mode -> "
          f"{'PASS' if ok else 'FAIL'}")
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

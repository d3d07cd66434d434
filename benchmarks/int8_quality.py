"""Does the int8 decoder keep the captions? fp32 vs int8 on generated shapes images.

    python benchmarks/int8_quality.py checkpoints/shapes/best                 # 500 images, greedy + beam 3
    python benchmarks/int8_quality.py checkpoints/shapes/best --images 50 --beams 1
    python benchmarks/int8_quality.py checkpoints/shapes/best --mode int8-avx2  # force a fast mode
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
        python benchmarks/int8_quality.py checkpoints/shapes/best              # an AVX2-only CPU, emulated

The fast mode is the one the app would choose on this CPU (--mode to force one). Pass (exit 0) when, for every
decoding mode, >= 98% of the fast mode's captions equal the fp32 captions and the shapes object F1 moves by
<= 0.005 (pointing accuracy and relation flips, "left of" <-> "right of" and "above" <-> "below", are reported
too). Prints the CPU, a table and one JSON line.
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
from caption_model.cpu.fast_mode import REQUESTS  # noqa: E402
from caption_model.cpu.features import describe_cpu  # noqa: E402
from caption_model.training.metrics import shapes_scores  # noqa: E402
from shapes_cli import shapes_checkpoint_parser, shapes_test_set  # noqa: E402  (benchmarks/, beside this script)

MIN_AGREEMENT = 0.98
MAX_F1_CHANGE = 0.005
RELATIONS = ("to the left of", "to the right of", "above", "below")


def relations(text: str) -> list[str]:
    """The relation phrases of a shapes caption, in order."""
    found = []
    for i in range(len(text)):
        found += [r for r in RELATIONS if text.startswith(r, i) and (i == 0 or text[i - 1] == " ")]
    return found


def relation_flips(a: str, b: str) -> int:
    """How many relation phrases differ between two captions that name the same relations' places."""
    ra, rb = relations(a), relations(b)
    return sum(x != y for x, y in zip(ra, rb)) if len(ra) == len(rb) else 0


def caption_all(model, images, beams: int, max_length: int, batch_size: int):
    captions, start = [], time.perf_counter()
    for i in range(0, len(images), batch_size):
        captions += model.caption_batch(images[i:i + batch_size], num_beams=beams, max_length=max_length)
    return captions, time.perf_counter() - start


def main() -> int:
    parser = shapes_checkpoint_parser(
        __doc__, batch_size=1, batch_help="images per caption_batch call (1 = what the app does; int8 activation "
        "scales are per batch, so larger batches can change int8 captions slightly)")
    parser.add_argument("--mode", choices=[r for r in REQUESTS if r != "fp32"], default="auto",
                        help="the fast mode to test (auto: what the app chooses on this CPU)")
    parser.add_argument("--encoder-bf16", choices=["auto", "true", "false"], default="false",
                        help="also the opt-in bf16 ResNet (quantize_int8(encoder_bf16=...)): false (default, what "
                             "the app serves), true, or auto (CPUs with AMX / AVX512-BF16)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    fp32 = ImageCaptioner.from_pretrained(args.checkpoint)
    encoder_bf16 = {"auto": None, "true": True, "false": False}[args.encoder_bf16]
    int8 = ImageCaptioner.from_pretrained(args.checkpoint).quantize_int8(encoder_bf16=encoder_bf16, mode=args.mode)
    cpu = describe_cpu()
    print(f"# CPU: {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# fast mode: {int8.fast_mode} ({int8.fast_mode_reason}), ResNet in "
          f"{str(int8.encoder.dtype).removeprefix('torch.')}; {args.images} images, seed {args.seed}")
    images, objects, sizes = shapes_test_set(args.images, args.seed)

    result = {"checkpoint": str(args.checkpoint), "images": args.images, "seed": args.seed, "cpu": cpu,
              "fast_mode": int8.fast_mode, "modes": {}}
    ok = True
    print(f"{'mode':8s} {'identical':>9s} {'F1 fp32':>8s} {'F1 int8':>8s} {'dF1':>7s} {'point fp32':>10s} "
          f"{'point fast':>10s} {'rel flips':>9s} {'s fp32':>7s} {'s fast':>7s}")
    for beams in [int(b) for b in args.beams.split(",") if b]:
        a, ta = caption_all(fp32, images, beams, args.max_length, args.batch_size)
        b, tb = caption_all(int8, images, beams, args.max_length, args.batch_size)
        same = float(np.mean([x.text == y.text for x, y in zip(a, b)]))
        side = fp32.config.image_size  # the cell geometry of the maps
        sa, sb = shapes_scores(a, objects, sizes, side), shapes_scores(b, objects, sizes, side)
        d_f1 = sb["object_f1"] - sa["object_f1"]
        flips = sum(relation_flips(x.text, y.text) for x, y in zip(a, b))
        mode_ok = same >= MIN_AGREEMENT and abs(d_f1) <= MAX_F1_CHANGE
        ok &= mode_ok
        name = "greedy" if beams == 1 else f"beam {beams}"
        print(f"{name:8s} {same:9.3f} {sa['object_f1']:8.4f} {sb['object_f1']:8.4f} {d_f1:+7.4f} "
              f"{sa['pointing_accuracy']:10.4f} {sb['pointing_accuracy']:10.4f} {flips:9d} {ta:7.1f} {tb:7.1f} "
              f"{'ok' if mode_ok else 'FAIL'}")
        result["modes"][name] = {
            "identical_fraction": same, "object_f1_fp32": sa["object_f1"], "object_f1_int8": sb["object_f1"],
            "object_f1_change": d_f1, "pointing_fp32": sa["pointing_accuracy"], "pointing_int8": sb["pointing_accuracy"],
            "relation_flips": flips, "seconds_fp32": ta, "seconds_int8": tb, "ok": mode_ok,
            "differing_examples": [(x.text, y.text) for x, y in zip(a, b) if x.text != y.text][:5],
        }
    result["ok"] = ok
    print(f"pass: >= {MIN_AGREEMENT:.0%} identical captions and |dF1| <= {MAX_F1_CHANGE} in every mode -> "
          f"{'PASS' if ok else 'FAIL'}")
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

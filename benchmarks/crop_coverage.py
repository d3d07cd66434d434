"""How much of a Flickr8k-sized photo the ResNet weights' own preprocessing (resize 232, centre crop 224) drops,
against the squash to 224 x 224 that `processing.preprocess` does. Geometry only, no model: the issue-26 question
"crop like the weights, or squash so every part reaches the grid?".

    python benchmarks/crop_coverage.py                  # the Flickr8k size mix of train_throughput.py
    python benchmarks/crop_coverage.py --objects 20000  # more sampled objects

Per photo size: the share of the image area the crop keeps, the share of each side's pixels it drops, and the share
of objects whose centre the crop drops. Objects are the shapes spec's boxes (side 0.2-0.35 x the shorter side, placed
uniformly, fully inside the photo), a stand-in for where captioned things sit: photographers centre their subject
more often than uniform placement does, so the last column is an upper bound for subjects and about right for the
second thing a caption names ("... near a fountain"). Squashing keeps everything and changes the aspect ratio by
the photo's own (4:3 -> 1:1 compresses the long side by 25%).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SIZE_MIX  # noqa: E402  (beside this script: the Flickr8k size mix)

RESIZE, CROP = 232, 224  # torchvision ResNet50_Weights.IMAGENET1K_V2.transforms(): resize_size 232, crop_size 224


def crop_window(width: int, height: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in photo pixels of what resize-shorter-side-to-232 + centre-crop-224 keeps."""
    scale = RESIZE / min(width, height)
    keep_w, keep_h = CROP / scale, CROP / scale  # the crop's size in photo pixels
    x0, y0 = (width - keep_w) / 2, (height - keep_h) / 2
    return x0, y0, x0 + keep_w, y0 + keep_h


def dropped_centres(width: int, height: int, objects: int, rng: np.random.Generator) -> float:
    """Share of uniformly placed shapes-spec boxes whose centre lies outside the crop window."""
    side = rng.uniform(0.2, 0.35, objects) * min(width, height)
    cx = rng.uniform(0, 1, objects) * (width - side) + side / 2
    cy = rng.uniform(0, 1, objects) * (height - side) + side / 2
    x0, y0, x1, y1 = crop_window(width, height)
    return float(np.mean((cx < x0) | (cx > x1) | (cy < y0) | (cy > y1)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=10000, help="sampled objects per photo size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = []
    print("photo (W x H)  share  crop keeps area  drops per side (x, y)  object centres dropped")
    for (width, height), share in SIZE_MIX:
        x0, y0, x1, y1 = crop_window(width, height)
        row = {"size": [width, height], "share": share, "area_kept": (x1 - x0) * (y1 - y0) / (width * height),
               "dropped_x_each_side": x0 / width, "dropped_y_each_side": y0 / height,
               "object_centres_dropped": dropped_centres(width, height, args.objects, rng)}
        rows.append(row)
        print(f"{width:>5} x {height:<5}  {share:5.2f}  {row['area_kept']:15.1%}  "
              f"{row['dropped_x_each_side']:10.1%}, {row['dropped_y_each_side']:5.1%}  "
              f"{row['object_centres_dropped']:22.1%}")
    total = sum(r["share"] for r in rows)
    summary = {"benchmark": "crop_coverage", "rows": rows,
               "mean_area_kept": sum(r["share"] * r["area_kept"] for r in rows) / total,
               "mean_object_centres_dropped": sum(r["share"] * r["object_centres_dropped"] for r in rows) / total}
    print(f"weighted over these sizes ({total:.0%} of the mix): the crop keeps {summary['mean_area_kept']:.1%} of "
          f"the area and drops the centre of {summary['mean_object_centres_dropped']:.1%} of the objects")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

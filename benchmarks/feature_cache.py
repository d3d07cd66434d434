"""Epoch time with and without the frozen-encoder feature cache, on the shapes preset, side by side in one run.

    python benchmarks/feature_cache.py --images 384

Prints one line per mode and a JSON line with the ratio (uncached epoch time / cached epoch time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from caption_model.feature_cache import FeatureCache  # noqa: E402


def run_epoch(model, loader, optimizer, cfg) -> float:
    """One training epoch; returns seconds."""
    model.train()
    started = time.perf_counter()
    for batch in loader:
        out = model(**batch, context_loss_weight=cfg.context_loss_weight)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384, help="training images in the epoch")
    parser.add_argument("--repeats", type=int, default=2, help="epochs timed per mode (median)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg, _ = train.parse_args(["--preset", "shapes", "--shapes-sizes", f"{args.images},1,1"])
    data, _ = train.load_data(cfg)
    model = train.build_model(cfg, [c for caps in data["train"]["captions"] for c in caps])
    optimizer = torch.optim.AdamW(train.parameter_groups(model, cfg))
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = FeatureCache(cache_dir, model)
        loaders = {
            "no cache": train.CaptionBatches(model, None, cfg.max_caption_words + 2, cfg.seed),
            "cache": train.CaptionBatches(model, cache, cfg.max_caption_words + 2, cfg.seed),
        }

        def loader(name):
            return torch.utils.data.DataLoader(data["train"], batch_size=cfg.batch_size, collate_fn=loaders[name])

        fill = run_epoch(model, loader("cache"), optimizer, cfg)  # first cached epoch computes and stores
        times = {"no cache": [], "cache": []}
        for _ in range(args.repeats):  # interleaved, so machine load hits both alike
            for name in times:
                times[name].append(run_epoch(model, loader(name), optimizer, cfg))
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    print(f"{'mode':<22}{'epoch s':>10}")
    print(f"{'cache (first, fills)':<22}{fill:>10.1f}")
    for name, value in median.items():
        print(f"{name:<22}{value:>10.1f}")
    print(json.dumps({"images": args.images, "epoch_s_no_cache": median["no cache"], "epoch_s_cache": median["cache"],
                      "epoch_s_cache_fill": fill, "speedup": median["no cache"] / median["cache"],
                      "cache_hits": cache.hits, "cache_misses": cache.misses}))


if __name__ == "__main__":
    main()

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

from caption_model.training.collate import collator_for  # noqa: E402
from caption_model.training.config import preset_config  # noqa: E402
from caption_model.training.data import load_training_data  # noqa: E402
from caption_model.training.feature_cache import FeatureCache  # noqa: E402
from caption_model.training.loop import build_model, parameter_groups  # noqa: E402


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
    cfg = preset_config("shapes", shapes_sizes=[args.images, 1, 1])
    data = load_training_data(cfg)
    model = build_model(cfg, [c for caps in data["train"]["captions"] for c in caps])
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg))
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = FeatureCache(cache_dir, model)
        loaders = {
            "no cache": collator_for(model, None, max_length=cfg.max_caption_words + 2, seed=cfg.seed),
            "cache": collator_for(model, cache, max_length=cfg.max_caption_words + 2, seed=cfg.seed),
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

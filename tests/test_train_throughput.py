"""benchmarks/train_throughput.py at a tiny size on the CPU: the real loop runs and the JSON line has its figures."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("fill_images_per_s", "cached_images_per_s", "eval_images_per_s", "peak_memory_gib",
           "projected_epochs_s", "setup_s")


def test_train_throughput_prints_positive_figures_as_one_json_line(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--images", "24", "--steps", "2",
               "--batch-size", "4", "--eval-images", "3", "--score-captions", "0", "--tiny", "--device", "cpu",
               "--num-threads", "1", "--preset", "flickr8k-small", "--data-dir", str(tmp_path / "data")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["device"], summary["steps"], summary["images"]) == ("cpu", 2, 24)
    result = summary["presets"]["flickr8k-small"]
    assert all(isinstance(result[k], float) and result[k] > 0 for k in FIGURES), result
    # The fill phase computed features for its 2 batches; the cached phase found every image in the cache.
    assert result["fill_cache_misses"] == 2 * 4 and result["cached_cache_misses"] == 0
    assert result["cached_cache_hits"] >= 2 * 4 and result["train_images"] == 18  # seeded split of 24: 18/3/3
    assert result["eval_words_per_caption"] == 8  # every caption decoded to --tiny's eval_max_length
    # The dataset has the jxie/flickr8k schema and photo-sized JPEGs.
    shards = sorted((tmp_path / "data").glob("*.parquet"))
    table = pq.read_table(shards[0])
    assert table.column_names == ["image", *[f"caption_{k}" for k in range(5)]]
    sizes = {Image.open(io.BytesIO(row["bytes"])).size for row in table.column("image").to_pylist()}
    assert all(300 <= min(s) and max(s) <= 500 for s in sizes) and (500, 375) in sizes

"""Training and captioning on a CUDA GPU (`pytest -m gpu`): mixed precision through Accelerate, the feature cache
filled from GPU tensors, evaluation and sample plots on the GPU. Skipped with the reason where there is no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from caption_model import ImageCaptioner
from caption_model.training import loop
from caption_model.training.feature_cache import FeatureCache
from conftest import build_tiny_captioner, shapes_images
from test_train import TINY, read_log, strict_json

DEVICE = "cuda"
ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tiny_training_with_mixed_precision_runs_on_the_gpu_end_to_end(tmp_path, monkeypatch, precision):
    seen = {"step": set(), "evaluate": set()}
    real_step, real_evaluate = loop._training_step, loop.evaluate

    def step(run, batch):
        seen["step"] |= {str(v.device.type) for v in batch.values()} | {run.raw_model.device.type}
        return real_step(run, batch)

    def evaluate(model, *args, **kwargs):
        seen["evaluate"].add(model.device.type)
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(loop, "_training_step", step)
    monkeypatch.setattr(loop, "evaluate", evaluate)
    output = tmp_path / "run"
    assert train.main(TINY + ["--output-dir", str(output), "--max-steps", "3", "--device", DEVICE,
                              "--mixed-precision", precision]) == 0
    assert seen == {"step": {DEVICE}, "evaluate": {DEVICE}}  # batches, model, validation and the final scores
    losses = [r["loss"] for r in read_log(output) if "loss" in r]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert "object_f1" in strict_json((output / "metrics.json").read_text())["test"]
    assert (output / "samples.png").stat().st_size > 1000
    assert json.loads((output / "best" / "training_config.json").read_text())["mixed_precision"] == precision


def test_captions_on_the_gpu_match_the_cpu(tiny_checkpoint):
    images = shapes_images(3, seed=11)
    on_cpu = ImageCaptioner.from_pretrained(tiny_checkpoint).caption_batch(images, num_beams=3)
    on_gpu = ImageCaptioner.from_pretrained(tiny_checkpoint).to(DEVICE).caption_batch(images, num_beams=3)
    assert [c.words for c in on_gpu] == [c.words for c in on_cpu]
    for a, b in zip(on_gpu, on_cpu):
        assert a.attention.shape == b.attention.shape and abs(a.score - b.score) < 1e-3


def test_feature_cache_fills_from_gpu_tensors(tmp_path):
    model = build_tiny_captioner(encoder_trainable=["layer2"])
    images = shapes_images(4, seed=3)
    expected = FeatureCache(tmp_path / "cpu", model).get(images)  # (4, C', h', w') computed on the CPU
    cache = FeatureCache(tmp_path / "gpu", model.to(DEVICE))
    features = cache.get(images)
    assert features.device.type == "cpu" and features.dtype == torch.float32  # the collator's batch, moved later
    assert torch.allclose(features, expected, atol=2e-2, rtol=2e-2)
    assert (cache.misses, cache.get(images).shape, cache.hits) == (4, expected.shape, 4)


def test_train_throughput_benchmark_on_the_gpu(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--images", "40", "--steps", "2",
               "--batch-size", "8", "--eval-images", "4", "--score-captions", "0", "--tiny", "--device", DEVICE,
               "--mixed-precision", "bf16", "--data-dir", str(tmp_path / "data")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["device"] == DEVICE
    for result in summary["presets"].values():
        assert result["memory_measured"] == "cuda max_memory_allocated" and result["peak_memory_gib"] > 0
        assert min(result["fill_images_per_s"], result["cached_images_per_s"], result["eval_images_per_s"]) > 0

"""Shared fixtures: tiny models and a tiny *trained* checkpoint (seconds of CPU, no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub (a test that does sets its own endpoint)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

from caption_model import CaptionerConfig, ImageCaptioner
from caption_model.training.shapes import generate_shapes_example, shapes_corpus
from caption_model.training.tokenization import train_wordpiece_tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_config(**overrides) -> CaptionerConfig:
    """A captioner small enough to train in seconds: 64 px input, ResNet up to layer2 (8x8 grid), 2-layer BERT."""
    values = dict(
        image_size=64, encoder_stage="layer2", encoder_trainable=["layer2"], encoder_weights=None,
        decoder_name=None, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=40, attention_dim=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        fusion_dropout=0.0,
    )
    values.update(overrides)
    return CaptionerConfig(**values)


def build_tiny_captioner(seed: int = 0, **overrides) -> ImageCaptioner:
    torch.manual_seed(seed)
    tokenizer = train_wordpiece_tokenizer(shapes_corpus(200, seed=123), vocab_size=200)
    return ImageCaptioner.from_backbones(tiny_config(**overrides), decoder=None, encoder_weights=None, tokenizer=tokenizer)


def train_tiny(model: ImageCaptioner, steps: int = 150, batch_size: int = 16, seed: int = 0) -> list[float]:
    """A few hundred teacher-forced steps on generated shapes images; returns the loss per step."""
    rng = np.random.default_rng(seed)
    examples = [generate_shapes_example(rng) for _ in range(96)]
    pixels = model.preprocess([ex.image for ex in examples])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        index = torch.randint(len(examples), (batch_size,), generator=generator)
        captions = [examples[i].captions[int(rng.integers(5))] for i in index]
        batch = model.tokenizer(captions, padding=True, return_tensors="pt")
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        out = model(pixels[index], batch.input_ids, batch.attention_mask, labels, context_loss_weight=0.5)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="session")
def tiny_trained_captioner() -> ImageCaptioner:
    model = build_tiny_captioner()
    model.training_losses = train_tiny(model)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_trained_captioner, tmp_path_factory) -> str:
    """A folder written by save_pretrained from a briefly trained tiny model (read-only: copy it to change it)."""
    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    tiny_trained_captioner.save_pretrained(folder)
    return str(folder)


def shapes_images(count: int, seed: int) -> list:
    """`count` generated shapes images from generator seed `seed`."""
    rng = np.random.default_rng(seed)
    return [generate_shapes_example(rng).image for _ in range(count)]


@pytest.fixture
def shapes_image():
    return generate_shapes_example(np.random.default_rng(7)).image


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (`pytest -m gpu`); skipped with the reason elsewhere")

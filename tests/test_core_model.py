"""Core model: config, teacher-forced forward, losses, causality, Hub-format save/load (issue 2, "Must show")."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from caption_model import CaptionerConfig, ImageCaptioner
from caption_model.training.shapes import generate_shapes_example

from conftest import build_tiny_captioner, tiny_config


def _batch(model, images, captions):
    pixels = model.preprocess(images)
    enc = model.tokenizer(captions, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return pixels, enc.input_ids, enc.attention_mask, labels


@pytest.fixture(scope="module")
def random_model():
    model = build_tiny_captioner(seed=1)
    model.eval()
    return model


@pytest.fixture(scope="module")
def examples():
    rng = np.random.default_rng(11)
    return [generate_shapes_example(rng) for _ in range(3)]


# --- config -----------------------------------------------------------------------------------------------
def test_config_round_trips_through_dict_and_json():
    cfg = tiny_config(encoder_stage="layer3", encoder_trainable=["layer3"], image_size=96, label_smoothing=0.05)
    again = CaptionerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert again.grid_size == (6, 6)


def test_config_rejects_unknown_fields_naming_them():
    values = CaptionerConfig().to_dict()
    values["hiden_size"] = 32
    with pytest.raises(ValueError, match="unknown CaptionerConfig fields.*hiden_size"):
        CaptionerConfig.from_dict(values)


def test_config_rejects_bad_stage_and_sizes_with_clear_messages():
    with pytest.raises(ValueError, match=r"encoder_stage must be one of .*'layer5'"):
        CaptionerConfig(encoder_stage="layer5")
    with pytest.raises(ValueError, match=r"encoder_trainable .*'layer4'"):
        CaptionerConfig(encoder_stage="layer3", encoder_trainable=["layer4"])
    with pytest.raises(ValueError, match=r"image_size must be a multiple of 32.*got 100"):
        CaptionerConfig(encoder_stage="layer4", image_size=100)
    with pytest.raises(ValueError, match=r"divisible by num_attention_heads"):
        CaptionerConfig(hidden_size=100, num_attention_heads=12)


def test_config_every_field_has_a_default():
    cfg = CaptionerConfig()
    assert cfg.grid_size == (7, 7) and cfg.encoder_channels == 2048


# --- forward ------------------------------------------------------------------------------------------------
def test_forward_returns_loss_logits_attention_with_shapes(random_model, examples):
    model = random_model
    pixels, ids, mask, labels = _batch(model, [ex.image for ex in examples], [ex.captions[0] for ex in examples])
    B, T = ids.shape
    P = model.grid_size[0] * model.grid_size[1]
    out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.loss is not None and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.logits.shape == (B, T, model.config.vocab_size)
    assert out.attention.shape == (B, T, P)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(B, T))
    assert set(out.losses) >= {"caption", "attention"}
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    no_labels = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    assert no_labels.loss is None
    torch.testing.assert_close(no_labels.logits, out.logits)


def test_forward_from_cached_frozen_features_matches_pixels(random_model, examples):
    model = random_model
    pixels, ids, mask, _ = _batch(model, [ex.image for ex in examples], [ex.captions[1] for ex in examples])
    feats = model.encoder.frozen_features(pixels)
    a = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    b = model(image_features=feats, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(a.logits, b.logits)
    with pytest.raises(ValueError, match="exactly one"):
        model(pixel_values=pixels, image_features=feats, input_ids=ids)


def test_loss_terms_are_label_smoothed_cross_entropy_and_attention_penalty(random_model, examples):
    model = random_model
    pixels, ids, mask, labels = _batch(model, [ex.image for ex in examples], [ex.captions[2] for ex in examples])
    out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
    V = out.logits.shape[-1]
    logits, targets = out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1)
    eps = model.config.label_smoothing
    assert eps > 0
    smoothed = F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=eps)
    plain = F.cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(out.losses["caption"], smoothed)
    assert not torch.allclose(out.losses["caption"], plain)  # smoothing is really applied
    # Doubly stochastic penalty: zero for uniform maps, positive otherwise, scaled by its weight.
    assert out.losses["attention"] > 0
    half = ImageCaptioner(tiny_config(**{**_arch(model), "attention_penalty": model.config.attention_penalty / 2}))
    half.load_state_dict(model.state_dict())
    half.eval()
    out_half = half(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out_half.losses["attention"], out.losses["attention"] / 2)
    none = ImageCaptioner(tiny_config(**{**_arch(model), "attention_penalty": 0.0}))
    none.load_state_dict(model.state_dict())
    none.eval()
    assert "attention" not in none(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels).losses


def test_context_losses_pooled_and_marginal(random_model, examples):
    """pooled: CE of the word from the attention-pooled context; marginal: -log sum_p alpha_t(p) p(w_t | cell p),
    recomputed here from the model's parts; both scaled by context_loss_weight."""
    model = random_model
    pixels, ids, mask, labels = _batch(model, [ex.image for ex in examples], [ex.captions[0] for ex in examples])
    targets = labels[:, 1:]
    valid = targets != -100
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, context_loss_weight=0.5)
        visual = model.encode(pixels)  # (B, P, D)
        context = out.attention @ visual  # (B, T, D)
        context_logits = model.decoder.vocab_logits(model.decoder.head.context_proj(context))
        V = context_logits.shape[-1]
        pooled = F.cross_entropy(context_logits[:, :-1].reshape(-1, V), targets.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(out.losses["context"], 0.5 * pooled)

        marginal_model = ImageCaptioner(tiny_config(**{**_arch(model), "grounding_loss": "marginal"})).eval()
        marginal_model.load_state_dict(model.state_dict())
        out_m = marginal_model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels,
                               context_loss_weight=0.5)
        torch.testing.assert_close(out_m.logits, out.logits)  # the captioning path is the same
        cell_logp = model.decoder.vocab_logits(model.decoder.head.context_proj(visual)).log_softmax(-1)  # (B, P, V)
        total = count = 0.0
        for b in range(len(examples)):
            for t in range(targets.shape[1]):
                if valid[b, t]:
                    total -= torch.log((out.attention[b, t] * cell_logp[b, :, targets[b, t]].exp()).sum())
                    count += 1
        torch.testing.assert_close(out_m.losses["context"], 0.5 * total / count)
    assert "context" not in model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels).losses
    with pytest.raises(ValueError, match="grounding_loss"):
        tiny_config(grounding_loss="hard")
    with pytest.raises(ValueError, match="heatmap_reading must be one of"):
        tiny_config(heatmap_reading="sentence")


def _arch(model):
    keys = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
    return {k: getattr(model.config, k) for k in keys}


def test_additive_attention_is_bahdanaus_tanh_form():
    """The sigmoid form the module computes gives the textbook softmax_p(w . tanh(W_h h_t + W_v v_p)) and its
    gradients, so checkpoints trained either way read the same."""
    from caption_model.modeling import AdditiveAttention

    torch.manual_seed(0)
    attention = AdditiveAttention(32, 16)
    hidden, visual = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 9, 32, requires_grad=True)
    keys = attention.project_keys(visual)
    context, alpha = attention(hidden, keys, visual)
    energy = attention.score(torch.tanh(attention.query(hidden)[:, :, None, :] + keys[:, None, :, :])).squeeze(-1)
    expected_alpha = energy.softmax(dim=-1)  # (B, T, P)
    torch.testing.assert_close(alpha, expected_alpha, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(context, expected_alpha @ visual, atol=1e-6, rtol=1e-5)
    ours = torch.autograd.grad(alpha.square().sum(), [hidden, visual], retain_graph=True)
    textbook = torch.autograd.grad(expected_alpha.square().sum(), [hidden, visual])
    for got, want in zip(ours, textbook):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_padding_does_not_change_real_positions(random_model, examples):
    model = random_model
    ex = examples[0]
    short = model.tokenizer([ex.captions[0]], return_tensors="pt")
    padded = model.tokenizer([ex.captions[0]], padding="max_length", max_length=short.input_ids.shape[1] + 4,
                             return_tensors="pt")
    pixels = model.preprocess([ex.image])
    a = model(pixel_values=pixels, input_ids=short.input_ids, attention_mask=short.attention_mask)
    b = model(pixel_values=pixels, input_ids=padded.input_ids, attention_mask=padded.attention_mask)
    T = short.input_ids.shape[1]
    torch.testing.assert_close(a.logits, b.logits[:, :T], atol=1e-5, rtol=1e-5)


def test_training_loss_decreases(tiny_trained_captioner):
    losses = tiny_trained_captioner.training_losses
    assert len(losses) >= 50 and all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.7 * first, (first, last)


# --- causality ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_mask", [False, True])
def test_decoder_is_causal(random_model, examples, with_mask):
    """Changing token k must leave logits and attention at positions < k untouched (no peeking at future words)."""
    model = random_model
    pixels = model.preprocess([examples[0].image])
    ids = model.tokenizer([examples[0].captions[0]], return_tensors="pt").input_ids  # (1, T)
    T = ids.shape[1]
    mask = torch.ones_like(ids) if with_mask else None
    base = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    for k in (T // 2, T - 1):
        changed = ids.clone()
        changed[0, k:] = (changed[0, k:] + 7) % model.config.vocab_size  # different later tokens
        changed[0, k:] = torch.where(changed[0, k:] < 5, changed[0, k:] + 5, changed[0, k:])
        out = model(pixel_values=pixels, input_ids=changed, attention_mask=mask)
        torch.testing.assert_close(out.logits[:, :k], base.logits[:, :k], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.attention[:, :k], base.attention[:, :k], atol=1e-6, rtol=1e-6)
        # ... and the changed positions do change (the check is not vacuous)
        assert not torch.allclose(out.logits[:, k:], base.logits[:, k:])


# --- Hub format ---------------------------------------------------------------------------------------------
def test_save_load_round_trip_identical_logits_and_captions(tiny_trained_captioner, tiny_checkpoint, examples):
    model = tiny_trained_captioner
    loaded = ImageCaptioner.from_pretrained(tiny_checkpoint)
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.tokenizer is not None and loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    images = [ex.image for ex in examples]
    pixels, ids, mask, labels = _batch(model, images, [ex.captions[0] for ex in examples])
    with torch.no_grad():
        a = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
        b = loaded(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.attention, b.attention)
    assert torch.equal(a.loss, b.loss)
    for beams in (1, 3):
        for x, y in zip(model.caption_batch(images, num_beams=beams, max_length=12),
                        loaded.caption_batch(images, num_beams=beams, max_length=12)):
            assert x.text == y.text and x.words == y.words and x.score == y.score
            np.testing.assert_array_equal(x.attention, y.attention)


def test_checkpoint_folder_holds_only_json_safetensors_tokenizer_files_and_the_card(tiny_checkpoint):
    from pathlib import Path

    from huggingface_hub import ModelCard

    files = sorted(p.name for p in Path(tiny_checkpoint).rglob("*") if p.is_file())
    assert "config.json" in files and "model.safetensors" in files and "README.md" in files
    assert "tokenizer.json" in files or "vocab.txt" in files
    allowed_suffixes = {".json", ".safetensors", ".txt", ".md"}
    assert all(Path(name).suffix in allowed_suffixes for name in files), files
    for name in files:  # every file parses as what its name says: no pickle hiding anywhere
        path = Path(tiny_checkpoint) / name
        if name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
        elif name.endswith(".txt"):
            path.read_text(encoding="utf-8")
        elif name == "README.md":  # the model card push_to_hub.py also writes: one library_name
            assert ModelCard.load(path).data.library_name == ImageCaptioner._hub_mixin_info.model_card_data.library_name
        else:
            assert load_file(str(path))
    config = json.loads((Path(tiny_checkpoint) / "config.json").read_text())
    assert CaptionerConfig.from_dict(config).to_dict() == config


def test_from_pretrained_refuses_missing_or_extra_keys(tiny_checkpoint, tmp_path):
    weights = load_file(f"{tiny_checkpoint}/model.safetensors")
    missing_key = "decoder.output_bias"
    assert missing_key in weights

    missing = tmp_path / "missing"
    shutil.copytree(tiny_checkpoint, missing)
    save_file({k: v for k, v in weights.items() if k != missing_key}, str(missing / "model.safetensors"))
    with pytest.raises(Exception, match=r"(?i)missing.*decoder\.output_bias|decoder\.output_bias.*missing"):
        ImageCaptioner.from_pretrained(str(missing))

    extra = tmp_path / "extra"
    shutil.copytree(tiny_checkpoint, extra)
    save_file({**weights, "decoder.surprise": torch.zeros(3)}, str(extra / "model.safetensors"))
    with pytest.raises(Exception, match=r"(?i)unexpected.*decoder\.surprise|decoder\.surprise.*unexpected"):
        ImageCaptioner.from_pretrained(str(extra))

    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(tiny_checkpoint, wrong_shape)
    save_file({**weights, missing_key: torch.zeros(3)}, str(wrong_shape / "model.safetensors"))
    with pytest.raises(Exception, match=r"(?i)output_bias"):
        ImageCaptioner.from_pretrained(str(wrong_shape))


def test_from_pretrained_names_the_missing_file(tiny_checkpoint, tmp_path):
    folder = tmp_path / "no_weights"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ImageCaptioner.from_pretrained(str(folder))
    folder2 = tmp_path / "no_config"
    shutil.copytree(tiny_checkpoint, folder2)
    (folder2 / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ImageCaptioner.from_pretrained(str(folder2))


def test_init_builds_architecture_only_without_tokenizer():
    model = ImageCaptioner(tiny_config(vocab_size=50))
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="tokenizer"):
        model.caption(np.zeros((32, 32, 3), dtype=np.uint8))
    assert ImageCaptioner(tiny_config(vocab_size=50).to_dict()).config == tiny_config(vocab_size=50)

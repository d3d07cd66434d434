"""Decoding: greedy and beam search, KV cache parity, batching, end-of-caption handling, per-word attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caption_model import Caption
from caption_model.generation import (DEFAULT_NO_REPEAT_NGRAM_SIZE, banned_token_ids, beam_search, greedy_search,
                                     merge_wordpieces)
from caption_model.heatmap import phrase_maps
from conftest import build_tiny_captioner, shapes_images

MAX_LEN = 16


@pytest.fixture(scope="module")
def images():
    return shapes_images(6, seed=2024)


@pytest.fixture(scope="module")
def greedy_caps(tiny_trained_captioner, images):
    return tiny_trained_captioner.caption_batch(images, num_beams=1, max_length=MAX_LEN)


@pytest.fixture(scope="module")
def beam_caps(tiny_trained_captioner, images):
    return tiny_trained_captioner.caption_batch(images, num_beams=3, max_length=MAX_LEN)


def _same(a: Caption, b: Caption, exact: bool = True) -> None:
    assert a.token_ids == b.token_ids
    assert a.words == b.words and a.text == b.text
    if exact:
        assert a.score == b.score
        np.testing.assert_array_equal(a.attention, b.attention)
    else:
        assert a.score == pytest.approx(b.score, abs=1e-4)
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)


def _teacher_forced_logprobs(model, image, token_ids: list[int], ended: bool) -> np.ndarray:
    """Log-probability of each generated token (and the end token when the caption ended) by a full forward."""
    cfg = model.config
    targets = list(token_ids) + ([cfg.eos_token_id] if ended else [])
    ids = torch.tensor([[cfg.bos_token_id] + targets])
    with torch.no_grad():
        out = model(pixel_values=model.preprocess([image]), input_ids=ids)
    logprobs = out.logits[0, :-1].log_softmax(-1)  # (T-1, V): position t scores token t+1
    return logprobs.gather(1, torch.tensor(targets)[:, None])[:, 0].numpy()


# --- the trained model produces real captions -----------------------------------------------------------------
def test_captions_are_words_of_the_vocabulary(greedy_caps, beam_caps, tiny_trained_captioner):
    tok = tiny_trained_captioner.tokenizer
    specials = set(tok.all_special_tokens)
    for cap in greedy_caps + beam_caps:
        assert isinstance(cap, Caption)
        assert cap.words, "the trained tiny model should say something"
        assert cap.text == " ".join(cap.words)
        assert not specials & set(cap.words), cap.words  # no [SEP] / [PAD] / [CLS] as words
        assert not any(w.startswith("##") for w in cap.words)
        assert tiny_trained_captioner.config.eos_token_id not in cap.token_ids
        assert tiny_trained_captioner.config.pad_token_id not in cap.token_ids
        assert np.isfinite(cap.score) and cap.score <= 0


# --- KV cache ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_decoding_equals_uncached_recomputation(tiny_trained_captioner, images, num_beams, greedy_caps,
                                                       beam_caps):
    cached = greedy_caps if num_beams == 1 else beam_caps
    uncached = tiny_trained_captioner.caption_batch(images, num_beams=num_beams, max_length=MAX_LEN, use_cache=False)
    for a, b in zip(cached, uncached):
        _same(a, b, exact=False)


def test_cache_parity_with_random_model_and_long_captions(images):
    """A random model rarely ends early: the cache must stay right for every step up to max_length."""
    from conftest import build_tiny_captioner

    model = build_tiny_captioner(seed=3)
    model.eval()
    for beams in (1, 4):
        a = model.caption_batch(images[:3], num_beams=beams, max_length=20, use_cache=True)
        b = model.caption_batch(images[:3], num_beams=beams, max_length=20, use_cache=False)
        for x, y in zip(a, b):
            _same(x, y, exact=False)


# --- greedy --------------------------------------------------------------------------------------------------
def _forbidden_next(model, prefix: list[int], no_repeat_ngram_size: int) -> list[int]:
    """What decoding may not write after `prefix` (the generated tokens, no start token), written plainly: the
    special tokens a caption never holds, and every token that would make an n-gram of the caption appear twice.
    The references below search under the same rules as the product (compare like with like)."""
    forbidden = set(banned_token_ids(model))
    n = no_repeat_ngram_size
    if n > 0 and len(prefix) >= n:
        for token in range(model.config.vocab_size):
            grams = [tuple((prefix + [token])[i:i + n]) for i in range(len(prefix) + 1 - n + 1)]
            if grams[-1] in grams[:-1]:
                forbidden.add(token)
    return sorted(forbidden)


@pytest.mark.parametrize("no_repeat_ngram_size", [DEFAULT_NO_REPEAT_NGRAM_SIZE, 0])
def test_greedy_matches_step_by_step_argmax_of_the_full_forward(tiny_trained_captioner, images,
                                                                 no_repeat_ngram_size):
    model = tiny_trained_captioner
    cfg = model.config
    caps = model.caption_batch(images[:3], num_beams=1, max_length=MAX_LEN, no_repeat_ngram_size=no_repeat_ngram_size)
    for image, cap in zip(images[:3], caps):
        ids = [cfg.bos_token_id]
        pixels = model.preprocess([image])
        with torch.no_grad():
            for _ in range(MAX_LEN):
                logits = model(pixel_values=pixels, input_ids=torch.tensor([ids])).logits[0, -1]
                logits[_forbidden_next(model, ids[1:], no_repeat_ngram_size)] = float("-inf")
                ids.append(int(logits.argmax()))
                if ids[-1] == cfg.eos_token_id:
                    break
        generated = ids[1:]
        ended = generated[-1] == cfg.eos_token_id
        assert cap.token_ids == (generated[:-1] if ended else generated)


def test_greedy_is_deterministic(tiny_trained_captioner, images, greedy_caps):
    again = tiny_trained_captioner.caption_batch(images, num_beams=1, max_length=MAX_LEN)
    for a, b in zip(greedy_caps, again):
        _same(a, b)


def test_num_beams_1_equals_greedy(tiny_trained_captioner, images, greedy_caps):
    model = tiny_trained_captioner
    with torch.inference_mode():
        visual = model.encode(model.preprocess(images))
        g_ids, g_alpha, g_sum, g_len = greedy_search(model, visual, MAX_LEN)
        b_ids, b_alpha, b_sum, b_len = beam_search(model, visual, 1, MAX_LEN)
    assert torch.equal(g_len, b_len)
    for i in range(len(images)):
        n = int(g_len[i])
        assert g_ids[i, :n].tolist() == b_ids[i, :n].tolist()
        torch.testing.assert_close(g_alpha[i, :n], b_alpha[i, :n])
    torch.testing.assert_close(g_sum, b_sum)
    # and through the public API
    for a, cap in zip(model.caption_batch(images, num_beams=1, max_length=MAX_LEN), greedy_caps):
        _same(a, cap)


# --- batching ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_beams", [1, 3])
def test_caption_batch_equals_caption_one_by_one(tiny_trained_captioner, images, num_beams, greedy_caps, beam_caps):
    batched = greedy_caps if num_beams == 1 else beam_caps
    for image, cap in zip(images, batched):
        single = tiny_trained_captioner.caption(image, num_beams=num_beams, max_length=MAX_LEN)
        _same(single, cap, exact=False)


# --- beam search ---------------------------------------------------------------------------------------------
def test_score_is_mean_log_probability_of_the_caption(tiny_trained_captioner, images, greedy_caps, beam_caps):
    for image, cap in list(zip(images, greedy_caps)) + list(zip(images, beam_caps)):
        ended = len(cap.token_ids) < MAX_LEN
        logprobs = _teacher_forced_logprobs(tiny_trained_captioner, image, cap.token_ids, ended)
        assert cap.score == pytest.approx(float(logprobs.mean()), abs=1e-4)


def test_beam_search_finds_better_or_equal_captions_than_greedy(greedy_caps, beam_caps):
    """With length_penalty=1 both rank by mean log-probability: beam search should not lose to greedy."""
    better_or_equal = [b.score >= g.score - 1e-5 for g, b in zip(greedy_caps, beam_caps)]
    assert sum(better_or_equal) > len(better_or_equal) / 2, [(g.score, b.score) for g, b in zip(greedy_caps, beam_caps)]


def _reference_beam_search(model, image, K: int, max_length: int, length_penalty: float, no_repeat_ngram_size: int):
    """Plain-python beam search with the same rules as generation.beam_search (finished hypotheses stay in the
    beam at no cost; ranking by sum / length ** length_penalty; `_forbidden_next` tokens never chosen, the others
    scored by the model's own log-probabilities), recomputing every prefix from scratch."""
    cfg = model.config
    pixels = model.preprocess([image])
    beams = [([], 0.0, False)]  # (tokens, sum of log-probs, finished)
    for _ in range(max_length):
        candidates = []
        live = [b for b in beams if not b[2]]
        if live:
            ids = torch.tensor([[cfg.bos_token_id] + b[0] for b in live])
            with torch.no_grad():
                logprobs = model(pixel_values=pixels.expand(len(live), -1, -1, -1), input_ids=ids).logits[:, -1]
                logprobs = logprobs.float().log_softmax(-1)
            for b, row in zip(live, logprobs):
                row[_forbidden_next(model, b[0], no_repeat_ngram_size)] = float("-inf")
                top = row.topk(K)
                for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
                    candidates.append((b[0] + [tok], b[1] + lp, tok == cfg.eos_token_id))
        candidates += [b for b in beams if b[2]]
        candidates.sort(key=lambda c: c[1] / max(len(c[0]), 1) ** length_penalty, reverse=True)
        beams = candidates[:K]
        if all(b[2] for b in beams):
            break
    best = max(beams, key=lambda c: c[1] / max(len(c[0]), 1) ** length_penalty)
    tokens = best[0][:-1] if best[2] else best[0]
    return tokens, best[1] / max(len(best[0]), 1)


@pytest.mark.parametrize("num_beams,length_penalty,no_repeat_ngram_size",
                         [(3, 1.0, DEFAULT_NO_REPEAT_NGRAM_SIZE), (2, 0.0, DEFAULT_NO_REPEAT_NGRAM_SIZE), (3, 1.0, 0)])
def test_beam_search_matches_a_plain_reference_search(tiny_trained_captioner, images, num_beams, length_penalty,
                                                      no_repeat_ngram_size):
    model = tiny_trained_captioner
    caps = model.caption_batch(images[:3], num_beams=num_beams, max_length=10, length_penalty=length_penalty,
                               no_repeat_ngram_size=no_repeat_ngram_size)
    for image, cap in zip(images[:3], caps):
        tokens, score = _reference_beam_search(model, image, num_beams, 10, length_penalty, no_repeat_ngram_size)
        assert cap.token_ids == tokens
        assert cap.score == pytest.approx(score, abs=1e-4)


# --- max length and end of caption -----------------------------------------------------------------------------
@pytest.mark.parametrize("num_beams", [1, 3])
def test_max_length_is_respected(tiny_trained_captioner, images, num_beams, greedy_caps):
    full_lengths = [len(c.token_ids) for c in greedy_caps]
    # limits below the longest caption this model writes (which differs between CPU kinds): they really truncate
    longest = max(full_lengths)
    assert longest >= 2
    for max_length in sorted({1, longest - 1}):
        caps = tiny_trained_captioner.caption_batch(images, num_beams=num_beams, max_length=max_length)
        for cap in caps:
            assert len(cap.token_ids) <= max_length
            assert len(cap.words) <= max_length
            assert cap.attention.shape[0] == len(cap.words)
    with pytest.raises(ValueError, match="max_length"):
        tiny_trained_captioner.caption(images[0], max_length=0)
    with pytest.raises(ValueError, match="num_beams"):
        tiny_trained_captioner.caption(images[0], num_beams=0)


def test_truncated_greedy_caption_is_the_prefix_of_the_full_one(tiny_trained_captioner, images, greedy_caps):
    short = tiny_trained_captioner.caption_batch(images, num_beams=1, max_length=3)
    for s, full in zip(short, greedy_caps):
        assert s.token_ids == full.token_ids[:3]


def test_caption_batch_of_nothing_is_empty(tiny_trained_captioner):
    assert tiny_trained_captioner.caption_batch([], num_beams=3) == []


# --- attention ------------------------------------------------------------------------------------------------
def test_attention_has_one_normalised_map_per_word(tiny_trained_captioner, greedy_caps, beam_caps):
    gh, gw = tiny_trained_captioner.grid_size
    for cap in greedy_caps + beam_caps:
        assert isinstance(cap.attention, np.ndarray) and cap.attention.dtype == np.float32
        assert cap.attention.shape == (len(cap.words), gh, gw)
        assert (cap.attention >= 0).all()
        np.testing.assert_allclose(cap.attention.sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_attention_maps_differ_between_words(greedy_caps, beam_caps):
    for cap in greedy_caps + beam_caps:
        maps = cap.attention.reshape(len(cap.words), -1)
        assert len(maps) >= 2
        spread = np.abs(maps - maps.mean(axis=0, keepdims=True)).sum(axis=1)  # L1 distance to the mean map
        assert spread.max() > 0.05, cap.words  # not the same map for every word
        assert len({tuple(np.round(m, 4)) for m in maps}) > 1


def _teacher_forced_maps(model, image, cap, grounded: bool) -> tuple[list[str], np.ndarray]:
    """Per-word maps recomputed by a full forward: the step's additive attention, grounded or raw."""
    cfg = model.config
    gh, gw = model.grid_size
    ids = torch.tensor([[cfg.bos_token_id] + cap.token_ids])
    with torch.no_grad():
        pixels = model.preprocess([image])
        alpha = model(pixel_values=pixels, input_ids=ids).attention[:, : len(cap.token_ids)]  # (1, T, P)
        if grounded:
            alpha = model.decoder.ground_attention(alpha, model.encode(pixels), ids[:, 1:])
    pieces = model.tokenizer.convert_ids_to_tokens(cap.token_ids)
    return merge_wordpieces(pieces, alpha[0].numpy().reshape(-1, gh, gw))


def test_attention_comes_from_the_decoding_steps(tiny_trained_captioner, images, greedy_caps):
    """The map of word k is the additive attention of the step that produced it, weighted by the evidence for
    word k (grounded_heatmaps, the default), or that attention alone."""
    model = tiny_trained_captioner
    assert model.config.grounded_heatmaps
    for image, cap in zip(images[:2], greedy_caps[:2]):
        words, maps = _teacher_forced_maps(model, image, cap, grounded=True)
        assert words == cap.words
        np.testing.assert_allclose(maps, cap.attention, atol=1e-5)
    model.config.grounded_heatmaps = False
    try:
        raw_caps = model.caption_batch(images[:2], num_beams=1, max_length=MAX_LEN)
    finally:
        model.config.grounded_heatmaps = True
    for image, cap, raw in zip(images[:2], greedy_caps[:2], raw_caps):
        assert raw.token_ids == cap.token_ids  # grounding changes the maps, never the words
        words, maps = _teacher_forced_maps(model, image, cap, grounded=False)
        np.testing.assert_allclose(maps, raw.attention, atol=1e-5)
        assert not np.allclose(raw.attention, cap.attention, atol=1e-3)


def test_phrase_reading_serves_each_word_map_with_its_neighbours(tiny_trained_captioner, images, greedy_caps):
    """heatmap_reading="phrase": the served maps are heatmap.phrase_maps of the "word" maps of the same caption
    (whole words, no special tokens); the words never change."""
    model = tiny_trained_captioner
    assert model.config.heatmap_reading == "word"
    model.config.heatmap_reading = "phrase"
    try:
        phrase_caps = model.caption_batch(images[:3], num_beams=1, max_length=MAX_LEN)
    finally:
        model.config.heatmap_reading = "word"
    changed = False
    for word_cap, phrase_cap in zip(greedy_caps[:3], phrase_caps):
        assert phrase_cap.token_ids == word_cap.token_ids and phrase_cap.words == word_cap.words
        np.testing.assert_allclose(phrase_cap.attention, phrase_maps(word_cap.attention), atol=1e-6)
        np.testing.assert_allclose(phrase_cap.attention.sum(axis=(1, 2)), 1.0, atol=1e-5)
        changed |= not np.allclose(phrase_cap.attention, word_cap.attention, atol=1e-4)
    assert changed  # the trained model has peaked maps whose neighbours move


def test_grounding_moves_a_map_to_the_cell_that_explains_the_word():
    """map_t(p) = alpha_t(p) exp(s_p(w_t)) / sum: attention split over two cells goes to the one whose context
    scores the chosen word higher; no evidence leaves alpha as it is."""
    model = build_tiny_captioner().eval()
    decoder, D = model.decoder, model.config.hidden_size
    P = 4
    visual = torch.randn(1, P, D)
    cells = decoder.head.context_proj(visual).detach()  # (1, P, D)
    word = 7
    with torch.no_grad():  # word 7's embedding agrees with cell 2's context more than with cell 0's
        decoder.bert.embeddings.word_embeddings.weight[word] = 3.0 * (cells[0, 2] - cells[0, 0]) / D ** 0.5
    alpha = torch.tensor([[[0.5, 0.0, 0.5, 0.0]]])  # (1, 1, P): split between cells 0 and 2
    with torch.no_grad():
        grounded = decoder.ground_attention(alpha, visual, torch.tensor([[word]]))  # (1, 1, P)
        scores = decoder.bert.embeddings.word_embeddings.weight[word] @ cells[0].T  # (P,)
    expected = alpha[0, 0] * scores.exp()
    torch.testing.assert_close(grounded[0, 0], expected / expected.sum(), atol=1e-6, rtol=1e-5)
    assert grounded[0, 0, 2] > 0.9 and grounded[0, 0, [1, 3]].sum() < 1e-6  # no mass where alpha had none
    with torch.no_grad():
        decoder.bert.embeddings.word_embeddings.weight[word] = 0.0  # the same score everywhere
        unchanged = decoder.ground_attention(alpha, visual, torch.tensor([[word]]))
    torch.testing.assert_close(unchanged, alpha)


def test_grounding_of_a_marginal_model_is_the_exact_alignment_posterior():
    """grounding_loss="marginal": map_t(p) = alpha_t(p) p(w_t | cell p) / sum over p, with p(. | cell) normalised."""
    model = build_tiny_captioner(grounding_loss="marginal").eval()
    visual = torch.randn(2, 5, model.config.hidden_size)  # (B, P, D)
    alpha = torch.rand(2, 3, 5).softmax(-1)  # (B, T, P)
    tokens = torch.tensor([[7, 8, 9], [10, 11, 7]])
    with torch.no_grad():
        grounded = model.decoder.ground_attention(alpha, visual, tokens)
        cell_p = model.decoder.vocab_logits(model.decoder.head.context_proj(visual)).softmax(-1)  # (B, P, V)
    for b in range(2):
        for t in range(3):
            expected = alpha[b, t] * cell_p[b, :, tokens[b, t]]
            torch.testing.assert_close(grounded[b, t], expected / expected.sum())


def test_merge_wordpieces_merges_pieces_and_renormalises_their_maps():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 2, 3)).astype(np.float32)
    maps /= maps.sum(axis=(1, 2), keepdims=True)
    words, merged = merge_wordpieces(["a", "tri", "##ang", "##le", "dog"], maps)
    assert words == ["a", "triangle", "dog"]
    assert merged.shape == (3, 2, 3) and merged.dtype == np.float32
    np.testing.assert_allclose(merged[0], maps[0], rtol=1e-6)
    expected = maps[1:4].mean(axis=0)
    np.testing.assert_allclose(merged[1], expected / expected.sum(), rtol=1e-5)
    np.testing.assert_allclose(merged[2], maps[4], rtol=1e-6)
    np.testing.assert_allclose(merged.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    # unnormalised inputs still come out normalised
    words, merged = merge_wordpieces(["x", "##y"], np.ones((2, 2, 2)))
    assert words == ["xy"]
    np.testing.assert_allclose(merged, np.full((1, 2, 2), 0.25))
    words, merged = merge_wordpieces([], np.zeros((0, 2, 3)))
    assert words == [] and merged.shape == (0, 2, 3)


def test_apostrophe_and_hyphen_pieces_join_their_neighbours():
    """BERT's tokenizers split "dog's" and "t-shirt" into three pieces; the caption shows the word as trained."""
    maps = np.random.default_rng(1).random((9, 2, 2))
    words, merged = merge_wordpieces(["a", "dog", "'", "s", "t", "-", "sh", "##irt", "runs"], maps)
    assert words == ["a", "dog's", "t-shirt", "runs"]
    expected = maps[4:8].mean(axis=0)
    np.testing.assert_allclose(merged[2], expected / expected.sum(), rtol=1e-6)
    assert merge_wordpieces(["'", "s", "x", "-"], np.ones((4, 2, 2)))[0] == ["'s", "x-"]  # at either end: kept


def test_special_tokens_are_never_generated(shapes_image):
    """Even a model that prefers [UNK]/[MASK]/[PAD]/[CLS] above all else never puts them in a caption."""
    model = build_tiny_captioner(seed=3)
    tokenizer = model.tokenizer
    banned = [tokenizer.unk_token_id, tokenizer.mask_token_id, tokenizer.pad_token_id, tokenizer.cls_token_id]
    with torch.no_grad():
        model.decoder.output_bias[banned] = 100.0
    for beams in (1, 3):
        for use_cache in (True, False):
            caption = model.caption(shapes_image, num_beams=beams, max_length=6, use_cache=use_cache)
            assert not set(caption.token_ids) & set(banned)
            assert not any(word.startswith("[") for word in caption.words)

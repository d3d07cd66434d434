"""Repetition control: no_repeat_ngram_size and repetition_penalty in greedy and beam search, on a model forced
to loop; the cached and reference paths agree with the controls on; with them off decoding is unchanged."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from caption_model import ImageCaptioner
from caption_model.generation import (DEFAULT_NO_REPEAT_NGRAM_SIZE, DecoderState, beam_search, greedy_search,
                                      repeated_ngram_completions)
from caption_model.training.shapes import generate_shapes_example, shapes_corpus
from conftest import build_tiny_captioner, shapes_images
from test_core_decoding import _reference_beam_search, _teacher_forced_logprobs

MAX_LEN = 24
LOOP_WORDS = ("a", "blue", "square")


def repeated_ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return sorted({g for g in grams if grams.count(g) > 1})


@pytest.fixture(scope="module")
def looping_model() -> ImageCaptioner:
    """An untrained tiny model whose output bias favours "a", "blue", "square" and never ends: it loops."""
    model = build_tiny_captioner(seed=11).eval()
    with torch.no_grad():
        for word in LOOP_WORDS:
            model.decoder.output_bias[model.tokenizer.convert_tokens_to_ids(word)] = 6.0
        model.decoder.output_bias[model.config.eos_token_id] = -1e9
    return model


@pytest.fixture(scope="module")
def images():
    return shapes_images(4, seed=31)


def search(model, images, num_beams: int, use_cache: bool = True, **control):
    with torch.inference_mode():
        visual = model.encode(model.preprocess(images))
        if num_beams == 1:
            return greedy_search(model, visual, MAX_LEN, use_cache, **control)
        return beam_search(model, visual, num_beams, MAX_LEN, 1.0, use_cache, **control)


# --- the n-gram rule --------------------------------------------------------------------------------------------
def test_repeated_ngram_completions_bans_what_would_repeat_an_ngram():
    assert repeated_ngram_completions([[1, 2, 3, 1, 2]], 3) == ([0], [3])
    assert repeated_ngram_completions([[1, 2, 3, 1, 2], [1, 2]], 2) == ([0], [3])
    assert repeated_ngram_completions([[5, 6, 5]], 1) == ([0, 0, 0], [5, 6, 5])
    assert repeated_ngram_completions([[1, 2], [7, 7, 7]], 3) == ([1], [7])
    assert repeated_ngram_completions([[1, 2, 3]], 4) == ([], [])


def test_shapes_captions_repeat_bigrams_but_never_a_trigram():
    """The default n=3 never blocks a correct shapes caption ("a red circle and a red square" repeats "a red",
    so n=2 would); checked on words and on the tokens of the shapes tokenizer."""
    rng = np.random.default_rng(0)
    captions = [c for _ in range(600) for c in generate_shapes_example(rng).captions]
    model = build_tiny_captioner()
    bigram_repeats = 0
    for caption in captions:
        words = caption.split()
        ids = model.tokenizer(caption, add_special_tokens=False).input_ids
        assert not repeated_ngrams(words, DEFAULT_NO_REPEAT_NGRAM_SIZE), caption
        assert not repeated_ngrams(ids, DEFAULT_NO_REPEAT_NGRAM_SIZE), caption
        bigram_repeats += bool(repeated_ngrams(words, 2))
    assert bigram_repeats > len(captions) / 20
    assert len(set(shapes_corpus(50))) > 50  # the captions checked are varied


# --- a looping model --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_beams", [1, 3])
def test_looping_model_repeats_without_control(looping_model, images, num_beams):
    ids, _, _, lengths = search(looping_model, images, num_beams)
    for row, length in zip(ids.tolist(), lengths.tolist()):
        assert length == MAX_LEN and repeated_ngrams(row[:length], 3), row


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeated_ngram_of_the_configured_size(looping_model, images, num_beams, n):
    fast = search(looping_model, images, num_beams, True, no_repeat_ngram_size=n)
    reference = search(looping_model, images, num_beams, False, no_repeat_ngram_size=n)
    assert torch.equal(fast[0], reference[0]) and torch.equal(fast[3], reference[3])
    torch.testing.assert_close(fast[2], reference[2], atol=1e-4, rtol=0)
    for row, length in zip(fast[0].tolist(), fast[3].tolist()):
        assert not repeated_ngrams(row[:length], n), (n, row[:length])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_captions_of_the_public_api_never_repeat_a_trigram(looping_model, images, num_beams):
    for use_cache in (True, False):
        captions = looping_model.caption_batch(images, num_beams=num_beams, max_length=MAX_LEN, use_cache=use_cache)
        for caption in captions:
            assert len(caption.token_ids) == MAX_LEN  # the loop is broken, not cut short
            assert not repeated_ngrams(caption.token_ids, DEFAULT_NO_REPEAT_NGRAM_SIZE), caption.text


@pytest.mark.parametrize("num_beams", [1, 3])
def test_repetition_penalty_fast_path_equals_reference_and_repeats_less(looping_model, images, num_beams):
    loop_ids = set(looping_model.tokenizer.convert_tokens_to_ids(list(LOOP_WORDS)))
    plain = search(looping_model, images, num_beams)
    fast = search(looping_model, images, num_beams, True, repetition_penalty=3.0, no_repeat_ngram_size=2)
    reference = search(looping_model, images, num_beams, False, repetition_penalty=3.0, no_repeat_ngram_size=2)
    assert torch.equal(fast[0], reference[0]) and torch.equal(fast[3], reference[3])
    loops = lambda ids: sum(token in loop_ids for token in ids.flatten().tolist())  # noqa: E731
    assert loops(fast[0]) < loops(plain[0])


def test_repetition_penalty_multiplies_the_log_probs_of_seen_tokens(looping_model, images):
    with torch.inference_mode():
        visual = looping_model.encode(looping_model.preprocess(images[:2]))
        state = DecoderState(looping_model, visual, True, repetition_penalty=1.5)
        first, _ = state.step()
        assert state.search_scores(first) is first  # nothing generated yet: nothing to penalise
        state.append(torch.tensor([7, 9]))
        state.append(torch.tensor([7, 11]))
        logprobs, _ = state.step()
        scores = state.search_scores(logprobs)
    expected = logprobs.clone()
    expected[0, 7] *= 1.5
    expected[1, [9, 11]] *= 1.5
    torch.testing.assert_close(scores, expected, atol=0, rtol=0)


# --- scores and the off switch ----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_beams", [1, 3])
def test_score_stays_the_models_log_probability(looping_model, images, num_beams):
    captions = looping_model.caption_batch(images[:2], num_beams=num_beams, max_length=12, repetition_penalty=1.3)
    for image, caption in zip(images, captions):
        logprobs = _teacher_forced_logprobs(looping_model, image, caption.token_ids, ended=False)
        assert caption.score == pytest.approx(float(logprobs.mean()), abs=1e-4)


def test_controls_off_leave_greedy_and_beam_search_as_they_were(looping_model, images):
    """Off, greedy is the argmax of the full forward at every step and beam search the plain reference search."""
    model = looping_model
    with torch.inference_mode():
        state = DecoderState(model, model.encode(model.preprocess(images[:1])), True)
        state.append(torch.tensor([5]))
        logprobs, _ = state.step()
        assert state.search_scores(logprobs) is logprobs
    caption = model.caption(images[0], num_beams=1, max_length=10, no_repeat_ngram_size=0)
    ids = [model.config.bos_token_id]
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(pixel_values=model.preprocess([images[0]]), input_ids=torch.tensor([ids]))
                           .logits[0, -1].argmax()))
    assert caption.token_ids == ids[1:]
    beam = model.caption(images[0], num_beams=2, max_length=8, no_repeat_ngram_size=0, repetition_penalty=1.0)
    reference = _reference_beam_search(model, images[0], 2, 8, length_penalty=1.0, no_repeat_ngram_size=0)
    assert beam.token_ids == reference[0]


def test_defaults_and_invalid_values(looping_model, images):
    for method in (ImageCaptioner.caption, ImageCaptioner.caption_batch):
        parameters = inspect.signature(method).parameters
        assert parameters["no_repeat_ngram_size"].default == DEFAULT_NO_REPEAT_NGRAM_SIZE == 3
        assert parameters["repetition_penalty"].default == 1.0
        assert list(parameters)[-2:] == ["no_repeat_ngram_size", "repetition_penalty"]
    for bad in (dict(no_repeat_ngram_size=-1), dict(no_repeat_ngram_size=2.5), dict(repetition_penalty=0.0),
                dict(repetition_penalty=float("nan"))):
        with pytest.raises(ValueError, match="no_repeat_ngram_size must be|repetition_penalty must be"):
            looping_model.caption(images[0], **bad)

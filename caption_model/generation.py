"""Decoding: greedy and batched beam search over a `step()` API, with a KV cache, per-token attention and
repetition control.

Repetition control steers the search, never the reported score (Caption.score stays the model's log-probability):
- no_repeat_ngram_size n > 0: a token that would complete an n-gram the caption already contains gets -inf.
- repetition_penalty r != 1: the log-probability of every token already in the caption is multiplied by r. This
  is the CTRL rule (positive logits / r, negative logits * r) applied to log-probabilities, which are all <= 0,
  so r > 1 always lowers a seen token; the row is not renormalised, so in beam search a hypothesis that repeats
  itself falls behind the others (what transformers' beam search does; its greedy search penalises raw logits).

Shape legend: B images, K beams, N = B*K rows, t tokens so far, V vocabulary, P grid cells, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .cached_step import CachedBertDecoder, StepKernels, repeat_rows
from .heatmap import phrase_maps, recentre
from .modeling import CaptionerModel

# What ImageCaptioner.caption(), the CLI and the app use: blocks phrase loops ("a blue square a blue square ...").
# A 3-gram such as "a red circle" never legitimately repeats in a shapes caption (its objects are distinct);
# bigrams such as "a red" do, so 2 would be too strict. The penalty is off by default: captions repeat "a".
DEFAULT_NO_REPEAT_NGRAM_SIZE = 3
DEFAULT_REPETITION_PENALTY = 1.0


@dataclass
class Caption:
    """One generated caption with a heatmap per word."""

    text: str  # the caption, words joined by spaces
    words: list[str]  # whole words (WordPiece pieces merged)
    attention: np.ndarray  # float32 (len(words), gh, gw); each map sums to 1
    score: float  # mean log-probability of the generated tokens (words and the end token) under the model
    token_ids: list[int] = field(default_factory=list)  # generated token ids, end token excluded


class DecoderState:
    """What `step()` needs: the visual tokens, their attention keys, the prefix and (optionally) the KV cache.

    visual (B, P, D) holds one row per image; with `num_beams` K every image gets K rows (N = B*K), and what only
    depends on the image (additive-attention keys, cross-attention keys/values of every layer) is computed once per
    image and shared by its beams.

    use_cache=True is the fast path (`cached_step.CachedBertDecoder`): one new token per step through the BERT
    layers' own weights (so an int8 model runs int8) and a fast mode's `kernels`, self-attention keys/values
    appended to a per-layer cache, cross-attention keys/values computed once. use_cache=False is the reference:
    the whole prefix through `BertModel.forward` every step.

    `search_scores()` applies the repetition controls (module docstring) to what `step()` returns.
    """

    def __init__(self, model: CaptionerModel, visual: torch.Tensor, use_cache: bool, num_beams: int = 1,
                 kernels: StepKernels | None = None, no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0):
        self.model = model
        self.no_repeat_ngram_size = int(no_repeat_ngram_size)
        self.repetition_penalty = float(repetition_penalty)
        kernels = kernels or StepKernels()
        keys = model.decoder.attention_keys(visual)  # (B, P, A), once per image
        self.visual = repeat_rows(visual, num_beams)  # (N, P, D)
        self.keys = repeat_rows(keys, num_beams)  # (N, P, A)
        self.vocab_logits = kernels.vocab_logits or model.decoder.vocab_logits  # (N, D) -> (N, V)
        # the fast path: one token per step, KV cache, cross-attention K/V once per image
        self.cached = CachedBertDecoder(model.decoder.bert, visual, num_beams, kernels.qkv) if use_cache else None
        bos = model.config.bos_token_id
        N = self.visual.shape[0]
        self.banned = banned_token_ids(model)  # never part of a caption: [PAD], [CLS], [UNK], [MASK]
        self.input_ids = torch.full((N, 1), bos, dtype=torch.long, device=visual.device)  # (N, 1)

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Score the next token of every row -> log-probabilities (N, V), attention of that token (N, P)."""
        decoder = self.model.decoder
        if self.cached is not None:
            hidden = self.cached(self.input_ids[:, -1:])  # (N, 1, D)
        else:  # reference path: recompute the whole prefix every step
            hidden = decoder.hidden_states(self.input_ids, self.visual)
        fused, alpha, _ = decoder.head(hidden[:, -1:], self.keys, self.visual)  # (N, 1, D), (N, 1, P)
        logprobs = self.vocab_logits(fused[:, 0]).float().log_softmax(dim=-1)  # (N, V)
        logprobs[:, self.banned] = float("-inf")  # masked after normalising: scores stay the model's log-probs
        return logprobs, alpha[:, 0]

    def search_scores(self, logprobs: torch.Tensor) -> torch.Tensor:
        """The model's log-probabilities (N, V) -> what the search ranks by: the same tensor when the repetition
        controls are off, else a copy with seen tokens penalised and n-gram repeats at -inf."""
        generated = self.input_ids[:, 1:]  # (N, t) without the start token
        if generated.shape[1] == 0:
            return logprobs
        if self.repetition_penalty != 1.0:
            seen = torch.zeros_like(logprobs, dtype=torch.bool).scatter_(1, generated, True)  # (N, V)
            logprobs = torch.where(seen, logprobs * self.repetition_penalty, logprobs)
        if self.no_repeat_ngram_size > 0:
            rows, tokens = repeated_ngram_completions(generated.tolist(), self.no_repeat_ngram_size)
            if rows:
                logprobs = logprobs.clone() if self.repetition_penalty == 1.0 else logprobs
                logprobs[rows, tokens] = float("-inf")
        return logprobs

    def append(self, tokens: torch.Tensor) -> None:
        self.input_ids = torch.cat([self.input_ids, tokens[:, None]], dim=1)  # (N, t) -> (N, t+1)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (N,) in this order: beam search moves surviving beams into place."""
        self.input_ids = self.input_ids[rows]
        if self.cached is not None:
            self.cached.reorder(rows)


def repeated_ngram_completions(prefixes: list[list[int]], n: int) -> tuple[list[int], list[int]]:
    """Token ids per row that would complete an n-gram the row already contains -> (rows, tokens) index lists.
    The end token is never among them: an unfinished row has not generated it yet."""
    rows: list[int] = []
    tokens: list[int] = []
    for row, ids in enumerate(prefixes):
        if len(ids) < n:
            continue
        tail = ids[len(ids) - n + 1:]  # the last n-1 tokens: the start of the n-gram the next token completes
        for start in range(len(ids) - n + 1):
            if ids[start:start + n - 1] == tail:
                rows.append(row)
                tokens.append(ids[start + n - 1])
    return rows, tokens


def banned_token_ids(model: CaptionerModel) -> list[int]:
    """Special tokens a caption never contains ([SEP] ends it, so it is allowed): [PAD], [CLS], [UNK], [MASK]."""
    cfg, tokenizer = model.config, model.tokenizer
    ids = {cfg.pad_token_id, cfg.bos_token_id}
    for name in ("unk_token_id", "mask_token_id"):
        token_id = getattr(tokenizer, name, None) if tokenizer is not None else None
        if token_id is not None and token_id < cfg.vocab_size:
            ids.add(token_id)
    ids.discard(cfg.eos_token_id)
    return sorted(ids)


def greedy_search(model: CaptionerModel, visual: torch.Tensor, max_length: int, use_cache: bool = True,
                  kernels: StepKernels | None = None, no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0):
    """visual (B, P, D) -> token ids (B, L), attention (B, L, P), sum of log-probs (B,), lengths (B,).
    Rows that finished early are padded with [PAD] after their end token. Repetition control: module docstring."""
    cfg = model.config
    state = DecoderState(model, visual, use_cache, kernels=kernels, no_repeat_ngram_size=no_repeat_ngram_size,
                         repetition_penalty=repetition_penalty)
    B = visual.shape[0]
    finished = torch.zeros(B, dtype=torch.bool, device=visual.device)
    logprob_sum = torch.zeros(B, device=visual.device)
    lengths = torch.zeros(B, dtype=torch.long, device=visual.device)
    alphas = []
    for _ in range(max_length):
        logprobs, alpha = state.step()  # (B, V), (B, P)
        tokens = state.search_scores(logprobs).argmax(dim=-1)  # (B,)
        tokens = torch.where(finished, torch.full_like(tokens, cfg.pad_token_id), tokens)
        logprob_sum += torch.where(finished, 0.0, logprobs.gather(1, tokens[:, None])[:, 0])
        lengths += (~finished).long()
        alphas.append(alpha)
        state.append(tokens)
        finished |= tokens == cfg.eos_token_id
        if bool(finished.all()):
            break
    return state.input_ids[:, 1:], torch.stack(alphas, dim=1), logprob_sum, lengths


def beam_search(model: CaptionerModel, visual: torch.Tensor, num_beams: int, max_length: int,
                length_penalty: float = 1.0, use_cache: bool = True, kernels: StepKernels | None = None,
                no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0):
    """Batched beam search. visual (B, P, D) -> best beam per image: token ids (B, L), attention (B, L, P),
    sum of the model's log-probs (B,), lengths (B,). Hypotheses are ranked by sum / length ** length_penalty,
    the sum taken over the search scores (the log-probs after repetition control, module docstring)."""
    cfg = model.config
    B, K = visual.shape[0], num_beams
    N = B * K
    device = visual.device
    state = DecoderState(model, visual, use_cache, num_beams=K, kernels=kernels,  # N = B*K rows
                         no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty)
    beam_scores = torch.zeros(B, K, device=device)
    beam_scores[:, 1:] = float("-inf")  # the first step expands beam 0 only
    beam_scores = beam_scores.view(N)
    model_scores = torch.zeros(N, device=device)  # the model's own summed log-probs of each beam
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    alpha_history = torch.zeros(N, 0, visual.shape[1], device=device)  # (N, t, P)
    batch_offset = (torch.arange(B, device=device) * K)[:, None]  # (B, 1)
    for _ in range(max_length):
        logprobs, alpha = state.step()  # (N, V), (N, P)
        V = logprobs.shape[-1]
        # A finished beam can only be extended by [PAD], at no cost and without growing.
        pad_only = _pad_only_row(V, cfg.pad_token_id, device)
        logprobs = torch.where(finished[:, None], pad_only, logprobs)
        scores = torch.where(finished[:, None], pad_only, state.search_scores(logprobs))  # (N, V)
        new_lengths = lengths + (~finished).long()  # (N,)
        candidates = beam_scores[:, None] + scores  # (N, V) summed search scores
        normalised = candidates / new_lengths[:, None].clamp(min=1).float() ** length_penalty
        top_scores, top_index = normalised.view(B, K * V).topk(K, dim=1)  # (B, K)
        source_beam = top_index // V  # (B, K) which beam each survivor extends
        tokens = (top_index % V).view(N)  # (N,)
        rows = (batch_offset + source_beam).view(N)  # (N,) global row of the extended beam
        beam_scores = candidates.view(B, K * V).gather(1, top_index).view(N)
        model_scores = model_scores[rows] + logprobs[rows, tokens]
        lengths = new_lengths[rows]
        finished = finished[rows] | (tokens == cfg.eos_token_id)
        alpha_history = torch.cat([alpha_history[rows], alpha[rows][:, None]], dim=1)  # (N, t+1, P)
        state.reorder(rows)
        state.append(tokens)
        if bool(finished.all()):
            break
    final = (beam_scores / lengths.clamp(min=1).float() ** length_penalty).view(B, K)
    best = (batch_offset[:, 0] + final.argmax(dim=1))  # (B,)
    return state.input_ids[best, 1:], alpha_history[best], model_scores[best], lengths[best]


def _pad_only_row(V: int, pad_token_id: int, device) -> torch.Tensor:
    row = torch.full((1, V), float("-inf"), device=device)
    row[0, pad_token_id] = 0.0
    return row


JOINING_PIECES = ("'", "-")  # BERT's tokenizers split "dog's" into dog ' s and "t-shirt" into t - shirt


def merge_wordpieces(pieces: list[str], maps: np.ndarray) -> tuple[list[str], np.ndarray]:
    """WordPiece pieces (n,) with maps (n, gh, gw) -> whole words with the mean map of their pieces,
    renormalised to sum to 1. '##ing' continues the previous word; an apostrophe or hyphen piece joins the words
    on either side of it ("dog ' s" -> "dog's", "t - shirt" -> "t-shirt"), as training targets write them."""
    words: list[str] = []
    groups: list[list[int]] = []
    joins_next = False
    for index, piece in enumerate(pieces):
        joining = piece in JOINING_PIECES
        if words and (piece.startswith("##") or joining or joins_next):
            words[-1] += piece[2:] if piece.startswith("##") else piece
            groups[-1].append(index)
        else:
            words.append(piece)
            groups.append([index])
        joins_next = joining
    if not groups:
        return [], np.zeros((0,) + maps.shape[1:], dtype=np.float32)
    merged = np.stack([maps[g].mean(axis=0) for g in groups]).astype(np.float32)  # (words, gh, gw)
    merged /= merged.sum(axis=(1, 2), keepdims=True)
    return words, merged


def to_caption(model: CaptionerModel, token_ids: torch.Tensor, attention: torch.Tensor,
               logprob_sum: float, length: int) -> Caption:
    """One row of decoder output -> Caption; stops at the end token."""
    cfg = model.config
    ids = token_ids[:length].tolist()
    if ids and ids[-1] == cfg.eos_token_id:
        ids = ids[:-1]
    gh, gw = cfg.grid_size
    maps = attention[: len(ids)].float().cpu().numpy().reshape(len(ids), gh, gw)
    special = {cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id}
    keep = [i for i, token in enumerate(ids) if token not in special]
    pieces = model.tokenizer.convert_ids_to_tokens([ids[i] for i in keep])
    words, word_maps = merge_wordpieces(pieces, maps[keep])
    if cfg.heatmap_reading == "phrase":
        word_maps = phrase_maps(word_maps)  # (N, gh, gw): each word's map with its neighbours' (heatmap.py)
    if cfg.heatmap_offsets:  # each word's map moved back by its measured offset (training/heatmap_offsets.py)
        word_maps = recentre(word_maps, [cfg.heatmap_offsets.get(word, (0.0, 0.0)) for word in words])
    return Caption(
        text=" ".join(words), words=words, attention=word_maps,
        score=float(logprob_sum) / max(int(length), 1), token_ids=ids,
    )


def read_captions(model: CaptionerModel, pixel_values: torch.Tensor, token_ids: list[list[int]]) -> list[Caption]:
    """Teacher-forced: the Captions the model gives the given captions (token ids without [CLS] / [SEP], one list
    per image) on the preprocessed images (B, 3, S, S): their maps and scores, as `generate` reads its own."""
    cfg = model.config
    if len(token_ids) != pixel_values.shape[0]:
        raise ValueError(f"expected one token id list per image, got {len(token_ids)} for {pixel_values.shape[0]}")
    B, L = len(token_ids), max(len(ids) for ids in token_ids) + 1  # + the end token
    targets = torch.full((B, L), cfg.pad_token_id, dtype=torch.long)  # (B, L): each caption, then [SEP]
    for b, ids in enumerate(token_ids):
        targets[b, : len(ids) + 1] = torch.tensor([*ids, cfg.eos_token_id])
    lengths = torch.tensor([len(ids) + 1 for ids in token_ids])  # (B,)
    inputs = torch.cat([torch.full((B, 1), cfg.bos_token_id), targets[:, :-1]], dim=1)  # (B, L): [CLS] + prefix
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()  # (B, L)
    device = model.device
    inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            visual = model.encode(pixel_values.to(device))  # (B, P, D)
            hidden = model.decoder.hidden_states(inputs, visual, mask)  # (B, L, D)
            keys = model.decoder.attention_keys(visual)  # (B, P, A)
            fused, alpha, _ = model.decoder.head(hidden, keys, visual)  # (B, L, D), (B, L, P)
            logprobs = model.decoder.vocab_logits(fused).float().log_softmax(dim=-1)  # (B, L, V)
            chosen = logprobs.gather(2, targets[:, :, None])[:, :, 0] * mask  # (B, L)
            if cfg.grounded_heatmaps:
                alpha = model.decoder.ground_attention(alpha, visual, targets)  # (B, L, P)
    finally:
        if was_training:
            model.train()
    return [to_caption(model, targets[b], alpha[b], chosen[b].sum().item(), int(lengths[b])) for b in range(B)]


def generate(model: CaptionerModel, pixel_values: torch.Tensor, num_beams: int = 3, max_length: int = 30,
             length_penalty: float = 1.0, use_cache: bool = True, kernels: StepKernels | None = None,
             no_repeat_ngram_size: int = DEFAULT_NO_REPEAT_NGRAM_SIZE,
             repetition_penalty: float = DEFAULT_REPETITION_PENALTY) -> list[Caption]:
    """Encode and decode a batch of preprocessed images (B, 3, S, S) -> one Caption per image.
    no_repeat_ngram_size (0 = off) and repetition_penalty (1.0 = off): see the module docstring."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: load it with from_pretrained or build it with from_backbones")
    check_decoding_arguments(model, num_beams, max_length, no_repeat_ngram_size, repetition_penalty)
    control = dict(no_repeat_ngram_size=int(no_repeat_ngram_size), repetition_penalty=float(repetition_penalty))
    was_training = model.training
    if was_training:  # eval()/train() walk every module: only when needed
        model.eval()
    try:
        with torch.inference_mode():
            visual = model.encode(pixel_values)  # (B, P, D)
            if num_beams == 1:
                ids, alphas, sums, lengths = greedy_search(model, visual, max_length, use_cache, kernels, **control)
            else:
                ids, alphas, sums, lengths = beam_search(model, visual, num_beams, max_length, length_penalty,
                                                         use_cache, kernels, **control)
            if model.config.grounded_heatmaps:
                alphas = model.decoder.ground_attention(alphas, visual, ids)  # (B, L, P)
        return [to_caption(model, ids[i], alphas[i], sums[i].item(), lengths[i].item()) for i in range(len(ids))]
    finally:
        if was_training:
            model.train()


def longest_caption(model: CaptionerModel) -> int:
    """The most tokens a caption of this model can have: its decoder's positions, less the start token."""
    return model.config.max_position_embeddings - 1


def check_decoding_arguments(model: CaptionerModel, num_beams: int, max_length: int,
                             no_repeat_ngram_size: int = DEFAULT_NO_REPEAT_NGRAM_SIZE,
                             repetition_penalty: float = DEFAULT_REPETITION_PENALTY) -> None:
    """ValueError naming the first argument out of its range (before any image is read)."""
    if not 1 <= int(num_beams) <= 16:
        raise ValueError(f"num_beams must be between 1 and 16, got {num_beams}")
    if not 1 <= int(max_length) <= longest_caption(model):
        raise ValueError(f"max_length must be between 1 and {longest_caption(model)}, got {max_length}")
    check_repetition_control(no_repeat_ngram_size, repetition_penalty)


def check_repetition_control(no_repeat_ngram_size: int, repetition_penalty: float) -> None:
    """ValueError unless no_repeat_ngram_size is a whole number >= 0 and repetition_penalty a finite number > 0."""
    def number(value) -> bool:
        return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value)

    n = no_repeat_ngram_size
    if not (number(n) and n >= 0 and int(n) == n):
        raise ValueError(f"no_repeat_ngram_size must be a whole number >= 0 (0 = off), got {no_repeat_ngram_size!r}")
    if not (number(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 = off), got {repetition_penalty!r}")

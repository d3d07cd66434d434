"""The one place that reads transformers' BERT from the inside: what the one-token step (cached_step.py) and the
int8 fast mode (cpu/int8.py) need of a `BertModel` beyond its documented `forward`.

Every module is found by its path in BERT's state dict (`encoder.layer.{i}.attention.self.query`, ...): the names
every BERT checkpoint on the Hub is saved under, so they outlive any release. Sizes come from `BertConfig`
(documented). Nothing here calls the `forward` of a transformers submodule: their signatures are private and move
(transformers 5.24 renamed `BertEmbeddings.forward`'s `past_key_values_length` to `cache_length`, and every
fresh install broke). The embedding of a token at a position is computed here, as BERT defines it.

tests/test_fast_inference.py compares the step built from these parts with `BertModel.forward` (and its own KV
cache); `.ci/run` runs it on the oldest and the newest transformers that pyproject.toml allows.

Shape legend: N rows, T tokens, D hidden, H heads, dh head size.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BertLayerParts:
    """The modules of one BERT decoder layer (`BertLayer` with cross-attention), by their state-dict names."""

    query: nn.Module  # attention.self.query: (N, T, D) -> (N, T, D)
    key: nn.Module  # attention.self.key
    value: nn.Module  # attention.self.value
    self_out: nn.Module  # attention.output.dense
    self_norm: nn.Module  # attention.output.LayerNorm
    cross_query: nn.Module  # crossattention.self.query
    cross_key: nn.Module  # crossattention.self.key: applied to the visual tokens
    cross_value: nn.Module  # crossattention.self.value
    cross_out: nn.Module  # crossattention.output.dense
    cross_norm: nn.Module  # crossattention.output.LayerNorm
    ffn_in: nn.Module  # intermediate.dense: (N, T, D) -> (N, T, F)
    act: nn.Module  # intermediate.intermediate_act_fn
    ffn_out: nn.Module  # output.dense: (N, T, F) -> (N, T, D)
    ffn_norm: nn.Module  # output.LayerNorm


def layer_parts(layer: nn.Module) -> BertLayerParts:
    """The parts of `bert.encoder.layer[i]` (a decoder layer: it must have cross-attention)."""
    attention, cross = layer.attention, getattr(layer, "crossattention", None)
    if cross is None:
        raise ValueError("expected a BERT decoder layer with cross-attention (add_cross_attention=True), got one "
                         "without `crossattention`")
    return BertLayerParts(
        query=attention.self.query, key=attention.self.key, value=attention.self.value,
        self_out=attention.output.dense, self_norm=attention.output.LayerNorm,
        cross_query=cross.self.query, cross_key=cross.self.key, cross_value=cross.self.value,
        cross_out=cross.output.dense, cross_norm=cross.output.LayerNorm,
        ffn_in=layer.intermediate.dense, act=layer.intermediate.intermediate_act_fn,
        ffn_out=layer.output.dense, ffn_norm=layer.output.LayerNorm,
    )


def decoder_layers(bert: nn.Module) -> list[BertLayerParts]:
    """The parts of every layer of a `BertModel`, first layer first."""
    return [layer_parts(layer) for layer in bert.encoder.layer]


def encoder_layers(bert: nn.Module) -> nn.Module:
    """The module holding the layers (`bert.encoder`): what the int8 mode quantises in place."""
    return bert.encoder


@dataclass(frozen=True)
class HeadShape:
    """How BERT splits its hidden size into attention heads (from the config)."""

    heads: int  # H
    head_size: int  # dh = D / H

    @property
    def scaling(self) -> float:
        """BERT's scaled dot-product attention: scores are q.k / sqrt(dh)."""
        return self.head_size ** -0.5


def head_shape(bert: nn.Module) -> HeadShape:
    config = bert.config
    return HeadShape(config.num_attention_heads, config.hidden_size // config.num_attention_heads)


class TokenEmbedder:
    """BERT's input embedding of tokens at given positions: LayerNorm(word + position + token type 0).

    Computed from the embedding tables (`embeddings.word_embeddings`, `.position_embeddings`,
    `.token_type_embeddings`, `.LayerNorm`) rather than by calling `BertEmbeddings.forward`, whose signature moves;
    dropout is left out (the step serves eval mode only).
    """

    def __init__(self, bert: nn.Module):
        embeddings = bert.embeddings
        self.word = embeddings.word_embeddings.weight  # (V, D)
        self.position = embeddings.position_embeddings.weight  # (max_positions, D)
        self.type0 = embeddings.token_type_embeddings.weight[0]  # (D,): captions are one segment
        norm = embeddings.LayerNorm
        self.norm_shape, self.norm_weight, self.norm_bias, self.norm_eps = (
            norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def __call__(self, token_ids: torch.Tensor, start: int) -> torch.Tensor:
        """token_ids (N, T) at positions start..start+T-1 -> (N, T, D)."""
        T = token_ids.shape[1]
        if start + T > self.position.shape[0]:
            raise ValueError(f"position {start + T - 1} is past the decoder's {self.position.shape[0]} positions "
                             "(max_position_embeddings)")
        x = self.word[token_ids] + (self.position[start:start + T] + self.type0)  # (N, T, D)
        return torch.nn.functional.layer_norm(x, self.norm_shape, self.norm_weight, self.norm_bias, self.norm_eps)


def forward_with_cache(bert: nn.Module, input_ids: torch.Tensor, visual: torch.Tensor, cache=None):
    """`BertModel.forward` on new tokens with transformers' own KV cache (what the step is tested against):
    input_ids (N, T), visual (N, P, D), the cache it returned last time (None at first) -> hidden (N, T, D), cache.

    transformers 5.25 renamed the argument and the output field `past_key_values` to `cache` (the old name warns
    until 5.40); each version's documented name is used.
    """
    name = "cache" if "cache" in inspect.signature(bert.forward).parameters else "past_key_values"
    out = bert(input_ids=input_ids, encoder_hidden_states=visual, use_cache=True, **{name: cache})
    return out.last_hidden_state, getattr(out, name)

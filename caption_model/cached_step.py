"""The one-token step of the BERT decoder with a KV cache: the fast path of decoding.

It computes what `BertModel.forward` computes in eval mode for the newest token (one query needs no causal mask),
as straight-line functional calls on the layers' own weights (found through `bert_parts`, the one adapter to
transformers' internals): walking the HF modules (a dozen nested `nn.Module`
calls per layer and token) costs more than the attention itself on a CPU. Whatever a layer holds (fp32
`nn.Linear`, the int8 linears of the fast CPU mode, anything else callable) is used as is: only its call is made
cheaper. A fast mode may also hand over `StepKernels`: faster stand-ins for parts of the step.

Shape legend: N rows (images x beams), t tokens so far, H heads, dh head size, D hidden, P grid cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .bert_parts import BertLayerParts, HeadShape, TokenEmbedder, decoder_layers, head_shape

Fn = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class HasFunctional(Protocol):
    """A layer that can hand out its computation as a plain function (the fast mode's int8 linears)."""

    def functional(self) -> Fn: ...


@dataclass
class StepKernels:
    """What a fast mode (caption_model.cpu) replaces in the one-token step; None keeps the model's own."""

    qkv: list[Fn] | None = None  # per layer: (N, 1, D) -> (N, 1, 3D), query, key and value in one call
    vocab_logits: Fn | None = None  # (N, D) -> (N, V): the tied output projection


def fast_call(module: nn.Module) -> Fn:
    """The cheapest callable equal to `module(x)` for the modules a BERT layer holds."""
    if isinstance(module, HasFunctional):
        return module.functional()
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    if type(module) is nn.LayerNorm:
        shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
        return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    act = getattr(module, "act", None)  # transformers' GELUActivation wraps F.gelu
    if act is F.gelu:
        return F.gelu
    return module


@dataclass
class LayerStep:
    """One BERT layer's weights as plain callables, for one new token."""

    heads: int
    head_size: int
    scaling: float  # of the attention scores, self and cross: 1 / sqrt(dh)
    qkv: Fn | None  # (N, 1, D) -> (N, 1, 3D): q, k, v in one call (StepKernels.qkv), else the three below
    query: Fn
    key: Fn
    value: Fn
    self_out: Fn  # dense after self-attention
    self_norm: Fn
    cross_query: Fn
    cross_out: Fn
    cross_norm: Fn
    ffn_in: Fn
    act: Fn
    ffn_out: Fn
    ffn_norm: Fn

    @classmethod
    def of(cls, parts: BertLayerParts, shape: HeadShape, qkv: Fn | None = None) -> "LayerStep":
        return cls(
            heads=shape.heads, head_size=shape.head_size, scaling=shape.scaling,
            qkv=qkv,
            query=fast_call(parts.query), key=fast_call(parts.key), value=fast_call(parts.value),
            self_out=fast_call(parts.self_out), self_norm=fast_call(parts.self_norm),
            cross_query=fast_call(parts.cross_query),
            cross_out=fast_call(parts.cross_out), cross_norm=fast_call(parts.cross_norm),
            ffn_in=fast_call(parts.ffn_in), act=fast_call(parts.act),
            ffn_out=fast_call(parts.ffn_out), ffn_norm=fast_call(parts.ffn_norm),
        )

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, H*dh) -> (N, H, T, dh)."""
        N, T, _ = x.shape
        return x.view(N, T, self.heads, self.head_size).transpose(1, 2)

    def __call__(self, x: torch.Tensor, cache: list, cross_k: torch.Tensor, cross_v: torch.Tensor) -> torch.Tensor:
        """x (N, 1, D), cache [K, V] of this layer ((N, H, t, dh) each, or None at the first token; updated in
        place), cross_k / cross_v (N, H, P, dh) -> (N, 1, D)."""
        N, _, D = x.shape
        if self.qkv is not None:
            q, k, v = self.qkv(x).view(N, 1, 3, self.heads, self.head_size).permute(2, 0, 3, 1, 4)  # 3x (N,H,1,dh)
        else:
            q, k, v = self.split_heads(self.query(x)), self.split_heads(self.key(x)), self.split_heads(self.value(x))
        if cache[0] is not None:
            k = torch.cat([cache[0], k], dim=2)  # (N, H, t+1, dh)
            v = torch.cat([cache[1], v], dim=2)
        cache[0], cache[1] = k, v
        a = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)  # (N, H, 1, dh)
        x = self.self_norm(self.self_out(a.transpose(1, 2).reshape(N, 1, D)) + x)  # dense + residual + LayerNorm
        q = self.split_heads(self.cross_query(x))  # (N, H, 1, dh)
        a = F.scaled_dot_product_attention(q, cross_k, cross_v, scale=self.scaling)  # (N, H, 1, dh)
        x = self.cross_norm(self.cross_out(a.transpose(1, 2).reshape(N, 1, D)) + x)
        return self.ffn_norm(self.ffn_out(self.act(self.ffn_in(x))) + x)  # feed-forward + residual + LayerNorm


class CachedBertDecoder:
    """A BERT decoder run one token at a time for N rows: per-layer self-attention KV cache, cross-attention keys
    and values of the visual tokens computed once per image and shared by its beams."""

    def __init__(self, bert: nn.Module, visual: torch.Tensor, num_beams: int = 1, qkv: list[Fn] | None = None):
        """visual (B, P, D) -> ready for rows N = B * num_beams (each image's row repeated for its beams);
        qkv: StepKernels.qkv, one fused projection per layer."""
        shape = head_shape(bert)
        parts = decoder_layers(bert)
        self.embed = TokenEmbedder(bert)
        self.layers = [LayerStep.of(p, shape, qkv[i] if qkv else None) for i, p in enumerate(parts)]
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer K, V (N, H, P, dh)
        for p, step in zip(parts, self.layers):
            self.cross.append((repeat_rows(step.split_heads(p.cross_key(visual)), num_beams),
                               repeat_rows(step.split_heads(p.cross_value(visual)), num_beams)))
        self.cache: list[list[torch.Tensor | None]] = [[None, None] for _ in self.layers]  # self K, V (N, H, t, dh)
        self.length = 0  # tokens in the cache

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids (N, 1), the newest token of every row -> its last hidden state (N, 1, D)."""
        x = self.embed(token_ids, start=self.length)  # (N, 1, D)
        for step, cache, (cross_k, cross_v) in zip(self.layers, self.cache, self.cross):
            x = step(x, cache, cross_k, cross_v)
        self.length += 1
        return x

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (N,) in this order. Cross-attention K/V are the same for every beam of an image."""
        self.cache = [[k.index_select(0, rows), v.index_select(0, rows)] if k is not None else [None, None]
                      for k, v in self.cache]


def repeat_rows(x: torch.Tensor, num_beams: int) -> torch.Tensor:
    """(B, ...) -> (B*K, ...): every image's row repeated for its K beams."""
    return x if num_beams == 1 else x.repeat_interleave(num_beams, dim=0)

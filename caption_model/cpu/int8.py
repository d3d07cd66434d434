"""The decoder's per-token weights as int8 (dynamic quantisation: int8 weights, activations quantised per call).

Every BERT Linear and the fusion MLP are swapped for int8 linears in place; the fast step also gets a fused q/k/v
projection per layer and an int8 copy of the tied output projection (StepKernels). The additive attention (the
heatmap) and the once-per-image parts stay fp32.

torch announced `torch.ao.quantization` for removal (its successor is torchao); `_torch_dynamic_quantization` is
the one place that touches it, and tests/test_fast_inference.py fails loudly the day it is gone.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from ..cached_step import Fn, StepKernels
from ..modeling import FusionDecoder


def _torch_dynamic_quantization():
    """(quantize_dynamic, per_channel_dynamic_qconfig, the dynamic int8 Linear class) from torch.ao."""
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    return quantize_dynamic, per_channel_dynamic_qconfig, DynamicLinear


@functools.cache
def int8_linear_class(full_range: bool) -> type:
    """torch's dynamic int8 Linear that can hand out its computation as a plain function. full_range: 8-bit
    activations, safe only with VNNI (int32 accumulation); without it torch keeps 7 bits ("reduce_range") so
    that older int8 instructions cannot saturate."""
    _, _, DynamicLinear = _torch_dynamic_quantization()
    reduce_range = not full_range

    class Int8Linear(DynamicLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=reduce_range)

        def functional(self) -> Fn:
            """This layer as a plain function, fp32 in and out (what the cached decoding step calls)."""
            packed, linear = self._packed_params._packed_params, torch.ops.quantized.linear_dynamic
            return lambda x: linear(x, packed, reduce_range=reduce_range)

    Int8Linear.__name__ = Int8Linear.__qualname__ = "Int8Linear" + ("" if full_range else "ReducedRange")
    return Int8Linear


def quantize_decoder(decoder: FusionDecoder, full_range: bool) -> StepKernels:
    """In place: the decoder's per-token Linear layers become int8. Returns the int8 kernels of the fast step."""
    quantize_dynamic, qconfig, _ = _torch_dynamic_quantization()
    spec = {nn.Linear: qconfig}  # one scale per output row: closer to fp32 than one per tensor
    mapping = {nn.Linear: int8_linear_class(full_range)}

    def int8_copy(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
        linear = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
        linear.weight, linear.bias = nn.Parameter(weight.detach().clone()), nn.Parameter(bias.detach().clone())
        return quantize_dynamic(nn.Sequential(linear), spec, mapping=mapping)[0]

    with warnings.catch_warnings():  # torch.ao's deprecation notices, once per quantised layer
        warnings.simplefilter("ignore")
        qkv = []
        for layer in decoder.bert.encoder.layer:  # rows of query, key, value stacked: (3D, D)
            a = layer.attention.self
            stacked = int8_copy(torch.cat([a.query.weight, a.key.weight, a.value.weight]),
                                torch.cat([a.query.bias, a.key.bias, a.value.bias]))
            qkv.append(stacked.functional())  # per-row scales: the same numbers as three separate calls
        vocab = int8_copy(decoder.bert.embeddings.word_embeddings.weight, decoder.output_bias)  # (V, D), tied
        quantize_dynamic(decoder.bert.encoder, spec, mapping=mapping, inplace=True)
        quantize_dynamic(decoder.head.fuse, spec, mapping=mapping, inplace=True)
    return StepKernels(qkv=qkv, vocab_logits=vocab.functional())

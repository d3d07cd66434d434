"""The decoder's per-token weights in low precision: int8 for the bulk, exact where the word is chosen.

Every BERT Linear becomes a dynamic int8 linear (int8 weights, one scale per output row; activations quantised to
8 bits per call). Where outputs decide between close words, int8 alone flips a few percent of captions
(benchmarks/int8_quality.py), so: the tied vocabulary projection runs in int8 and then recomputes its best
candidates' logits in fp32 (`RefinedVocabLogits`), and the small fusion MLP keeps fp16 weights (fbgemm's fp16
GEMM, fp32 activations). The additive attention (the heatmap) and the once-per-image parts stay fp32.

Weight bits: with AVX512-VNNI, u8 x s8 products accumulate straight into int32, so weights use all 8 bits. Without
it (AVX2, AVX-512 without VNNI) fbgemm sums pairs of products in int16 first (vpmaddubsw), which saturates for
8-bit activations x 8-bit weights; 7-bit weights (|w| <= 64) keep 2 x 255 x 64 < 2^15, so activations keep their
8 bits (the activations carry BERT's outliers: their precision matters more than the weights', which have a scale
per row).

torch announced `torch.ao.quantization` and the fbgemm fp16 ops for removal (the successor is torchao);
`_torch_low_precision_ops` is the one place that touches them, and tests/test_fast_inference.py fails loudly the
day they are gone.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..bert_parts import decoder_layers, encoder_layers
from ..cached_step import Fn, StepKernels
from ..modeling import FusionDecoder

# fbgemm's fp16 ops say "deprecated" (C++ TORCH_WARN) on their first call; the notice is for us, not for users
warnings.filterwarnings("ignore", message=r"fbgemm_.*is deprecated", category=UserWarning)

VNNI_WEIGHT_BITS = 8
REFINED_WORDS = 8  # candidates per row whose logits the fast mode recomputes in fp32
NO_VNNI_WEIGHT_BITS = 7


def _torch_low_precision_ops() -> dict[str, Any]:
    """torch's deprecated int8 / fp16 linear API in one place: the dynamic int8 Linear class, quantize_dynamic,
    its qconfig parts, and fbgemm's fp16-weight pack and GEMM."""
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import PerChannelMinMaxObserver, PlaceholderObserver, QConfig, quantize_dynamic
    return {"DynamicLinear": DynamicLinear, "quantize_dynamic": quantize_dynamic, "QConfig": QConfig,
            "PerChannelMinMaxObserver": PerChannelMinMaxObserver, "PlaceholderObserver": PlaceholderObserver,
            "pack_fp16": torch.fbgemm_pack_gemm_matrix_fp16,
            "linear_fp16": torch.fbgemm_linear_fp16_weight_fp32_activation}


def int8_qconfig(weight_bits: int):
    """Per-row symmetric int8 weights in [-2^(bits-1), 2^(bits-1) - 1]; 8-bit dynamic activations."""
    ops = _torch_low_precision_ops()
    limit = 2 ** (weight_bits - 1)
    weight = ops["PerChannelMinMaxObserver"].with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-limit, quant_max=limit - 1)
    activation = ops["PlaceholderObserver"].with_args(dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True)
    return ops["QConfig"](activation=activation, weight=weight)


def _int8_linear_class() -> type:
    """torch's dynamic int8 Linear with full 8-bit activations that can hand out its computation as a function."""
    DynamicLinear = _torch_low_precision_ops()["DynamicLinear"]

    class Int8Linear(DynamicLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)

        def functional(self) -> Fn:
            """This layer as a plain function, fp32 in and out (what the cached decoding step calls)."""
            packed, linear = self._packed_params._packed_params, torch.ops.quantized.linear_dynamic
            return lambda x: linear(x, packed, reduce_range=False)

    return Int8Linear


class Fp16Linear(nn.Module):
    """A Linear with fp16 weights (fbgemm's packed fp16 GEMM), fp32 in and out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        ops = _torch_low_precision_ops()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._packed = ops["pack_fp16"](weight.detach().float().contiguous())  # (out, in) as fp16, packed
        self._bias = bias.detach().float().clone()
        self._linear = ops["linear_fp16"]
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self._packed, self._bias)

    def functional(self) -> Fn:
        linear, packed, bias = self._linear, self._packed, self._bias
        return lambda x: linear(x, packed, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16"


class RefinedVocabLogits:
    """Logits over the vocabulary from the int8 projection, the `k` largest per row recomputed in fp32 from the
    model's own (tied, kept anyway) weights: the words decoding chooses between score as in fp32, the rest only
    enter the softmax's normaliser. Costs k dot products per row; reads a quarter of fp32's bytes."""

    def __init__(self, approximate: Fn, weight: torch.Tensor, bias: torch.Tensor, k: int = REFINED_WORDS):
        self.approximate = approximate  # (N, D) -> (N, V): the int8 projection
        self.weight, self.bias, self.k = weight, bias, k  # (V, D), (V,): the fp32 projection

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, V)."""
        out = self.approximate(x)
        top = out.topk(self.k, dim=-1).indices  # (N, k)
        exact = torch.einsum("nd,nkd->nk", x, self.weight[top]) + self.bias[top]  # (N, k): fp32 logits of these
        return out.scatter_(-1, top, exact)


def quantize_decoder(decoder: FusionDecoder, weight_bits: int = VNNI_WEIGHT_BITS) -> StepKernels:
    """In place: the decoder's BERT Linear layers become int8 (`weight_bits` 8 with VNNI, 7 without), the fusion
    MLP's fp16. Returns the kernels of the fast step: fused int8 q/k/v per layer and the fp16 vocabulary projection."""
    if weight_bits not in (VNNI_WEIGHT_BITS, NO_VNNI_WEIGHT_BITS):
        raise ValueError(f"weight_bits must be 8 (VNNI) or 7 (no VNNI), got {weight_bits}")
    ops = _torch_low_precision_ops()
    spec, mapping = {nn.Linear: int8_qconfig(weight_bits)}, {nn.Linear: _int8_linear_class()}
    quantize = ops["quantize_dynamic"]

    def int8_copy(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
        linear = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
        linear.weight, linear.bias = nn.Parameter(weight.detach().clone()), nn.Parameter(bias.detach().clone())
        return quantize(nn.Sequential(linear), spec, mapping=mapping)[0]

    with warnings.catch_warnings():  # torch.ao's deprecation notices, once per quantised layer
        warnings.simplefilter("ignore")
        qkv = []
        for a in decoder_layers(decoder.bert):  # rows of query, key, value stacked: (3D, D)
            stacked = int8_copy(torch.cat([a.query.weight, a.key.weight, a.value.weight]),
                                torch.cat([a.query.bias, a.key.bias, a.value.bias]))
            qkv.append(stacked.functional())  # per-row scales: the same numbers as three separate calls
        embeddings = decoder.bert.get_input_embeddings().weight  # (V, D), tied to the output projection
        vocab = RefinedVocabLogits(int8_copy(embeddings, decoder.output_bias).functional(), embeddings,
                                     decoder.output_bias)
        quantize(encoder_layers(decoder.bert), spec, mapping=mapping, inplace=True)
        for i, module in enumerate(decoder.head.fuse):
            if isinstance(module, nn.Linear):
                decoder.head.fuse[i] = Fp16Linear(module.weight, module.bias)
    return StepKernels(qkv=qkv, vocab_logits=vocab)

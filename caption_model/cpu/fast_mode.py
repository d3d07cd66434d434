"""The fast CPU inference mode: which one this CPU gets, and putting it together on a model.

    int8-vnni  int8 decoder with 8-bit weights (needs AVX512-VNNI), fp16 word-choosing layers, fused ResNet graph
    int8-avx2  the same with 7-bit weights: any x86-64 CPU (AVX2, AVX-512 without VNNI), no int16 saturation
    fp32       the weights as trained: asked for, or no int8 engine (ARM: Apple silicon, Graviton)
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from ..cached_step import StepKernels
from ..modeling import CaptionerModel
from .encoder_graph import FusedEncoder, compile_encoder
from .features import has_native_bf16, has_vnni, is_x86, usable_flags
from .int8 import NO_VNNI_WEIGHT_BITS, VNNI_WEIGHT_BITS, quantize_decoder

FAST_MODES = ("int8-vnni", "int8-avx2", "fp32")
REQUESTS = ("auto",) + FAST_MODES


@dataclass(frozen=True)
class FastModeChoice:
    """The mode a model gets on this CPU and why (shown by /health and the app's footer)."""

    mode: str  # one of FAST_MODES
    reason: str
    warning: str | None = None  # set when the choice is worse than it could be (no int8 engine, a forced mode)


def int8_available(machine: str | None = None) -> bool:
    """The int8 mode needs fbgemm, torch's x86-64 int8 engine; ARM (Apple silicon, Graviton) has none."""
    return is_x86(machine) and "fbgemm" in torch.backends.quantized.supported_engines


def choose_fast_mode(requested: str = "auto", flags: frozenset[str] | None = None,
                     machine: str | None = None) -> FastModeChoice:
    """The fast mode for a CPU with these `flags` (default: this one's, as torch may use them) and `machine`
    (platform.machine()); `requested` overrides "auto" (FAST_MODES)."""
    if requested not in REQUESTS:
        raise ValueError(f"fast mode must be one of {', '.join(REQUESTS)}; got {requested!r}")
    flags = usable_flags(flags)
    if requested == "fp32":
        return FastModeChoice("fp32", "asked for: the weights as trained")
    if not int8_available(machine):
        name = machine or platform.machine()
        return FastModeChoice("fp32", f"no int8 engine on {name} (fbgemm is x86-64 only)",
                              warning=f"int8 fast mode unavailable on this CPU ({name}: no fbgemm); serving fp32")
    if requested == "int8-vnni" and not has_vnni(flags):
        return FastModeChoice("int8-vnni", "asked for", warning="int8-vnni asked for on a CPU without AVX512-VNNI: "
                              "its int16 sums saturate and captions will differ from fp32; int8-avx2 is the safe mode")
    if requested != "auto":
        return FastModeChoice(requested, "asked for")
    if has_vnni(flags):
        return FastModeChoice("int8-vnni", "AVX512-VNNI: 8-bit int8 weights")
    return FastModeChoice("int8-avx2", "no AVX512-VNNI: 7-bit int8 weights, so int16 sums cannot saturate")


def apply_fast_mode(model: CaptionerModel, mode: str, encoder_bf16: bool | None = False,
                    flags: frozenset[str] | None = None) -> tuple[FusedEncoder, StepKernels]:
    """In place on `model.decoder` for an int8 `mode` (its Linear layers become int8 / fp16); returns the fused
    encoder that replaces `model.encoder` and the kernels of the fast decoding step. encoder_bf16: run the ResNet
    in bf16 (None: where the CPU has native bf16)."""
    if mode not in ("int8-vnni", "int8-avx2"):
        raise ValueError(f"apply_fast_mode builds the int8 modes (int8-vnni, int8-avx2), got {mode!r}")
    if model.device.type != "cpu":
        raise ValueError(f"the int8 fast mode runs on CPU; this model is on {model.device}")
    model.eval()
    bits = VNNI_WEIGHT_BITS if mode == "int8-vnni" else NO_VNNI_WEIGHT_BITS
    kernels = quantize_decoder(model.decoder, weight_bits=bits)
    bf16 = has_native_bf16(usable_flags(flags)) if encoder_bf16 is None else encoder_bf16
    encoder = compile_encoder(model.encoder, bf16=bf16)
    return encoder, kernels

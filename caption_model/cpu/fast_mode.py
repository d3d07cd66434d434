"""The fast CPU inference mode, put together on a model: int8 decoder + fused ResNet graph."""

from __future__ import annotations

import torch

from ..cached_step import StepKernels
from ..modeling import CaptionerModel
from .encoder_graph import FusedEncoder, compile_encoder
from .features import cpu_flags, has_native_bf16, has_vnni, is_x86
from .int8 import quantize_decoder


def int8_available(machine: str | None = None) -> bool:
    """The int8 mode needs fbgemm, torch's x86-64 int8 engine; ARM (Apple silicon, Graviton) has none."""
    return is_x86(machine) and "fbgemm" in torch.backends.quantized.supported_engines


def apply_int8(model: CaptionerModel, encoder_bf16: bool | None = False,
               flags: frozenset[str] | None = None) -> tuple[FusedEncoder, StepKernels]:
    """In place on `model.decoder` (its Linear layers become int8); returns the fused encoder that replaces
    `model.encoder` and the kernels of the fast decoding step. flags: the CPU's (default: this machine's);
    encoder_bf16: run the ResNet in bf16 (None: where the CPU has native bf16)."""
    if model.device.type != "cpu":
        raise ValueError(f"the int8 fast mode runs on CPU; this model is on {model.device}")
    flags = cpu_flags() if flags is None else flags
    model.eval()
    kernels = quantize_decoder(model.decoder, full_range=has_vnni(flags))
    bf16 = has_native_bf16(flags) if encoder_bf16 is None else encoder_bf16
    encoder = compile_encoder(model.encoder, bf16=bf16)
    return encoder, kernels

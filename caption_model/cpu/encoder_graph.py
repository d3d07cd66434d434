"""The ResNet trunk for CPU inference: BatchNorm folded into the convolutions, channels-last weights (oneDNN's
native layout), traced into one frozen TorchScript graph that oneDNN Graph runs with fused kernels
(convolution + ReLU, convolution + residual add + ReLU). Same grid as the eager encoder to float rounding.

Shape legend: B batch, S input side, C channels, gh/gw grid.
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..modeling import ImageEncoder


class _OneDNNFusion:
    """TorchScript's oneDNN Graph fusion switched on while any thread is inside, and back to what it was when the
    last one leaves (the switch is process-global; save/restore per caller would leak it under concurrency)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._was_enabled = False

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._was_enabled = torch.jit.onednn_fusion_enabled()
                torch.jit.enable_onednn_fusion(True)
            self._inside += 1

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                torch.jit.enable_onednn_fusion(self._was_enabled)


ONEDNN_FUSION = _OneDNNFusion()
WARM_CALLS = 3  # calls after which TorchScript runs a new input shape on its optimised graph: profile, optimise, run


class FusedEncoder(nn.Module):
    """Inference-only stand-in for `ImageEncoder`: (B, 3, S, S) float pixels -> fp32 grid (B, C, gh, gw).

    The weights are frozen into the graph (no parameters, no state_dict keys): rebuild it with `compile_encoder`
    after changing them.
    """

    def __init__(self, graph: torch.jit.ScriptModule, dtype: torch.dtype,
                 warmed: set[tuple[int, ...]] = frozenset()):
        super().__init__()
        object.__setattr__(self, "graph", graph)  # not a submodule: no .to()/.train() walk through the graph
        self.dtype = dtype
        self.warmed = set(warmed)  # input shapes the graph is optimised for

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.dtype, memory_format=torch.channels_last)
        with ONEDNN_FUSION:
            self.warm(pixel_values)
            return self.graph(pixel_values).float()

    def warm(self, pixel_values: torch.Tensor) -> None:
        """Run the graph on zeros of a shape it has not seen yet. TorchScript profiles a graph on its first calls
        with a new input shape (unfused kernels, slightly other numbers) and optimises it after; warmed first, an
        image's features never depend on how many batches of its size came before it, so the same images get the
        same captions whichever process or order captions them (caption-images on several processes)."""
        shape = tuple(pixel_values.shape)
        if shape not in self.warmed:
            zeros = torch.zeros_like(pixel_values)
            for _ in range(WARM_CALLS):
                self.graph(zeros)
            self.warmed.add(shape)


def fold_batchnorms(encoder: ImageEncoder) -> None:
    """In place, inference only: every BatchNorm folded into the convolution before it (then an Identity)."""
    encoder.eval()
    pairs = [(encoder.stem, "conv1", "bn1")]
    for stage in encoder.stages()[1:]:
        for block in stage:
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for parent, conv, bn in pairs:
        setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
        setattr(parent, bn, nn.Identity())


def compile_encoder(encoder: ImageEncoder, bf16: bool = False) -> FusedEncoder:
    """`encoder` (consumed: its BatchNorms are folded in place) -> a FusedEncoder. bf16: weights and activations
    in bf16, worth it only where the CPU has AMX / AVX512-BF16 (see features.has_native_bf16).

    TorchScript optimises a graph on its second or third call with a new input shape; the batch-1 shape is run
    here, so the first caption does not wait for it."""
    fold_batchnorms(encoder)
    dtype = torch.bfloat16 if bf16 else torch.float32
    encoder.to(dtype=dtype, memory_format=torch.channels_last)
    trunk = nn.Sequential(*encoder.stages()).eval()
    side = encoder.config.image_size
    example = torch.zeros(1, 3, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), warnings.catch_warnings(), ONEDNN_FUSION:
        warnings.simplefilter("ignore")  # TorchScript's maintenance-mode notices
        graph = torch.jit.freeze(torch.jit.trace(trunk, example, check_trace=False))
        for _ in range(WARM_CALLS):
            graph(example)
    return FusedEncoder(graph, dtype, warmed={tuple(example.shape)})

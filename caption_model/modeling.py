"""ImageCaptioner: ResNet-50 grid -> visual tokens -> causal BERT with cross-attention -> fusion head.

Read top to bottom, smallest part first. Shape legend: B batch, T tokens, P grid cells (gh*gw), D hidden,
C encoder channels, V vocabulary, S input side in pixels, A additive-attention width.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from huggingface_hub import PyTorchModelHubMixin, snapshot_download
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from .config import ENCODER_STAGES, CaptionerConfig
from .processing import ImageInput, load_image

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


# ---------------------------------------------------------------------------------------------------------
# Image encoder
# ---------------------------------------------------------------------------------------------------------
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


_ONEDNN_FUSION = _OneDNNFusion()


class ImageEncoder(nn.Module):
    """ResNet-50 trunk up to `config.encoder_stage`, without avgpool/fc: (B, 3, S, S) -> (B, C, gh, gw).

    The stages before the first trainable one form the *frozen prefix*: always in eval mode, no gradients, and
    its output (`frozen_features`) is what a feature cache stores.
    """

    graph: torch.jit.ScriptModule | None = None  # set by compile_graph (fast CPU inference)

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config
        resnet = torchvision.models.resnet50(weights=None)  # architecture only; weights come from from_backbones
        self.stage_names = ["stem"] + list(ENCODER_STAGES[: ENCODER_STAGES.index(config.encoder_stage) + 1])
        self.stem = nn.Sequential(
            OrderedDict(conv1=resnet.conv1, bn1=resnet.bn1, relu=resnet.relu, maxpool=resnet.maxpool)
        )
        for name in self.stage_names[1:]:
            setattr(self, name, getattr(resnet, name))
        trainable = set(config.encoder_trainable)
        first_trainable = next((i for i, n in enumerate(self.stage_names) if n in trainable), len(self.stage_names))
        self.num_frozen_stages = first_trainable
        for name in self.stage_names:
            getattr(self, name).requires_grad_(name in trainable)

    def stages(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.stage_names]

    def load_torchvision_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy weights from a torchvision resnet50 state dict (keys conv1.*, bn1.*, layerN.*)."""
        mapped = {}
        for key, value in state_dict.items():
            if key.startswith(("conv1.", "bn1.")):
                mapped["stem." + key] = value
            elif key.split(".")[0] in self.stage_names:
                mapped[key] = value
        self.load_state_dict(mapped, strict=True)

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        for stage in self.stages():  # frozen stages keep their BatchNorm statistics
            if not any(p.requires_grad for p in stage.parameters()):
                stage.eval()
        return self

    def frozen_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> output of the frozen prefix (B, C', h', w'); the input itself when nothing is frozen."""
        x = pixel_values
        with torch.no_grad():
            for stage in self.stages()[: self.num_frozen_stages]:
                x = stage(x)
        return x

    def forward_from_frozen(self, features: torch.Tensor) -> torch.Tensor:
        """Output of the frozen prefix -> final grid (B, C, gh, gw)."""
        x = features
        for stage in self.stages()[self.num_frozen_stages :]:
            x = stage(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float pixels -> fp32 grid (B, C, gh, gw), whatever precision the weights are in."""
        weight = self.stem.conv1.weight
        if weight.dtype != pixel_values.dtype or weight.is_contiguous(memory_format=torch.channels_last):
            # fuse_for_inference / to_bfloat16: channels-last input in the weights' dtype
            pixel_values = pixel_values.to(weight.dtype, memory_format=torch.channels_last)
        if self.graph is not None:  # compile_graph: the whole trunk in one oneDNN-fused graph
            with _ONEDNN_FUSION:
                return self.graph(pixel_values).float()
        return self.forward_from_frozen(self.frozen_features(pixel_values)).float()

    def fuse_for_inference(self) -> None:
        """Inference only, same outputs to float rounding: every BatchNorm folded into its convolution and the
        weights in channels-last layout (oneDNN's native layout). ResNet-50 at 224 px, one thread, this machine:
        93 -> 82 ms eagerly; compile_graph then fuses further."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        self.eval()
        pairs = [(self.stem, "conv1", "bn1")]
        for name in self.stage_names[1:]:
            for block in getattr(self, name):
                pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
                if block.downsample is not None:
                    pairs.append((block.downsample, "0", "1"))
        for parent, conv, bn in pairs:
            setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
            setattr(parent, bn, nn.Identity())
        self.to(memory_format=torch.channels_last)

    def compile_graph(self) -> None:
        """Inference only, after fuse_for_inference (and to_bfloat16, if wanted): the trunk traced into one frozen
        TorchScript graph that oneDNN Graph runs with fused kernels (convolution + ReLU, + residual add). Same
        outputs to float rounding; ResNet-50 at 224 px on this machine: 48 -> 30 ms (2 threads), 84 -> 58 ms
        (1 thread). The weights are frozen into the graph: after changing them, call this again. TorchScript
        optimises a graph on its second or third call with a new input shape; the batch-1 shape is run here."""
        trunk = nn.Sequential(*self.stages()).eval()
        weight = self.stem.conv1.weight
        size = self.config.image_size
        example = torch.zeros(1, 3, size, size, dtype=weight.dtype, device=weight.device)
        example = example.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), warnings.catch_warnings(), _ONEDNN_FUSION:
            warnings.simplefilter("ignore")  # TorchScript's maintenance-mode notices
            graph = torch.jit.freeze(torch.jit.trace(trunk, example, check_trace=False))
            for _ in range(3):  # profile, optimise, run: the first user does not wait for it
                graph(example)
        object.__setattr__(self, "graph", graph)  # not a submodule: no state_dict keys, no .to()/.train() walk

    def to_bfloat16(self) -> None:
        """Inference only: bf16 weights in channels-last layout, so oneDNN runs its AMX / AVX512-BF16 convolutions
        (ResNet-50 at 224 px, one thread: 124 -> 58 ms on this machine's Xeon; relative error of the grid ~1e-2)."""
        self.to(dtype=torch.bfloat16, memory_format=torch.channels_last)

    def cache_signature(self) -> str:
        """A digest of everything that determines `frozen_features`: input size, frozen stages and their weights."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.config.image_size, self.config.image_mean, self.config.image_std]).encode())
        for name, stage in zip(self.stage_names[: self.num_frozen_stages], self.stages()):
            digest.update(name.encode())
            for key, tensor in sorted(stage.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


class VisualProjection(nn.Module):
    """Grid features -> visual tokens: Linear(C -> D) + LayerNorm + learned 2-D position embeddings."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        gh, gw = config.grid_size
        self.proj = nn.Linear(config.encoder_channels, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.row_embed = nn.Parameter(torch.randn(gh, config.hidden_size) * 0.02)
        self.col_embed = nn.Parameter(torch.randn(gw, config.hidden_size) * 0.02)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        B, C, gh, gw = grid.shape
        tokens = grid.flatten(2).transpose(1, 2)  # (B, C, gh, gw) -> (B, P, C)
        position = (self.row_embed[:, None, :] + self.col_embed[None, :, :]).reshape(gh * gw, -1)  # (P, D)
        return self.dropout(self.norm(self.proj(tokens)) + position)  # (B, P, D)


# ---------------------------------------------------------------------------------------------------------
# Fusion decoder
# ---------------------------------------------------------------------------------------------------------
class AdditiveAttention(nn.Module):
    """Bahdanau attention: alpha_t = softmax_p(w . tanh(W_h h_t + W_v v_p)); the per-word heatmap."""

    def __init__(self, hidden_size: int, attention_dim: int):
        super().__init__()
        self.query = nn.Linear(hidden_size, attention_dim)
        self.key = nn.Linear(hidden_size, attention_dim, bias=False)
        self.score = nn.Linear(attention_dim, 1, bias=False)

    def project_keys(self, visual: torch.Tensor) -> torch.Tensor:
        return self.key(visual)  # (B, P, D) -> (B, P, A); computed once per image when decoding

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, visual: torch.Tensor):
        """hidden (B, T, D), keys (B, P, A), visual (B, P, D) -> context (B, T, D), alpha (B, T, P)."""
        energy = self.score(torch.tanh(self.query(hidden)[:, :, None, :] + keys[:, None, :, :]))  # (B, T, P, 1)
        alpha = energy.squeeze(-1).softmax(dim=-1)  # (B, T, P)
        context = alpha @ visual  # (B, T, P) @ (B, P, D) -> (B, T, D)
        return context, alpha


class FusionHead(nn.Module):
    """Additive attention over the visual tokens, then [h_t; c_t] -> fusion MLP -> a vector scored against the
    word embeddings (the output weights are tied to BERT's input embeddings, see FusionDecoder.vocab_logits)."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        D = config.hidden_size
        self.attention = AdditiveAttention(D, config.attention_dim)
        self.dropout = nn.Dropout(config.fusion_dropout)
        self.fuse = nn.Sequential(nn.Linear(2 * D, D), nn.GELU(), nn.LayerNorm(D, eps=config.layer_norm_eps))
        self.context_proj = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D, eps=config.layer_norm_eps))

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, visual: torch.Tensor, with_context: bool = False):
        """hidden (B, T, D) -> fused (B, T, D), alpha (B, T, P), and (with_context) a context-only vector (B, T, D)."""
        context, alpha = self.attention(hidden, keys, visual)  # (B, T, D), (B, T, P)
        fused = self.fuse(self.dropout(torch.cat([hidden, context], dim=-1)))  # (B, T, 2D) -> (B, T, D)
        # Grounding aid: predicting the word from c_t alone only works if alpha_t looks at the right object.
        return fused, alpha, (self.context_proj(context) if with_context else None)


def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags


def _cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 convolutions are faster than fp32 (without them oneDNN emulates, slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def _int8_linear_class() -> type:
    """torch's dynamic int8 Linear, with full 8-bit activations where the CPU has VNNI. torch quantises activations
    to 7 bits ("reduce_range") so that pre-VNNI int8 instructions cannot saturate; VNNI accumulates in int32, and the
    8th bit makes int8 captions match fp32 noticeably more often (98% vs 92% of greedy captions, tiny shapes model)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    if not _cpu_has_vnni():
        return DynamicLinear
    global _INT8_LINEAR
    if _INT8_LINEAR is None:
        class Int8Linear(DynamicLinear):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)

            def functional(self) -> Callable[[torch.Tensor], torch.Tensor]:
                """This layer as a plain function (no nn.Module call): what the cached decoding step runs."""
                packed, linear = self._packed_params._packed_params, torch.ops.quantized.linear_dynamic
                return lambda x: linear(x, packed, reduce_range=False)  # fp32 in, fp32 out

        _INT8_LINEAR = Int8Linear
    return _INT8_LINEAR


_INT8_LINEAR: type | None = None


def _return_freed_memory_to_the_os() -> None:
    """glibc keeps large freed blocks in the process heap; malloc_trim hands them back (a no-op elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        pass


def _bert_config(config: CaptionerConfig) -> BertConfig:
    return BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        layer_norm_eps=config.layer_norm_eps,
        pad_token_id=config.pad_token_id,
        is_decoder=True,  # causal self-attention: position t never sees t+1..
        add_cross_attention=True,  # every layer attends to the visual tokens
    )


class FusionDecoder(nn.Module):
    """Causal BERT over the caption prefix with cross-attention to the visual tokens, then the fusion head."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(_bert_config(config), add_pooling_layer=False)
        self.head = FusionHead(config)
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.vocab_int8: nn.Module | None = None  # set by quantize_int8: an int8 copy of the tied output projection

    def vocab_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V), scored against the (tied) input word embeddings."""
        if self.vocab_int8 is not None:
            return self.vocab_int8(x)
        return F.linear(x, self.bert.embeddings.word_embeddings.weight, self.output_bias)

    def ground_attention(self, alpha: torch.Tensor, visual: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Heatmaps of the chosen words: alpha (B, T, P) attention when token_ids (B, T) were predicted, visual
        (B, P, D) -> (B, T, P), each row summing to 1.

        map_t(p) is proportional to alpha_t(p) * exp(s_p(w_t)), where s_p(w) is the score the context-only head
        gives word w from cell p alone (the posterior of "w came from cell p" under that head, without the per-cell
        normaliser). alpha_t is computed before w_t is chosen: where several objects could come next (the colour
        word of "a red circle and a blue square"), it spreads over all of them; the evidence picks the one named.
        """
        if self.config.grounding_loss == "marginal":  # the exact posterior of the latent alignment it was trained as
            cell_logp = self.cell_word_logprobs(visual)  # (B, P, V)
            P = cell_logp.shape[1]
            evidence = cell_logp.gather(2, token_ids[:, None, :].expand(-1, P, -1)).transpose(1, 2)  # (B, T, P)
        else:
            cells = self.head.context_proj(visual)  # (B, P, D): what each cell alone would say
            words = self.bert.embeddings.word_embeddings(token_ids)  # (B, T, D); the output bias cancels over p
            evidence = words @ cells.transpose(1, 2)  # (B, T, P)
        return (alpha.clamp_min(1e-30).log() + evidence).softmax(dim=-1)  # (B, T, P)

    def cell_word_logprobs(self, visual: torch.Tensor) -> torch.Tensor:
        """visual (B, P, D) -> log p(word | cell p alone) (B, P, V), from the context-only head."""
        return self.vocab_logits(self.head.context_proj(visual)).float().log_softmax(dim=-1)

    def quantize_int8(self) -> None:
        """Dynamic int8 quantisation (CPU, inference only) of the per-token weights: every BERT Linear, the fusion
        MLP and the output projection (an int8 copy; the fp32 embedding table stays for the input lookup).
        The additive attention (the heatmap) and the once-per-image parts stay fp32."""
        V, D = self.bert.embeddings.word_embeddings.weight.shape
        vocab = nn.Linear(D, V, device="meta")  # (D -> V); the tied weights are copied in below
        vocab.weight = nn.Parameter(self.bert.embeddings.word_embeddings.weight.detach().clone())  # (V, D)
        vocab.bias = nn.Parameter(self.output_bias.detach().clone())  # (V,)
        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            spec = {nn.Linear: per_channel_dynamic_qconfig}  # one scale per output row: closer to fp32 than per tensor
            mapping = {nn.Linear: _int8_linear_class()}
            for layer in self.bert.encoder.layer:  # one int8 call for q, k, v of the cached one-token step
                attention = layer.attention.self
                qkv = nn.Linear(D, 3 * D)  # (D -> 3D): rows of query, key, value stacked
                qkv.weight = nn.Parameter(torch.cat([attention.query.weight, attention.key.weight,
                                                     attention.value.weight]).detach().clone())
                qkv.bias = nn.Parameter(torch.cat([attention.query.bias, attention.key.bias,
                                                   attention.value.bias]).detach().clone())
                # per-row weight scales and one activation scale: the same numbers as three separate calls
                attention.qkv_int8 = quantize_dynamic(nn.Sequential(qkv), spec, mapping=mapping)[0]
            quantize_dynamic(self.bert.encoder, spec, mapping=mapping, inplace=True)
            quantize_dynamic(self.head.fuse, spec, mapping=mapping, inplace=True)
            self.vocab_int8 = quantize_dynamic(nn.Sequential(vocab), spec, mapping=mapping)[0]

    def hidden_states(self, input_ids, visual, attention_mask=None, past_key_values=None, use_cache=False):
        """input_ids (B, T), visual (B, P, D) -> hidden (B, T, D), cache."""
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=visual,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values


# ---------------------------------------------------------------------------------------------------------
# The captioner
# ---------------------------------------------------------------------------------------------------------
@dataclass
class CaptionerOutput:
    loss: torch.Tensor | None  # scalar, when labels are given
    logits: torch.Tensor  # (B, T, V); logits[:, t] predicts token t+1
    attention: torch.Tensor  # (B, T, P); attention[:, t] is the heatmap of token t+1
    losses: dict[str, torch.Tensor] | None = None  # the loss terms, for logging


class ImageCaptioner(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="caption-model",
    pipeline_tag="image-to-text",
    tags=["image-captioning", "attention-heatmap", "resnet-50", "bert"],
):
    """ResNet-50 encoder + causal BERT fusion decoder whose additive attention gives a heatmap per word."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        if isinstance(config, dict):
            config = CaptionerConfig.from_dict(config)
        self.config = config
        self.encoder = ImageEncoder(config)
        self.projection = VisualProjection(config)
        self.decoder = FusionDecoder(config)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._init_new_layers()

    def _init_new_layers(self) -> None:
        for module in [self.projection, self.decoder.head]:
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=0.02)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)

    # --- construction for a new training run -----------------------------------------------------------
    @classmethod
    def from_backbones(
        cls,
        config: CaptionerConfig | None = None,
        decoder: str | os.PathLike | None = "bert-base-uncased",
        encoder_weights: str | None = "IMAGENET1K_V2",
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> "ImageCaptioner":
        """A new model with pretrained backbones: torchvision ResNet-50 `encoder_weights` (None: random) and a
        BERT checkpoint `decoder` (Hub id or local path; None: random decoder, then `tokenizer` is required).
        The decoder's architecture fields (hidden size, layers, vocabulary...) are taken from its checkpoint."""
        config = CaptionerConfig(**(config.to_dict() if config else {}))
        bert = None
        if decoder is not None:
            bert = BertModel.from_pretrained(
                os.fspath(decoder), is_decoder=True, add_cross_attention=True, add_pooling_layer=False
            )
            bert_config = bert.config
            for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "max_position_embeddings", "layer_norm_eps", "pad_token_id"):
                setattr(config, name, getattr(bert_config, name))
            config.decoder_name = os.fspath(decoder)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(os.fspath(decoder))
        else:
            config.decoder_name = None
        if tokenizer is None:
            raise ValueError("a random decoder (decoder=None) needs a tokenizer, e.g. train_wordpiece_tokenizer(...)")
        _check_tokenizer(tokenizer)
        config.vocab_size = max(config.vocab_size, len(tokenizer)) if bert is not None else len(tokenizer)
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.cls_token_id
        config.eos_token_id = tokenizer.sep_token_id
        config.encoder_weights = encoder_weights

        model = cls(config)
        if bert is not None:
            model.decoder.bert.load_state_dict(bert.state_dict(), strict=True)
        if encoder_weights is not None:
            weights = torchvision.models.ResNet50_Weights[encoder_weights]
            model.encoder.load_torchvision_state_dict(weights.get_state_dict(progress=True))
        model.tokenizer = tokenizer
        return model

    # --- Hub format --------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write config.json, model.safetensors and the tokenizer files into `save_directory`."""
        from safetensors.torch import save_model

        if kwargs.get("push_to_hub"):
            raise ValueError("use push_to_hub.py (or HfApi.upload_folder) to publish; save_pretrained saves locally")
        if self.quantized:
            raise ValueError("this model was quantized for inference (quantize_int8); save the fp32 model instead")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True))
        save_model(self, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str = "cpu",
        config: CaptionerConfig | dict | None = None,
        quantize: str | None = None,
        **unused: Any,
    ) -> "ImageCaptioner":
        from safetensors.torch import load_model

        if os.path.isdir(model_id):
            folder = Path(model_id)
        else:
            folder = Path(
                snapshot_download(
                    repo_id=model_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    local_files_only=local_files_only,
                    token=token,
                    allow_patterns=["*.json", "*.safetensors", "*.txt"],
                )
            )
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{model_id} is not a complete captioner checkpoint: missing {', '.join(missing)}")
        config = CaptionerConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        model = cls(config)
        load_model(model, str(folder / WEIGHTS_FILE), strict=True, device=map_location)
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            model.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model.eval()
        if quantize is not None:
            if quantize != "int8":
                raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
            model.quantize_int8()
        return model

    # --- images ------------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        return self.config.grid_size

    def preprocess(self, images: Sequence[ImageInput] | ImageInput) -> torch.Tensor:
        """Images (PIL, paths, bytes) -> (B, 3, S, S) normalised pixels; the whole image is resized, no crop,
        so attention cell (i, j) covers x in [j*W/gw, (j+1)*W/gw), y in [i*H/gh, (i+1)*H/gh)."""
        if isinstance(images, (Image.Image, str, os.PathLike, bytes, np.ndarray)):
            images = [images]
        side = self.config.image_size
        batch = np.stack(
            [np.asarray(load_image(im).resize((side, side), Image.Resampling.BICUBIC)) for im in images]
        )  # (B, S, S, 3) uint8
        pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S)
        mean = torch.tensor(self.config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- fast CPU inference ----------------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """True after quantize_int8(): an inference-only model (no training, no save_pretrained)."""
        return self.decoder.vocab_int8 is not None

    def quantize_int8(self, encoder_bf16: bool | None = False) -> "ImageCaptioner":
        """The fast CPU inference mode, in place; returns self. The decoder's per-token weights become int8
        (dynamic quantisation: ~4x fewer weight bytes read per generated token); captions stay (nearly always) the
        same as fp32, see benchmarks/int8_quality.py. The ResNet gets its BatchNorms folded and runs as one
        oneDNN-fused TorchScript graph (ImageEncoder.compile_graph; same grid to float rounding).
        Also `ImageCaptioner.from_pretrained(path, quantize="int8")`.
        encoder_bf16: also run the ResNet in bf16 (None: when the CPU has AMX or AVX512-BF16). Off by default: it
        halves the ResNet time, but on 1000 shapes images beam-3 captions matched fp32 95.1% of the time with it
        (bf16 for all stages but the last: 94.8%) against 96.3% without; the rule is >= 95%."""
        if self.device.type != "cpu":
            raise ValueError(f"int8 dynamic quantisation runs on CPU; this model is on {self.device}")
        if not self.quantized:
            self.eval()
            self.decoder.quantize_int8()
            self.encoder.fuse_for_inference()
            if _cpu_has_native_bf16() if encoder_bf16 is None else encoder_bf16:
                self.encoder.to_bfloat16()
            self.encoder.compile_graph()
            _return_freed_memory_to_the_os()  # the fp32 decoder weights just freed: ~280 MB on the full model
        return self

    def encode(self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None):
        """Pixels (B, 3, S, S) or cached frozen features -> visual tokens (B, P, D)."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values or image_features")
        if image_features is None:
            grid = self.encoder(pixel_values)
        else:
            grid = self.encoder.forward_from_frozen(image_features.to(self.encoder.stem.conv1.weight.dtype)).float()
        return self.projection(grid)  # (B, C, gh, gw) -> (B, P, D)

    # --- training forward --------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        context_loss_weight: float = 0.0,
        image_index: torch.Tensor | None = None,
    ) -> CaptionerOutput:
        """Teacher-forced pass. input_ids (B, T) start with [CLS]; labels (B, T) are input_ids with padding set
        to -100 (shifted inside: logits[:, t] is scored against labels[:, t+1]). With `image_index` (B,), the
        images (I of them) are encoded once and caption b reads image image_index[b] (several captions per image)."""
        if input_ids is None:
            raise ValueError("input_ids (B, T) are required: the caption prefix starting with [CLS]")
        visual = self.encode(pixel_values, image_features)  # (B, P, D), or (I, P, D) with image_index
        if image_index is not None:
            visual = visual.index_select(0, image_index.to(visual.device))  # (I, P, D) -> (B, P, D)
        hidden, _ = self.decoder.hidden_states(input_ids, visual, attention_mask)  # (B, T, D)
        keys = self.decoder.head.attention.project_keys(visual)  # (B, P, A)
        want_context = labels is not None and context_loss_weight > 0
        pooled = want_context and self.config.grounding_loss == "pooled"
        fused, alpha, context = self.decoder.head(hidden, keys, visual, with_context=pooled)
        logits = self.decoder.vocab_logits(fused)  # (B, T, V)
        context_logits = self.decoder.vocab_logits(context) if pooled else None
        loss, losses = None, None
        if labels is not None:
            losses = self._losses(logits, alpha, labels, context_logits, context_loss_weight)
            if want_context and not pooled:
                losses["context"] = context_loss_weight * self._marginal_grounding_loss(alpha, visual, labels)
            loss = sum(losses.values())
        return CaptionerOutput(loss=loss, logits=logits, attention=alpha, losses=losses)

    def _marginal_grounding_loss(self, alpha: torch.Tensor, visual: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """-log sum_p alpha_t(p) p(w_t | cell p): every word must be explained by one attended cell on its own
        (a latent alignment, as in hard attention), not by a blend of cells. alpha (B, T, P), visual (B, P, D)."""
        cell_logp = self.decoder.cell_word_logprobs(visual)  # (B, P, V), once per image row
        targets = labels[:, 1:]  # (B, T-1)
        valid = targets != -100
        P = cell_logp.shape[1]
        word_logp = cell_logp.gather(2, targets.clamp_min(0)[:, None, :].expand(-1, P, -1))  # (B, P, T-1)
        log_alpha = alpha[:, :-1].clamp_min(1e-30).log()  # (B, T-1, P)
        log_marginal = torch.logsumexp(log_alpha + word_logp.transpose(1, 2), dim=-1)  # (B, T-1)
        return -(log_marginal * valid).sum() / valid.sum().clamp(min=1)

    def _losses(self, logits, alpha, labels, context_logits, context_loss_weight) -> dict[str, torch.Tensor]:
        targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
        valid = (targets != -100).float()  # (B, T-1)
        V = logits.shape[-1]
        losses = {
            "caption": F.cross_entropy(
                logits[:, :-1].reshape(-1, V), targets.reshape(-1),
                ignore_index=-100, label_smoothing=self.config.label_smoothing,
            )
        }
        if self.config.attention_penalty > 0:
            # Doubly stochastic attention: over the caption each cell gets its share of attention.
            a = alpha[:, :-1] * valid[..., None]  # (B, T-1, P)
            share = a.sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp(min=1)  # (B, P), sums to 1
            P = alpha.shape[-1]
            losses["attention"] = self.config.attention_penalty * ((1.0 / P - share) ** 2).sum(-1).mean() * P
        if context_logits is not None:
            losses["context"] = context_loss_weight * F.cross_entropy(
                context_logits[:, :-1].reshape(-1, V), targets.reshape(-1), ignore_index=-100
            )
        return losses

    # --- decoding (see generation.py) ----------------------------------------------------------------------
    def caption(self, image: ImageInput, num_beams: int = 3, max_length: int = 30, length_penalty: float = 1.0,
                use_cache: bool = True):
        """Caption one image (PIL image or path) -> Caption(text, words, attention [n, gh, gw], score)."""
        return self.caption_batch([image], num_beams, max_length, length_penalty, use_cache)[0]

    def caption_batch(self, images: Sequence[ImageInput], num_beams: int = 3, max_length: int = 30,
                      length_penalty: float = 1.0, use_cache: bool = True):
        """Caption several images in one batched forward -> list of Caption."""
        from .generation import caption_images

        return caption_images(self, images, num_beams=num_beams, max_length=max_length,
                              length_penalty=length_penalty, use_cache=use_cache)


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    for name in ("pad_token_id", "cls_token_id", "sep_token_id"):
        if getattr(tokenizer, name, None) is None:
            raise ValueError(f"the tokenizer needs a BERT-style {name[:-3]} ([PAD]/[CLS]/[SEP]); it has none")

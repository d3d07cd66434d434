"""The network: ResNet-50 grid -> visual tokens -> causal BERT with cross-attention -> fusion head.

Pure PyTorch, read top to bottom, smallest part first. Decoding is generation.py; the Hub format, captioning and
the fast CPU mode are captioner.py and cpu/. Shape legend: B batch, T tokens, P grid cells (gh*gw), D hidden,
C encoder channels, V vocabulary, S input side in pixels, A additive-attention width.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from .config import ENCODER_STAGES, IGNORE_INDEX, CaptionerConfig


# --- Image encoder -------------------------------------------------------------------------------------
class ImageEncoder(nn.Module):
    """ResNet-50 trunk up to `config.encoder_stage`, without avgpool/fc: (B, 3, S, S) -> (B, C, gh, gw).

    The stages before the first trainable one form the *frozen prefix*: always in eval mode, no gradients, and
    its output (`frozen_features`) is what a feature cache stores.
    """

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
        """(B, 3, S, S) normalised pixels -> grid (B, C, gh, gw)."""
        return self.forward_from_frozen(self.frozen_features(pixel_values))

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


# --- Fusion decoder ------------------------------------------------------------------------------------
class AdditiveAttention(nn.Module):
    """Bahdanau attention: alpha_t = softmax_p(w . tanh(W_h h_t + W_v v_p)); the per-word heatmap. Computed as
    softmax_p(2 w . sigmoid(2 W_h h_t + 2 W_v v_p)), the same alpha (tanh(x) = 2 sigmoid(2x) - 1; -w . 1 drops out of
    the softmax), because torch's CPU tanh is several times slower than its sigmoid on the (B, T, P, A) tensor."""

    def __init__(self, hidden_size: int, attention_dim: int):
        super().__init__()
        self.query = nn.Linear(hidden_size, attention_dim)
        self.key = nn.Linear(hidden_size, attention_dim, bias=False)
        self.score = nn.Linear(attention_dim, 1, bias=False)

    def project_keys(self, visual: torch.Tensor) -> torch.Tensor:
        return self.key(visual)  # (B, P, D) -> (B, P, A); computed once per image when decoding

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, visual: torch.Tensor):
        """hidden (B, T, D), keys (B, P, A), visual (B, P, D) -> context (B, T, D), alpha (B, T, P)."""
        query, keys = 2 * self.query(hidden), 2 * keys  # (B, T, A), (B, P, A): scaled before broadcasting
        energy = 2 * self.score(torch.sigmoid(query[:, :, None, :] + keys[:, None, :, :]))  # (B, T, P, 1)
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

    def vocab_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V), scored against the (tied) input word embeddings."""
        return F.linear(x, self.bert.get_input_embeddings().weight, self.output_bias)

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
            words = self.bert.get_input_embeddings()(token_ids)  # (B, T, D); the output bias cancels over p
            evidence = words @ cells.transpose(1, 2)  # (B, T, P)
        return (alpha.clamp_min(1e-30).log() + evidence).softmax(dim=-1)  # (B, T, P)

    def attention_keys(self, visual: torch.Tensor) -> torch.Tensor:
        """visual (B, P, D) -> additive-attention keys (B, P, A): once per image, shared by every token."""
        return self.head.attention.project_keys(visual)

    def cell_word_logprobs(self, visual: torch.Tensor) -> torch.Tensor:
        """visual (B, P, D) -> log p(word | cell p alone) (B, P, V), from the context-only head."""
        return self.vocab_logits(self.head.context_proj(visual)).float().log_softmax(dim=-1)

    def hidden_states(self, input_ids, visual, attention_mask=None):
        """input_ids (B, T), visual (B, P, D) -> hidden (B, T, D): the whole prefix at once (training, and the
        reference decoding); one token at a time with a KV cache is cached_step.py's job."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=visual,
                        use_cache=False)
        return out.last_hidden_state


# --- The whole network ---------------------------------------------------------------------------------
@dataclass
class CaptionerOutput:
    loss: torch.Tensor | None  # scalar, when labels are given
    logits: torch.Tensor  # (B, T, V); logits[:, t] predicts token t+1
    attention: torch.Tensor  # (B, T, P); attention[:, t] is the heatmap of token t+1
    losses: dict[str, torch.Tensor] | None = None  # the loss terms, for logging


class CaptionerModel(nn.Module):
    """The network: ResNet-50 encoder -> visual tokens -> causal BERT fusion decoder whose additive attention gives
    a heatmap per word. `forward` is the teacher-forced training pass; decoding lives in generation.py and the
    public class with the Hub format, `caption()` and the fast CPU mode is `captioner.ImageCaptioner`."""

    def __init__(self, config: CaptionerConfig | dict):
        super().__init__()
        config = CaptionerConfig.from_dict(config) if isinstance(config, dict) else config
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
    ) -> "CaptionerModel":
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

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.config.grid_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None):
        """Pixels (B, 3, S, S) or cached frozen features -> visual tokens (B, P, D)."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values or image_features")
        if image_features is None:
            grid = self.encoder(pixel_values)
        else:
            grid = self.encoder.forward_from_frozen(image_features)
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
        to IGNORE_INDEX (shifted inside: logits[:, t] is scored against labels[:, t+1]). With `image_index` (B,), the
        images (I of them) are encoded once and caption b reads image image_index[b] (several captions per image)."""
        if input_ids is None:
            raise ValueError("input_ids (B, T) are required: the caption prefix starting with [CLS]")
        visual = self.encode(pixel_values, image_features)  # (B, P, D), or (I, P, D) with image_index
        if image_index is not None:
            visual = visual.index_select(0, image_index.to(visual.device))  # (I, P, D) -> (B, P, D)
        hidden = self.decoder.hidden_states(input_ids, visual, attention_mask)  # (B, T, D)
        keys = self.decoder.attention_keys(visual)  # (B, P, A)
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
        valid = targets != IGNORE_INDEX
        P = cell_logp.shape[1]
        word_logp = cell_logp.gather(2, targets.clamp_min(0)[:, None, :].expand(-1, P, -1))  # (B, P, T-1)
        log_alpha = alpha[:, :-1].clamp_min(1e-30).log()  # (B, T-1, P)
        log_marginal = torch.logsumexp(log_alpha + word_logp.transpose(1, 2), dim=-1)  # (B, T-1)
        return -(log_marginal * valid).sum() / valid.sum().clamp(min=1)

    def _losses(self, logits, alpha, labels, context_logits, context_loss_weight) -> dict[str, torch.Tensor]:
        targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
        valid = (targets != IGNORE_INDEX).float()  # (B, T-1)
        V = logits.shape[-1]
        losses = {
            "caption": F.cross_entropy(
                logits[:, :-1].reshape(-1, V), targets.reshape(-1),
                ignore_index=IGNORE_INDEX, label_smoothing=self.config.label_smoothing,
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
                context_logits[:, :-1].reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return losses

def _check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    for name in ("pad_token_id", "cls_token_id", "sep_token_id"):
        if getattr(tokenizer, name, None) is None:
            raise ValueError(f"the tokenizer needs a BERT-style {name[:-3]} ([PAD]/[CLS]/[SEP]); it has none")

"""CaptionerConfig: every architecture choice of ImageCaptioner, stored as config.json with each checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Files of a checkpoint folder (ImageCaptioner.save_pretrained) and of a training run's folders.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINING_CONFIG_FILE = "training_config.json"
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.png"

IGNORE_INDEX = -100  # label value the caption loss ignores (padding)

# torchvision ResNet-50 stages: output channels and stride (input pixels per grid cell).
ENCODER_STAGES = ("layer1", "layer2", "layer3", "layer4")
STAGE_CHANNELS = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
STAGE_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
GROUNDING_LOSSES = ("pooled", "marginal")
HEATMAP_READINGS = ("word", "phrase")  # CaptionerConfig.heatmap_reading


@dataclass
class CaptionerConfig:
    # --- image encoder (torchvision ResNet-50) ---
    image_size: int = 224  # input side S: the whole image is resized to S x S (no crop)
    encoder_stage: str = "layer4"  # last ResNet stage kept; its grid is the heatmap grid (S/32 for layer4)
    encoder_trainable: list[str] = field(default_factory=list)  # ResNet stages that train; the rest stay frozen
    encoder_weights: str | None = "IMAGENET1K_V2"  # torchvision weights loaded by from_backbones (None: random)
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet normalisation
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    # --- BERT decoder (causal self-attention + cross-attention to the visual tokens) ---
    decoder_name: str | None = "bert-base-uncased"  # where the decoder weights came from (model card); None: random
    vocab_size: int = 30522  # decoder vocabulary (tokenizer) size
    hidden_size: int = 768  # D: decoder width, also the width of the visual tokens
    num_hidden_layers: int = 12  # decoder layers, each with cross-attention
    num_attention_heads: int = 12  # heads in self- and cross-attention
    intermediate_size: int = 3072  # feed-forward width
    max_position_embeddings: int = 512  # longest caption in tokens (BERT position table)
    hidden_dropout_prob: float = 0.1  # dropout in the decoder and the fusion head
    attention_probs_dropout_prob: float = 0.1  # dropout on BERT attention weights
    layer_norm_eps: float = 1e-12  # BERT LayerNorm epsilon
    pad_token_id: int = 0  # [PAD]
    bos_token_id: int = 101  # [CLS] starts every caption
    eos_token_id: int = 102  # [SEP] ends every caption

    # --- fusion head (additive attention -> per-word heatmap) ---
    attention_dim: int = 512  # width of the additive (Bahdanau) attention scorer
    fusion_dropout: float = 0.1  # dropout on [h_t; c_t] before the fusion MLP
    # Per-word heatmaps weighted by word evidence: alpha_t(p) * exp(score of word t from cell p's context alone).
    # Needs the context-only head trained (train.py's context loss); False: the raw attention alpha_t.
    grounded_heatmaps: bool = True
    # Context loss (train.py --context-loss-weight): "pooled" predicts the word from the attention-pooled context;
    # "marginal" from one attended cell at a time, -log sum_p alpha(p) p(w | cell p) (a latent alignment).
    grounding_loss: str = "pooled"
    # How a word's map is read (heatmap.phrase_maps): "word": its own map; "phrase": its own map times its
    # neighbours' maps, each counted by how peaked it is ("a [red] circle": "circle" decides which red object "red"
    # names). Measured on shapes, plain and over photo-like backgrounds (benchmarks/README.md), not yet on photos; the
    # shapes and Flickr presets train with "phrase".
    heatmap_reading: str = "word"
    # Per-word map offsets {word: [dx, dy]} in cells (x right, y down), measured after training without boxes
    # (training/heatmap_offsets.py: where a word's map peaks on an image vs on its mirror image); each served map is
    # moved back by its word's offset (heatmap.recentre). Words not listed are served as read. {}: none measured.
    heatmap_offsets: dict[str, list[float]] = field(default_factory=dict)

    # --- loss ---
    label_smoothing: float = 0.1  # token cross-entropy label smoothing
    attention_penalty: float = 1.0  # weight of the doubly-stochastic attention penalty (Show, Attend and Tell)

    # --- provenance ---
    caption_model_version: str | None = field(default=None, compare=False)  # the library that wrote it (on save)

    def __post_init__(self) -> None:
        if self.heatmap_reading not in HEATMAP_READINGS:
            raise ValueError(f"heatmap_reading must be one of {HEATMAP_READINGS}, got {self.heatmap_reading!r}")
        self.heatmap_offsets = _checked_offsets(self.heatmap_offsets)
        if self.grounding_loss not in GROUNDING_LOSSES:
            raise ValueError(f"grounding_loss must be one of {GROUNDING_LOSSES}, got {self.grounding_loss!r}")
        if self.encoder_stage not in ENCODER_STAGES:
            raise ValueError(f"encoder_stage must be one of {ENCODER_STAGES}, got {self.encoder_stage!r}")
        last = ENCODER_STAGES.index(self.encoder_stage)
        for stage in self.encoder_trainable:
            if stage not in ENCODER_STAGES[: last + 1]:
                raise ValueError(
                    f"encoder_trainable entries must be stages up to {self.encoder_stage!r}, got {stage!r}"
                )
        if self.image_size < 32 or self.image_size % STAGE_STRIDES[self.encoder_stage]:
            raise ValueError(
                f"image_size must be a multiple of {STAGE_STRIDES[self.encoder_stage]} (the {self.encoder_stage} "
                f"stride) and at least 32, got {self.image_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        self.encoder_trainable = list(self.encoder_trainable)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(gh, gw): the attention grid, one cell per encoder output position."""
        side = self.image_size // STAGE_STRIDES[self.encoder_stage]
        return side, side

    @property
    def encoder_channels(self) -> int:
        return STAGE_CHANNELS[self.encoder_stage]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CaptionerConfig":
        """Build from a dict; unknown keys are an error that names them (a config from another model?)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CaptionerConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**values)


def _checked_offsets(offsets: Any) -> dict[str, list[float]]:
    """heatmap_offsets as {word: [dx, dy]} floats, or a ValueError that says what came."""
    if not isinstance(offsets, dict):
        raise ValueError(f"heatmap_offsets must be a dict {{word: [dx, dy]}}, got {type(offsets).__name__}")
    checked = {}
    for word, offset in offsets.items():
        pair = list(offset) if isinstance(offset, (list, tuple)) else None
        if not (isinstance(word, str) and pair is not None and len(pair) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair)):
            raise ValueError(f"heatmap_offsets must map words to [dx, dy] pairs of finite numbers (cells), got "
                             f"{word!r}: {offset!r}")
        checked[word] = [float(v) for v in pair]
    return checked


# Hub metadata: one library name, task and tag list for the mixin's card and push_to_hub.py's card alike.
# The library is this package (the Hub knows no snippet for it: the card carries the install line and the code).
LIBRARY_NAME = "caption-model"
PIPELINE_TAG = "image-to-text"
MODEL_TAGS = ["image-captioning", "image-to-text", "attention-heatmap", "resnet-50", "bert"]

# Where the project lives: the README shows a placeholder; a published card shows the real source, which
# push_to_hub.py takes from --install-source, $CAPTION_MODEL_SOURCE or the clone's git remote, and refuses this.
PROJECT_URL = "https://github.com/USER/REPO"


def install_command(source_url: str = PROJECT_URL) -> str:
    """The pip line that installs this package from `source_url` (a git URL, optionally @tag)."""
    return f'pip install "caption-model @ git+{source_url.removeprefix("git+")}"'


INSTALL_COMMAND = install_command()  # the README's line

"""TrainConfig: every choice of a training run, saved with each checkpoint as training_config.json; the presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from caption_model import CaptionerConfig


MIXED_PRECISIONS = ("no", "bf16", "fp16", "auto")  # TrainConfig.mixed_precision (loop.resolve_mixed_precision)


@dataclass
class TrainConfig:
    # --- data ---
    source: str = "jxie/flickr8k"  # Hub dataset id, local imagefolder / Flickr8k folder / parquet, or "shapes"
    image_column: str | None = None  # image column of a Hub/parquet dataset; None: "image"
    caption_columns: list[str] = field(default_factory=list)  # text or list-of-text columns; []: found by name
    shapes_sizes: list[int] = field(default_factory=lambda: [3000, 200, 200])  # shapes train/val/test images
    max_train_images: int | None = None  # use only the first N training images (quick runs)
    max_eval_images: int | None = None  # evaluate on the first N images of a split
    max_caption_words: int = 30  # captions are cleaned and cut to this many words
    # --- model ---
    decoder: str | None = "bert-base-uncased"  # BERT checkpoint (Hub id or local path); None: random decoder
    encoder_weights: str | None = "IMAGENET1K_V2"  # torchvision ResNet-50 weights; None: random
    image_size: int = 224  # input side S (images resized to S x S)
    encoder_stage: str = "layer4"  # last ResNet stage kept; its grid is the heatmap grid
    encoder_trainable: list[str] = field(default_factory=list)  # ResNet stages that train; the rest stay frozen
    calibrate_batchnorm_images: int = 256  # random encoder only: frozen BatchNorm statistics from N training images
    hidden_size: int = 768  # random decoder only (a pretrained one brings its own sizes)
    num_hidden_layers: int = 12  # random decoder only
    num_attention_heads: int = 12  # random decoder only
    intermediate_size: int = 3072  # random decoder only: feed-forward width
    max_position_embeddings: int = 64  # random decoder only: longest caption in tokens
    attention_dim: int = 512  # width of the additive attention of the fusion head
    dropout: float = 0.1  # decoder, attention and fusion dropout
    tokenizer_vocab_size: int = 8000  # WordPiece vocabulary trained on the captions (random decoder only)
    tokenizer: str | None = None  # random decoder only: this tokenizer (Hub id or folder) instead of a new WordPiece
    # --- optimisation ---
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 64  # images per step and process
    gradient_accumulation_steps: int = 1
    lr: float = 3e-4  # new layers: projection, fusion head, cross-attention of a pretrained BERT
    lr_decoder: float = 3e-5  # pretrained BERT layers
    lr_encoder: float = 1e-5  # unfrozen ResNet stages
    weight_decay: float = 0.01  # AdamW, not on biases and norms
    warmup_ratio: float = 0.05  # linear warm-up over this share of the steps, then cosine decay
    max_grad_norm: float = 1.0  # gradient clipping; 0: none
    label_smoothing: float = 0.1  # token cross-entropy label smoothing
    attention_penalty: float = 1.0  # doubly-stochastic attention penalty weight (Show, Attend and Tell)
    context_loss_weight: float = 0.5  # grounding aid: also predict each word from its attended context alone
    grounding_loss: str = "pooled"  # pooled: from the attention-pooled context; marginal: from one attended cell
    heatmap_reading: str = "word"  # word | phrase: how the trained model reads a word's map (CaptionerConfig)
    heatmap_offset_images: int = 0  # after training: measure per-word map offsets on N validation images; 0: off
    all_captions: bool = True  # every caption of an image in its step (image encoded once); False: one random
                               # caption per image and epoch
    feature_cache: bool = True  # cache the frozen encoder part's output on disk
    cache_dir: str | None = None  # default: <output_dir>/feature_cache
    mixed_precision: str = "no"  # no | bf16 | fp16 (Accelerate) | auto: bf16 where the GPU or CPU has it in hardware
    device: str | None = None  # cuda | mps | cpu; None: Accelerate's choice (the GPU when there is one)
    # --- evaluation, logging, checkpoints ---
    eval_beams: int = 3  # beam width when scoring validation/test
    eval_max_length: int = 30  # longest generated caption when scoring, in tokens
    eval_every_epochs: int = 1  # validate (and maybe update best/) every N epochs
    early_stopping_patience: int = 0  # stop after N validations in a row without a better selection score (CIDEr;
                                      # object F1 on shapes); 0: train every epoch
    save_every_steps: int | None = None  # also save last/ every N steps (default: at each epoch end)
    log_every_steps: int = 10  # one log.jsonl record every N steps
    report_to: str | None = None  # tensorboard | trackio | mlflow (through Accelerate, when installed)
    num_workers: int = 0  # DataLoader worker processes
    num_threads: int | None = None  # torch CPU threads (default: torch's choice, one per core)
    seed: int = 0  # model init, data order, caption choice, seeded split of a one-split source, shapes images
    output_dir: str = "checkpoints/run"  # best/, last/, metrics.json, log.jsonl, plots


# The Flickr8k recipe, read against the published ones: Show, Attend and Tell (Xu et al. 2015), sgrvinod's
# a-PyTorch-Tutorial-to-Image-Captioning, ClipCap (Mokady et al. 2021) and BLIP's caption fine-tuning (Li et al. 2022).
# - all_captions: every one of them trains on all 5 captions of every image in every epoch (the tutorial's
#   captions_per_image=5; COCO's captions for ClipCap and BLIP). Here the image is encoded once and its 5 captions
#   share the step: 30,000 captions an epoch, where one random caption per image saw 6,000.
# - batch_size 32 images = 160 captions a step (the tutorial: 32, BLIP: 256), 188 steps an epoch on 6000 images,
#   ~2800 over 15 epochs: the cross-attention layers start from random weights and get twice the updates that
#   64-image steps would give. Warm-up (warmup_ratio of the steps) and the cosine decay are counted in these steps.
# - epochs 15 is a budget, early_stopping_patience 3 ends the run after 3 validations in a row without a better
#   validation CIDEr; best/ is the best validation CIDEr. The anchors: the tutorial allows 120 epochs and stops after
#   20 without a better BLEU-4 (an LSTM and fine-tuned encoder from scratch); SAT stops early on validation BLEU;
#   ClipCap trains 10 epochs, BLIP fine-tunes 5 and keeps the best validation CIDEr + BLEU-4 (pretrained
#   cross-modal layers, COCO's ~20x more captions). CIDEr rather than BLEU-4 because best/ is already chosen by it.
# - heatmap_reading "phrase", no offsets: on shapes over photo-like backgrounds (benchmarks/photo_grounding.py, the
#   only photo-like inputs we can build and judge) the phrase reading's maps peaked on the named object more often
#   than each word's own map, in both models measured; per-word offsets changed little either way. Not measured on
#   photos: the model card says so.
FLICKR8K_RECIPE = dict(source="jxie/flickr8k", all_captions=True, epochs=15, batch_size=32,
                       early_stopping_patience=3, heatmap_reading="phrase")

PRESETS: dict[str, dict[str, Any]] = {
    # Flickr8k, full size: ImageNet ResNet-50 (frozen, cached features) + bert-base-uncased. Needs a GPU.
    "flickr8k": dict(**FLICKR8K_RECIPE, decoder="bert-base-uncased"),
    # Flickr8k, small enough for a free CPU Space: 6-layer MiniLM decoder (BERT, bert-base-uncased vocabulary).
    "flickr8k-small": dict(**FLICKR8K_RECIPE, decoder="sentence-transformers/all-MiniLM-L6-v2", lr_decoder=5e-5),
    # Synthetic shapes on a CPU in minutes: no pretrained weights offline, so a 96 px input and ResNet-50 up to layer2
    # (12x12 grid, 8 px cells) with layer2 trained (stem and layer1 frozen, BatchNorm-calibrated and cached), a small
    # random BERT and a caption vocabulary. Against the earlier 128 px / layer3 (8x8) preset: ~12 calibration units of
    # training instead of ~34 (750 steps of batch 16, not of batch 32), and the finer, more local grid points
    # better (benchmarks/README.md "Grounding"). Grounding: the context-only word loss (weight 2) and no
    # doubly-stochastic penalty, which spread the attention of object words onto the background; the maps are served
    # with the phrase reading, each moved back by its word's offset measured on 200 validation images without boxes
    # (training/heatmap_offsets.py: the maps peaked 0.5-0.9 cells up-left of their objects). bf16 autocast where the
    # CPU has bf16 in hardware (AMX / AVX512-BF16): 9.7-10.3 units on a Zen 4 instead of 11-13.7; fp32 elsewhere (an
    # AVX2-only CPU would emulate bf16, slower than fp32). One random caption of the 5 per image and step: the
    # captions are 5 templates over the same objects, and all 5 would cost 5x the decoder time in the 10-unit budget.
    "shapes": dict(source="shapes", decoder=None, encoder_weights=None, image_size=96, encoder_stage="layer2",
                   encoder_trainable=["layer2"], hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=512, attention_dim=128, max_position_embeddings=40, tokenizer_vocab_size=200,
                   shapes_sizes=[4000, 200, 200], epochs=3, batch_size=16, all_captions=False, lr=5e-4, lr_decoder=5e-4,
                   lr_encoder=1e-3, warmup_ratio=0.1, eval_beams=1, eval_max_length=24, max_eval_images=200,
                   dropout=0.0, attention_penalty=0.0, context_loss_weight=2.0, heatmap_reading="phrase",
                   heatmap_offset_images=200, mixed_precision="auto"),
}


def schedule(cfg: TrainConfig, train_images: int, processes: int = 1) -> dict[str, int]:
    """The optimizer steps of a run on `train_images` images: per epoch, in all (`max_steps`, else `epochs` of them)
    and of warm-up. A step takes `batch_size` images per process (with all their captions when `all_captions`),
    so the schedule counts images, whatever the captions per image."""
    batches = math.ceil(train_images / (cfg.batch_size * processes))
    per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
    total = cfg.max_steps or per_epoch * cfg.epochs
    return {"steps_per_epoch": per_epoch, "total_steps": total, "warmup_steps": int(cfg.warmup_ratio * total)}


def preset_config(preset: str, **overrides: Any) -> TrainConfig:
    """A preset's TrainConfig with some fields replaced."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return TrainConfig(**{**PRESETS[preset], **overrides})


def model_config(cfg: TrainConfig) -> CaptionerConfig:
    """The CaptionerConfig of a new model trained with `cfg`."""
    return CaptionerConfig(
        image_size=cfg.image_size, encoder_stage=cfg.encoder_stage, encoder_trainable=list(cfg.encoder_trainable),
        encoder_weights=cfg.encoder_weights, decoder_name=cfg.decoder, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        attention_dim=cfg.attention_dim, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        fusion_dropout=cfg.dropout, label_smoothing=cfg.label_smoothing, attention_penalty=cfg.attention_penalty,
        grounded_heatmaps=cfg.context_loss_weight > 0,  # the evidence comes from the context-only head
        grounding_loss=cfg.grounding_loss, heatmap_reading=cfg.heatmap_reading,
    )

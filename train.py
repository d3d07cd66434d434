"""Train (or evaluate) an ImageCaptioner on Flickr8k or the synthetic shapes data.

    python train.py --preset shapes --output-dir checkpoints/shapes          # CPU, minutes
    python train.py --preset flickr8k --output-dir checkpoints/flickr8k      # GPU; also `accelerate launch train.py`
    python train.py --eval-only --model checkpoints/shapes/best --preset shapes --split test

Every preset field can be overridden on the command line (`--epochs 3 --batch-size 16 ...`); the resolved
training config is saved with each checkpoint as training_config.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caption_model import CaptionerConfig, ImageCaptioner
from caption_model.checkpointing import (load_training_state, recover_checkpoint, save_training_state,
                                         write_folder_atomically)

logger = logging.getLogger("train")
TRAINING_CONFIG_FILE = "training_config.json"


# ------------------------------------------------------------------------------------------------ config
@dataclass
class TrainConfig:
    # --- data ---
    source: str = "jxie/flickr8k"  # Hub dataset id, local folder/parquet, or "shapes"
    shapes_sizes: list[int] = field(default_factory=lambda: [3000, 200, 200])  # shapes train/val/test images
    max_train_images: int | None = None  # use only the first N training images (quick runs)
    max_eval_images: int | None = None  # evaluate on the first N images of a split
    max_caption_words: int = 30  # captions are cleaned and cut to this many words
    # --- model ---
    decoder: str | None = "bert-base-uncased"  # BERT checkpoint (Hub id or local path); None: random decoder
    encoder_weights: str | None = "IMAGENET1K_V2"  # torchvision ResNet-50 weights; None: random
    image_size: int = 224
    encoder_stage: str = "layer4"
    encoder_trainable: list[str] = field(default_factory=list)
    hidden_size: int = 768  # random decoder only (a pretrained one brings its own sizes)
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 64
    attention_dim: int = 512
    dropout: float = 0.1
    tokenizer_vocab_size: int = 8000  # WordPiece vocabulary trained on the captions (random decoder only)
    # --- optimisation ---
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    lr: float = 3e-4  # new layers: projection, fusion head, cross-attention of a pretrained BERT
    lr_decoder: float = 3e-5  # pretrained BERT layers
    lr_encoder: float = 1e-5  # unfrozen ResNet stages
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.1
    attention_penalty: float = 1.0
    context_loss_weight: float = 0.5  # grounding aid: also predict each word from its attended context alone
    grounding_loss: str = "pooled"  # pooled: from the attention-pooled context; marginal: from one attended cell
    all_captions: bool = False  # train on every caption of an image per step (image encoded once) vs one random
    feature_cache: bool = True  # cache the frozen encoder part's output on disk
    cache_dir: str | None = None  # default: <output_dir>/feature_cache
    mixed_precision: str = "no"  # no | bf16 | fp16 (Accelerate)
    # --- evaluation, logging, checkpoints ---
    eval_beams: int = 3
    eval_max_length: int = 30
    eval_every_epochs: int = 1
    save_every_steps: int | None = None  # also save last/ every N steps (default: at each epoch end)
    log_every_steps: int = 10
    report_to: str | None = None  # tensorboard | trackio | mlflow (through Accelerate, when installed)
    num_workers: int = 0
    num_threads: int | None = None  # torch CPU threads (default: torch's choice, one per core)
    seed: int = 0
    output_dir: str = "checkpoints/run"


PRESETS: dict[str, dict[str, Any]] = {
    # Flickr8k, full size: ImageNet ResNet-50 (frozen, cached features) + bert-base-uncased. Needs a GPU.
    "flickr8k": dict(source="jxie/flickr8k", decoder="bert-base-uncased", epochs=10, batch_size=64),
    # Flickr8k, small enough for a free CPU Space: 6-layer MiniLM decoder (BERT, bert-base-uncased vocabulary).
    "flickr8k-small": dict(source="jxie/flickr8k", decoder="sentence-transformers/all-MiniLM-L6-v2", epochs=10,
                           batch_size=64, lr_decoder=5e-5),
    # Synthetic shapes on a CPU: no pretrained weights offline, so a 128 px input, ResNet-50 up to layer3 (8x8 grid)
    # with layer3 trained (stem..layer2 frozen and cached), a small random BERT and a caption vocabulary.
    # Grounding: the context-only word loss (weight 2; 1 and 3 pointed worse in side-by-side runs) and no
    # doubly-stochastic penalty, which spread the attention of object words onto the background.
    "shapes": dict(source="shapes", decoder=None, encoder_weights=None, image_size=128, encoder_stage="layer3",
                   encoder_trainable=["layer3"], hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=512, attention_dim=128, max_position_embeddings=40, tokenizer_vocab_size=200,
                   shapes_sizes=[4000, 200, 200], epochs=6, batch_size=32, lr=5e-4, lr_decoder=5e-4,
                   lr_encoder=1e-3, warmup_ratio=0.1, eval_beams=1, eval_max_length=24, max_eval_images=200,
                   dropout=0.0, attention_penalty=0.0, context_loss_weight=2.0),
}


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Preset defaults <- command-line overrides; returns the config and the control flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flickr8k")
    parser.add_argument("--resume", action="store_true", help="continue from <output-dir>/last")
    parser.add_argument("--eval-only", action="store_true", help="evaluate --model on --split and print metrics")
    parser.add_argument("--model", help="checkpoint folder or Hub id for --eval-only")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, type=_parse_bool, default=argparse.SUPPRESS, metavar="{true,false}")
        elif f.name in ("shapes_sizes", "encoder_trainable"):
            parser.add_argument(flag, type=_parse_list, default=argparse.SUPPRESS, metavar="A,B,...")
        else:
            parser.add_argument(flag, type=_caster(f.type), default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    values = {**PRESETS[args.preset]}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)})
    if "shapes_sizes" in values:
        values["shapes_sizes"] = [int(v) for v in values["shapes_sizes"]]
    return TrainConfig(**values), args


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_list(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def _caster(type_name: str):
    def cast(text: str):
        if "None" in type_name and text.lower() in ("none", "null", ""):
            return None
        if type_name.startswith("int"):
            return int(text)
        if type_name.startswith("float"):
            return float(text)
        return text
    return cast


# ------------------------------------------------------------------------------------------------ model
def model_config(cfg: TrainConfig) -> CaptionerConfig:
    return CaptionerConfig(
        image_size=cfg.image_size, encoder_stage=cfg.encoder_stage, encoder_trainable=list(cfg.encoder_trainable),
        encoder_weights=cfg.encoder_weights, decoder_name=cfg.decoder, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        attention_dim=cfg.attention_dim, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        fusion_dropout=cfg.dropout, label_smoothing=cfg.label_smoothing, attention_penalty=cfg.attention_penalty,
        grounded_heatmaps=cfg.context_loss_weight > 0,  # the evidence comes from the context-only head
        grounding_loss=cfg.grounding_loss,
    )


def build_model(cfg: TrainConfig, train_captions: list[str]) -> ImageCaptioner:
    """A new model: pretrained backbones where the config names them, else random + a WordPiece vocabulary."""
    tokenizer = None
    if cfg.decoder is None:
        from caption_model.tokenization import train_wordpiece_tokenizer

        tokenizer = train_wordpiece_tokenizer(train_captions, vocab_size=cfg.tokenizer_vocab_size)
    return ImageCaptioner.from_backbones(model_config(cfg), decoder=cfg.decoder,
                                         encoder_weights=cfg.encoder_weights, tokenizer=tokenizer)


def parameter_groups(model: ImageCaptioner, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: new layers (lr), pretrained BERT (lr_decoder), unfrozen ResNet stages (lr_encoder).
    Biases and norms get no weight decay."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    pretrained_decoder = cfg.decoder is not None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("encoder."):
            kind = "encoder"
        elif name.startswith("decoder.bert.") and pretrained_decoder and "crossattention" not in name:
            kind = "decoder"
        else:
            kind = "new"
        no_decay = param.ndim < 2 or "norm" in name.lower()
        groups.setdefault((kind, no_decay), []).append(param)
    lrs = {"new": cfg.lr, "decoder": cfg.lr_decoder, "encoder": cfg.lr_encoder}
    return [{"params": params, "lr": lrs[kind], "weight_decay": 0.0 if no_decay else cfg.weight_decay,
             "name": f"{kind}{'-no-decay' if no_decay else ''}"}
            for (kind, no_decay), params in sorted(groups.items())]


# ------------------------------------------------------------------------------------------------ data
def load_data(cfg: TrainConfig):
    """DatasetDict with images left undecoded ({bytes, path}) so the feature cache can key them by content."""
    from datasets import Image as ImageFeature

    from caption_model.data import load_caption_dataset

    data, report = load_caption_dataset(cfg.source, max_words=cfg.max_caption_words, seed=cfg.seed,
                                        shapes_sizes=tuple(cfg.shapes_sizes), return_report=True)
    logger.info("data: %s", report.summary())
    data = data.cast_column("image", ImageFeature(decode=False))
    if cfg.max_train_images:
        data["train"] = data["train"].select(range(min(cfg.max_train_images, len(data["train"]))))
    return data, report


class CaptionBatches:
    """Collate rows -> model inputs. Images become cached frozen features (`image_features`) or `pixel_values`;
    captions are one random caption per image, or with `all_captions` every caption, the image encoded once
    (`image_index` says which image each caption reads)."""

    def __init__(self, model: ImageCaptioner, cache, max_tokens: int, seed: int, all_captions: bool = False):
        from caption_model.data import CaptionCollator
        from caption_model.feature_cache import decode_image

        self.cache, self.all_captions, self.epoch_seed = cache, all_captions, seed
        self.images_to_inputs = cache.get if cache is not None else (
            lambda images: model.preprocess([decode_image(i) for i in images]))
        self.collator = CaptionCollator(model.tokenizer, max_tokens, self.images_to_inputs, seed=seed)

    def __call__(self, rows: list[dict]) -> dict:
        image_key = "image_features" if self.cache is not None else "pixel_values"
        if self.all_captions:
            captions = [c for row in rows for c in row["captions"]]
            enc = self.collator.tokenizer(captions, padding="longest", truncation=True,
                                          max_length=self.collator.max_length, return_tensors="pt")
            return {image_key: self.images_to_inputs([row["image"] for row in rows]),  # (I, ...)
                    "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],  # (N, T)
                    "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100),
                    "image_index": torch.tensor([i for i, row in enumerate(rows) for _ in row["captions"]])}
        # The caption drawn for an image depends only on (seed, epoch, batch): a resumed run draws the same ones.
        ids = "\x00".join(str(row["image_id"]) for row in rows)
        self.collator.rng.seed(zlib.crc32(f"{self.epoch_seed}:{ids}".encode()))
        batch = self.collator(rows)
        return {image_key: batch["pixel_values"], "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"], "labels": batch["labels"]}


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(model: ImageCaptioner, dataset, cfg: TrainConfig, desc: str = "eval") -> dict[str, float]:
    """Caption every image of `dataset` and score: object F1 + pointing accuracy for shapes, COCO metrics else."""
    from tqdm.auto import tqdm

    from caption_model.feature_cache import decode_image

    if cfg.max_eval_images:
        dataset = dataset.select(range(min(cfg.max_eval_images, len(dataset))))
    captions, batch = [], max(1, min(cfg.batch_size, 32))
    for start in tqdm(range(0, len(dataset), batch), desc=desc, leave=False, unit="batch"):
        rows = dataset[start:start + batch]
        images = [decode_image(im) for im in rows["image"]]
        captions += model.caption_batch(images, num_beams=cfg.eval_beams, max_length=cfg.eval_max_length)
    if "objects" in dataset.column_names:
        from caption_model.processing import load_image
        from caption_model.metrics import shapes_scores

        objects = [[(o["colour"], o["shape"], tuple(o["box"])) for o in objs] for objs in dataset["objects"]]
        sizes = [load_image(decode_image(im)).size for im in dataset["image"]]
        return shapes_scores(captions, objects, sizes)
    from caption_model.metrics import coco_caption_scores

    ids = [str(i) for i in dataset["image_id"]]
    return coco_caption_scores({i: c.text for i, c in zip(ids, captions)},
                               {i: list(refs) for i, refs in zip(ids, dataset["captions"])})


def selection_metric(metrics: dict[str, float]) -> tuple[str, float]:
    """Which validation figure picks best/: object F1 on shapes, CIDEr on real captions."""
    for name in ("object_f1", "CIDEr", "cider", "CIDEr-D"):
        if name in metrics:
            return name, float(metrics[name])
    raise KeyError(f"no selection metric among {sorted(metrics)}")


# ------------------------------------------------------------------------------------------------ training
def save_checkpoint(folder: Path, model: ImageCaptioner, cfg: TrainConfig, extra: dict | None = None,
                    optimizer=None, scheduler=None, state: dict | None = None) -> None:
    """Atomically write a Hub-format folder (+ training state for resumable `last/`)."""
    def write(temp: Path) -> None:
        model.save_pretrained(temp)
        (temp / TRAINING_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        for name, payload in (extra or {}).items():
            (temp / name).write_text(json.dumps(payload, indent=2))
        if optimizer is not None:
            save_training_state(temp, optimizer, scheduler, state or {})
    write_folder_atomically(folder, write)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run training; returns the output folder (with best/, last/, metrics.json, plots)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    trackers = [cfg.report_to] if cfg.report_to else None
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=trackers, project_dir=str(output),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    set_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if trackers:
        accelerator.init_trackers("captioner", config=_flat(dataclasses.asdict(cfg)))

    data, _ = load_data(cfg)
    last = output / "last"
    recover_checkpoint(last)
    recover_checkpoint(output / "best")
    if resume and not (last / "model.safetensors").is_file():
        raise SystemExit(f"--resume: no checkpoint to resume from at {last} (run without --resume first)")
    if resume:
        model = ImageCaptioner.from_pretrained(str(last))
    else:
        model = build_model(cfg, [c for caps in data["train"]["captions"] for c in caps])
    model.to(accelerator.device)

    cache = None
    if cfg.feature_cache and model.encoder.num_frozen_stages > 0:
        from caption_model.feature_cache import FeatureCache

        cache = FeatureCache(cfg.cache_dir or output / "feature_cache", model)
    collate = CaptionBatches(model, cache, max_tokens=cfg.max_caption_words + 2, seed=cfg.seed,
                             all_captions=cfg.all_captions)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg))
    P = accelerator.num_processes
    steps_per_epoch = math.ceil(math.ceil(len(data["train"]) / (cfg.batch_size * P)) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    # Accelerate steps a prepared scheduler once per process per optimizer step: count in those units.
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps) * P, total_steps * P)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model: ImageCaptioner = accelerator.unwrap_model(model)

    state = {"step": 0, "epoch": 0, "batches_done": 0, "best_name": None, "best_score": -math.inf}
    if resume:
        state.update(load_training_state(last, optimizer, scheduler))
        logger.info("resuming from %s at step %d (epoch %d)", last, state["step"], state["epoch"])
    log_path = output / "log.jsonl"
    if not resume and log_path.exists():
        log_path.unlink()

    def checkpoint_last() -> None:
        if accelerator.is_main_process:
            save_checkpoint(last, raw_model, cfg, optimizer=optimizer, scheduler=scheduler, state=state)

    def epoch_loader(epoch: int, skip: int):
        """The same shuffled order for an epoch whatever happened before, so --resume can skip batches."""
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(data["train"]))
        collate.epoch_seed = cfg.seed * 1_000_003 + epoch
        loader = torch.utils.data.DataLoader(data["train"].select(order), batch_size=cfg.batch_size,
                                             shuffle=False, collate_fn=collate, num_workers=cfg.num_workers)
        loader = accelerator.prepare_data_loader(loader)
        return accelerator.skip_first_batches(loader, skip) if skip else loader

    progress = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step",
                    disable=not accelerator.is_local_main_process)
    started, images_seen = time.perf_counter(), 0
    while state["step"] < total_steps:
        epoch, skipped = state["epoch"], state["batches_done"]
        model.train()
        for batch_index, batch in enumerate(epoch_loader(epoch, skipped), start=skipped):
            with accelerator.accumulate(model):
                out = model(**batch, context_loss_weight=cfg.context_loss_weight)
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(
                        f"non-finite loss {out.loss.item()} at step {state['step']} "
                        f"(terms: { {k: v.item() for k, v in out.losses.items()} }); lower --lr or use "
                        f"--mixed-precision no; the last good checkpoint is {last}")
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state["batches_done"] = batch_index + 1
            images_seen += batch["image_features" if "image_features" in batch else "pixel_values"].shape[0]
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            progress.update(1)
            rate = images_seen / max(time.perf_counter() - started, 1e-9)
            progress.set_postfix(loss=f"{out.loss.item():.3f}", img_s=f"{rate:.1f}", epoch=epoch)
            if state["step"] % cfg.log_every_steps == 0 or state["step"] == 1:
                _log(accelerator, log_path, {
                    "step": state["step"], "epoch": epoch, "loss": out.loss.item(),
                    **{f"loss_{k}": v.item() for k, v in out.losses.items()},
                    "lr": scheduler.get_last_lr()[0], "images_per_s": rate})
            if cfg.save_every_steps and state["step"] % cfg.save_every_steps == 0:
                checkpoint_last()
            if state["step"] >= total_steps:
                break
        else:  # the epoch ran to its end
            state["epoch"], state["batches_done"] = epoch + 1, 0
        if cache is not None:
            _log(accelerator, log_path, {"step": state["step"], "epoch": epoch, "cache_hits": cache.hits,
                                         "cache_misses": cache.misses})
        epoch_done = state["batches_done"] == 0
        if accelerator.is_main_process and (
                (epoch_done and (epoch + 1) % cfg.eval_every_epochs == 0) or state["step"] >= total_steps):
            metrics = evaluate(raw_model, data["validation"], cfg, desc=f"validation (epoch {epoch})")
            name, score = selection_metric(metrics)
            _log(accelerator, log_path, {"step": state["step"], "epoch": epoch,
                                         **{f"val_{k}": v for k, v in metrics.items()}})
            logger.info("epoch %d validation: %s", epoch, _fmt(metrics))
            if score > state["best_score"]:
                state["best_name"], state["best_score"] = name, score
                save_checkpoint(output / "best", raw_model, cfg, extra={"validation_metrics.json": metrics})
        checkpoint_last()
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish(output, cfg, data)
    accelerator.end_training()
    return output


def finish(output: Path, cfg: TrainConfig, data) -> dict:
    """Evaluate best/ on validation and test -> metrics.json; plot the loss curve and sample heatmaps."""
    best = ImageCaptioner.from_pretrained(str(output / "best"))
    metrics = {"validation": evaluate(best, data["validation"], cfg, desc="validation"),
               "test": evaluate(best, data["test"], cfg, desc="test"),
               "eval": {"num_beams": cfg.eval_beams, "max_length": cfg.eval_max_length,
                        "max_eval_images": cfg.max_eval_images, "source": cfg.source}}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # keep a copy inside best/ so push_to_hub publishes it with the weights
    shutil.copy(output / "metrics.json", output / "best" / "metrics.json")
    plot_loss_curve(output / "log.jsonl", output / "loss_curve.png")
    plot_samples(best, data["test"], output / "samples.png")
    shutil.copy(output / "samples.png", output / "best" / "samples.png")
    logger.info("test: %s", _fmt(metrics["test"]))
    print(json.dumps({"output_dir": str(output), "test": metrics["test"]}))
    return metrics


def plot_loss_curve(log_path: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["loss"] for r in records if "loss" in r], label="train loss")
    val = [(r["step"], v) for r in records for k, v in r.items() if k in ("val_object_f1", "val_CIDEr")]
    if val:
        twin = ax.twinx()
        twin.plot(*zip(*val), "o-", color="tab:orange", label="validation")
        twin.set_ylabel("validation " + ("object F1" if any("val_object_f1" in r for r in records) else "CIDEr"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def plot_samples(model: ImageCaptioner, dataset, out_path: Path, count: int = 4, max_words: int = 7) -> None:
    """A few test images: the image with its caption, then the heatmap of each word."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from caption_model.feature_cache import decode_image
    from caption_model.heatmap import overlay
    from caption_model.processing import load_image

    rows = dataset.select(range(min(count, len(dataset))))
    images = [load_image(decode_image(im)) for im in rows["image"]]
    captions = model.caption_batch(images, num_beams=3)
    fig, axes = plt.subplots(len(images), max_words + 1, figsize=(2 * (max_words + 1), 2.2 * len(images)),
                             squeeze=False)
    for row, (image, caption) in enumerate(zip(images, captions)):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(caption.text, fontsize=7, loc="left")
        for col in range(max_words):
            ax = axes[row, col + 1]
            if col < len(caption.words):
                ax.imshow(overlay(image, caption.attention[col], alpha=0.6))
                ax.set_title(caption.words[col], fontsize=9)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)


def _log(accelerator, path: Path, record: dict) -> None:
    if accelerator.is_main_process:
        with open(path, "a") as file:
            file.write(json.dumps(record) + "\n")
    if accelerator.trackers:
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))


def _flat(values: dict) -> dict:
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in values.items()}


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


# ------------------------------------------------------------------------------------------------ entry points
def train_preset(preset: str = "shapes", output_dir: str | os.PathLike = "checkpoints/shapes", **overrides) -> Path:
    """Train a preset from Python (used by app.py's first run); returns the best/ checkpoint folder."""
    argv = ["--preset", preset, "--output-dir", os.fspath(output_dir)]
    for key, value in overrides.items():
        argv += ["--" + key.replace("_", "-"), ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    cfg, _ = parse_args(argv)
    return train(cfg) / "best"


def evaluate_checkpoint(cfg: TrainConfig, model_id: str, split: str) -> dict:
    from caption_model.data import load_caption_dataset
    from datasets import Image as ImageFeature

    model = ImageCaptioner.from_pretrained(model_id)
    data = load_caption_dataset(cfg.source, split=split, max_words=cfg.max_caption_words, seed=cfg.seed,
                                shapes_sizes=tuple(cfg.shapes_sizes))
    data = data.cast_column("image", ImageFeature(decode=False))
    metrics = evaluate(model, data, cfg, desc=split)
    print(json.dumps({"model": model_id, "split": split, **metrics}, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, args = parse_args(argv)
    try:
        if args.eval_only:
            if not args.model:
                raise SystemExit("--eval-only needs --model CHECKPOINT_DIR_OR_HUB_ID")
            evaluate_checkpoint(cfg, args.model, args.split)
        else:
            train(cfg, resume=args.resume)
    except FloatingPointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

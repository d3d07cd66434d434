"""Train (or evaluate) an ImageCaptioner on Flickr8k or the synthetic shapes data.

    python train.py --preset shapes --output-dir checkpoints/shapes          # CPU, minutes
    python train.py --preset flickr8k --output-dir checkpoints/flickr8k      # GPU; also `accelerate launch train.py`
    python train.py --preset flickr8k-small --source my_images/               # images + metadata.csv (imagefolder)
    python train.py --eval-only --model checkpoints/shapes/best --preset shapes --split test
    python train.py --preset flickr8k --print-config                          # the resolved config, as JSON

Every preset field can be overridden on the command line (`--epochs 3 --batch-size 16 ...`); the resolved
training config is saved with each checkpoint as training_config.json. The work is done by `caption_model.training`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from caption_model.training import train_preset  # noqa: F401  (app.py's first run imports it from here today)
from caption_model.training.config import PRESETS, TrainConfig, preset_config
from caption_model.training.loop import train

LIST_FIELDS = ("shapes_sizes", "encoder_trainable", "caption_columns")  # given as A,B,...


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Preset defaults <- command-line overrides; returns the config and the control flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flickr8k")
    parser.add_argument("--resume", action="store_true", help="continue from <output-dir>/last")
    parser.add_argument("--eval-only", action="store_true", help="evaluate --model on --split and print metrics")
    parser.add_argument("--model", help="checkpoint folder or Hub id for --eval-only")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved training config (preset + overrides) as JSON and exit")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, type=_parse_bool, default=argparse.SUPPRESS, metavar="{true,false}")
        elif f.name in LIST_FIELDS:
            parser.add_argument(flag, type=_parse_list, default=argparse.SUPPRESS, metavar="A,B,...")
        else:
            parser.add_argument(flag, type=_caster(f.type), default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if "shapes_sizes" in values:
        values["shapes_sizes"] = [int(v) for v in values["shapes_sizes"]]
    return preset_config(args.preset, **values), args


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


def print_config(cfg: TrainConfig, preset: str) -> None:
    """The resolved config as JSON, and its step schedule where the number of training images is known before
    loading (the Flickr8k Hub copy: 6000; shapes: as configured)."""
    from caption_model.training.config import schedule
    from caption_model.training.sources import FLICKR8K_SPLIT_SIZES

    train_images = cfg.shapes_sizes[0] if cfg.source == "shapes" else \
        FLICKR8K_SPLIT_SIZES[0] if cfg.source == "jxie/flickr8k" else None
    if cfg.max_train_images and train_images:
        train_images = min(train_images, cfg.max_train_images)
    plan = {"train_images": train_images, "captions_per_step": cfg.batch_size * (5 if cfg.all_captions else 1),
            **schedule(cfg, train_images)} if train_images else None
    print(json.dumps({"preset": preset, "config": dataclasses.asdict(cfg), "schedule": plan}, indent=2))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, args = parse_args(argv)
    if args.print_config:
        print_config(cfg, args.preset)
        return 0
    try:
        if args.eval_only:
            if not args.model:
                raise SystemExit("--eval-only needs --model CHECKPOINT_DIR_OR_HUB_ID")
            from caption_model.training.evaluation import evaluate_checkpoint

            evaluate_checkpoint(cfg, args.model, args.split)
        else:
            train(cfg, resume=args.resume)
    except FloatingPointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

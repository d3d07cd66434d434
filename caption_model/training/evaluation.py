"""Score a captioner on a dataset split: object F1 + pointing accuracy on shapes, COCO-caption metrics otherwise."""

from __future__ import annotations

import torch

from caption_model import ImageCaptioner
from caption_model.heatmap import DEFAULT_INPUT_SIZE
from caption_model.processing import load_image
from caption_model.training.checkpointing import to_json
from caption_model.training.config import TrainConfig
from caption_model.training.data import load_training_data
from caption_model.training.feature_cache import decode_image
from caption_model.training.metrics import coco_caption_scores, shapes_scores

EVAL_BATCH_SIZE = 32  # images captioned per caption_batch call (at most the training batch size)


def caption_dataset(model: ImageCaptioner, dataset, cfg: TrainConfig, desc: str = "eval") -> list:
    """Caption every image of `dataset` with `cfg.eval_beams` in batches, on the model's device -> Captions."""
    from tqdm.auto import tqdm

    captions, batch = [], max(1, min(cfg.batch_size, EVAL_BATCH_SIZE))
    for start in tqdm(range(0, len(dataset), batch), desc=desc, leave=False, unit="batch"):
        images = [decode_image(image) for image in dataset[start:start + batch]["image"]]
        captions += model.caption_batch(images, num_beams=cfg.eval_beams, max_length=cfg.eval_max_length)
    return captions


def score(captions: list, dataset, input_size: int = DEFAULT_INPUT_SIZE) -> dict[str, float]:
    """Object F1 + pointing accuracy when `dataset` has shapes objects (`input_size`: the model's input side, for
    the cell geometry), else the COCO-caption metrics against the raw `references` (the captions as the source
    wrote them; the COCO-caption protocol tokenises them itself), never the cleaned training targets."""
    if "objects" in dataset.column_names:
        objects = [[(o["colour"], o["shape"], tuple(o["box"])) for o in objs] for objs in dataset["objects"]]
        sizes = [load_image(decode_image(image)).size for image in dataset["image"]]  # (W, H)
        return shapes_scores(captions, objects, sizes, input_size)
    if "references" not in dataset.column_names:
        raise ValueError(f"expected a `references` column (the raw captions, as data.load_caption_dataset writes it) "
                         f"to score against, got columns {dataset.column_names}")
    ids = [str(i) for i in dataset["image_id"]]
    return coco_caption_scores({i: c.text for i, c in zip(ids, captions)},
                               {i: list(refs) for i, refs in zip(ids, dataset["references"])})


def evaluate(model: ImageCaptioner, dataset, cfg: TrainConfig, desc: str = "eval") -> dict[str, float]:
    """Caption the first `cfg.max_eval_images` images of `dataset` with `cfg.eval_beams` and score them."""
    if cfg.max_eval_images:
        dataset = dataset.select(range(min(cfg.max_eval_images, len(dataset))))
    return score(caption_dataset(model, dataset, cfg, desc), dataset, model.config.image_size)


def selection_metric(metrics: dict[str, float]) -> tuple[str, float]:
    """Which validation figure picks best/: object F1 on shapes, CIDEr on real captions."""
    for name in ("object_f1", "CIDEr", "cider", "CIDEr-D"):
        if name in metrics:
            return name, float(metrics[name])
    raise KeyError(f"no selection metric among {sorted(metrics)}")


def pick_device(name: str | None = None) -> torch.device:
    """`name` (cuda, mps, cpu), else the GPU when there is one (cuda, then mps), else the CPU."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name not in ("cuda", "mps", "cpu"):
        raise ValueError(f"expected device cuda, mps or cpu, got {name!r}")
    return torch.device(name)


def evaluate_checkpoint(cfg: TrainConfig, model_id: str, split: str) -> dict[str, float]:
    """Load a checkpoint folder or Hub id, score it on `split` of `cfg`'s data (on `cfg.device`, default the GPU
    when there is one) and print the metrics as JSON."""
    model = ImageCaptioner.from_pretrained(model_id).to(pick_device(cfg.device))
    metrics = evaluate(model, load_training_data(cfg, split), cfg, desc=split)
    print(to_json({"model": model_id, "split": split, **metrics}))
    return metrics

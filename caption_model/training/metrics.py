"""Caption metrics: COCO-caption scores (pycocoevalcap) and the shapes benchmark (object F1, pointing accuracy).

COCO-caption scoring lives in `coco_caption_metric/coco_caption_metric.py`, the local `evaluate` module
(`evaluate.load(COCO_CAPTION_METRIC_PATH)` works offline); it is re-exported here as `coco_caption_scores`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from caption_model.training.coco_caption_metric.coco_caption_metric import (coco_caption_scores, java_available,
                                                                            ptb_tokenize, python_tokenize)
from caption_model.training.shapes import COLOUR_WORDS, SHAPE_WORDS

__all__ = ["COCO_CAPTION_METRIC_PATH", "coco_caption_scores", "java_available", "ptb_tokenize", "python_tokenize",
           "object_pairs", "object_f1", "pointing_counts", "pointing_accuracy", "shapes_scores"]

COCO_CAPTION_METRIC_PATH = str(Path(__file__).parent / "coco_caption_metric")  # for evaluate.load(...)

Pair = tuple[str, str]  # (colour, shape)


# ------------------------------------------------------------------------------------------ shapes objects


def _as_object(obj: Any) -> tuple[str, str, tuple[float, float, float, float]]:
    """(colour, shape, box) from a ShapeObject, a {colour, shape, box} dict (dataset row) or a tuple."""
    if isinstance(obj, dict):
        colour, shape, box = obj["colour"], obj["shape"], obj["box"]
    elif hasattr(obj, "colour"):
        colour, shape, box = obj.colour, obj.shape, obj.box
    else:
        colour, shape, box = obj
    if len(box) != 4:
        raise ValueError(f"expected a box (x0, y0, x1, y1), got {box!r}")
    return str(colour), str(shape), tuple(float(v) for v in box)


def _words(text_or_words: str | Sequence[str]) -> list[str]:
    words = text_or_words.split() if isinstance(text_or_words, str) else text_or_words
    return [w.lower().strip(".,;:!?") for w in words]


def _pair_positions(words: Sequence[str]) -> list[tuple[int, Pair]]:
    """(index of the colour word, (colour, shape)) for every "<colour> <shape>" in `words`."""
    return [(i, (a, b)) for i, (a, b) in enumerate(zip(words, words[1:])) if a in COLOUR_WORDS and b in SHAPE_WORDS]


def object_pairs(text: str | Sequence[str]) -> set[Pair]:
    """The set of (colour, shape) pairs a caption names as "<colour> <shape>"."""
    return {pair for _, pair in _pair_positions(_words(text))}


# ----------------------------------------------------------------------------------------------- object F1


def object_f1(generated: str | Sequence[str], objects: Sequence) -> dict[str, float]:
    """Micro precision/recall/F1 of named "<colour> <shape>" pairs against the true objects.

    generated: one caption with `objects` its image's objects, or a list of captions with `objects` a list
    (one list of objects per caption). F1 is 1.0 when there is nothing to find and nothing was named.
    """
    if isinstance(generated, str):
        generated, objects = [generated], [objects]
    if len(generated) != len(objects):
        raise ValueError(f"expected one objects list per caption, got {len(generated)} captions and "
                         f"{len(objects)} objects lists")
    tp = fp = fn = 0
    for text, objs in zip(generated, objects):
        predicted = object_pairs(text)
        truth = {_as_object(o)[:2] for o in objs}
        tp, fp, fn = tp + len(predicted & truth), fp + len(predicted - truth), fn + len(truth - predicted)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


# ---------------------------------------------------------------------------------------- pointing accuracy


def _cell_centre(attention_map: np.ndarray, image_size: tuple[int, int]) -> tuple[float, float]:
    """Centre (x, y), in image pixels, of the argmax cell of a (gh, gw) map."""
    gh, gw = attention_map.shape
    width, height = image_size
    i, j = np.unravel_index(int(np.argmax(attention_map)), (gh, gw))
    return (j + 0.5) * width / gw, (i + 0.5) * height / gh


def _inside_grown_box(point: tuple[float, float], box, margin: tuple[float, float]) -> bool:
    (x, y), (x0, y0, x1, y1), (mx, my) = point, box, margin
    return x0 - mx <= x <= x1 + mx and y0 - my <= y <= y1 + my


def pointing_counts(words: Sequence[str], attention: np.ndarray, objects: Sequence,
                    image_size: tuple[int, int]) -> tuple[int, int]:
    """(hits, total) over the colour and shape words of every correctly named "<colour> <shape>" pair.

    words: the caption's words (`Caption.words`); attention: (n_words, gh, gw), map k belongs to words[k];
    objects: the image's true objects; image_size: (W, H) of the original image. A word hits when the centre of
    its map's argmax cell (cell (i, j) spans x in [j W/gw, (j+1) W/gw), y in [i H/gh, (i+1) H/gh)) lies in its
    object's box grown by half a cell on every side.
    """
    attention = np.asarray(attention)
    if attention.ndim != 3 or attention.shape[0] != len(words):
        raise ValueError(f"expected attention of shape (n_words={len(words)}, gh, gw), got {attention.shape}")
    width, height = image_size
    gh, gw = attention.shape[1:]
    margin = (0.5 * width / gw, 0.5 * height / gh)
    boxes = {o[:2]: o[2] for o in map(_as_object, objects)}
    hits = total = 0
    for index, pair in _pair_positions(_words(words)):
        if pair not in boxes:
            continue  # a wrongly named object has no box to point at; object F1 counts it
        for k in (index, index + 1):  # the colour word and the shape word
            total += 1
            hits += _inside_grown_box(_cell_centre(attention[k], image_size), boxes[pair], margin)
    return hits, total


def pointing_accuracy(words: Sequence[str], attention: np.ndarray, objects: Sequence,
                      image_size: tuple[int, int]) -> float:
    """hits / total of `pointing_counts` for one caption; NaN when it names no true object."""
    hits, total = pointing_counts(words, attention, objects, image_size)
    return hits / total if total else float("nan")


def shapes_scores(captions: Sequence, objects: Sequence, image_sizes: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Shapes benchmark over a dataset: object precision/recall/F1 and pointing accuracy (micro over words).

    captions: `Caption`s (with .text, .words, .attention); objects: per image, its objects; image_sizes: (W, H).
    """
    if not len(captions) == len(objects) == len(image_sizes):
        raise ValueError(f"expected as many objects lists and image sizes as captions, got {len(captions)} "
                         f"captions, {len(objects)} objects lists, {len(image_sizes)} sizes")
    f1 = object_f1([c.text for c in captions], objects)
    hits = total = 0
    for caption, objs, size in zip(captions, objects, image_sizes):
        h, t = pointing_counts(caption.words, caption.attention, objs, size)
        hits, total = hits + h, total + t
    return {"object_precision": f1["precision"], "object_recall": f1["recall"], "object_f1": f1["f1"],
            "pointing_accuracy": hits / total if total else float("nan"), "pointed_words": total}

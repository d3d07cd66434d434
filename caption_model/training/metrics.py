"""Caption metrics: COCO-caption scores (pycocoevalcap) and the shapes benchmark (object F1, pointing accuracy
on the map the overlay draws).

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
from caption_model.heatmap import DEFAULT_INPUT_SIZE, upsample
from caption_model.training.shapes import COLOUR_WORDS, SHAPE_WORDS

__all__ = ["COCO_CAPTION_METRIC_PATH", "coco_caption_scores", "java_available", "ptb_tokenize", "python_tokenize",
           "object_pairs", "object_f1", "pointing_records", "pointing_counts", "pointing_accuracy", "pointing_by_kind",
           "shapes_scores"]

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


def _peak(attention_map: np.ndarray, image_size: tuple[int, int], input_size: int) -> tuple[float, float]:
    """Centre (x, y), in image pixels, of the brightest pixel of the map the overlay draws (heatmap.upsample)."""
    width, height = image_size
    heat = upsample(attention_map, (width, height), input_size)  # (H, W)
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return x + 0.5, y + 0.5


def _inside_grown_box(point: tuple[float, float], box, margin: tuple[float, float]) -> bool:
    (x, y), (x0, y0, x1, y1), (mx, my) = point, box, margin
    return x0 - mx <= x <= x1 + mx and y0 - my <= y <= y1 + my


def pointing_records(words: Sequence[str], attention: np.ndarray, objects: Sequence, image_size: tuple[int, int],
                     input_size: int = DEFAULT_INPUT_SIZE) -> list[dict]:
    """One record per colour and shape word of every correctly named "<colour> <shape>" pair:
    {"word", "kind" ("colour" | "shape"), "hit", "dx", "dy"}.

    words: the caption's words (`Caption.words`); attention: (n_words, gh, gw), map k belongs to words[k];
    objects: the image's true objects; image_size: (W, H) of the original image; input_size: the model's input side
    S. Judged on what the user sees: a word hits when the brightest pixel of `heatmap.upsample(map, (W, H))` lies
    in its object's box grown by half a cell (W / gw, H / gh) on every side. (dx, dy): that pixel's signed offset
    from the box centre in cells (x right, y down).
    """
    attention = np.asarray(attention)
    if attention.ndim != 3 or attention.shape[0] != len(words):
        raise ValueError(f"expected attention of shape (n_words={len(words)}, gh, gw), got {attention.shape}")
    width, height = image_size
    gh, gw = attention.shape[1:]
    cell = (width / gw, height / gh)  # (cw, ch) image pixels per cell
    boxes = {o[:2]: o[2] for o in map(_as_object, objects)}
    records = []
    for index, pair in _pair_positions(_words(words)):
        if pair not in boxes:
            continue  # a wrongly named object has no box to point at; object F1 counts it
        x0, y0, x1, y1 = boxes[pair]
        for k, kind in ((index, "colour"), (index + 1, "shape")):
            x, y = _peak(attention[k], image_size, input_size)
            records.append({"word": pair[0] if kind == "colour" else pair[1], "kind": kind,
                            "hit": _inside_grown_box((x, y), boxes[pair], (cell[0] / 2, cell[1] / 2)),
                            "dx": (x - (x0 + x1) / 2) / cell[0], "dy": (y - (y0 + y1) / 2) / cell[1]})
    return records


def pointing_counts(words: Sequence[str], attention: np.ndarray, objects: Sequence, image_size: tuple[int, int],
                    input_size: int = DEFAULT_INPUT_SIZE) -> tuple[int, int]:
    """(hits, total) over the colour and shape words of every correctly named pair (see `pointing_records`)."""
    records = pointing_records(words, attention, objects, image_size, input_size)
    return sum(r["hit"] for r in records), len(records)


def pointing_accuracy(words: Sequence[str], attention: np.ndarray, objects: Sequence,
                      image_size: tuple[int, int], input_size: int = DEFAULT_INPUT_SIZE) -> float:
    """hits / total of `pointing_counts` for one caption; NaN when it names no true object."""
    hits, total = pointing_counts(words, attention, objects, image_size, input_size)
    return hits / total if total else float("nan")


def pointing_by_kind(records: Sequence[dict]) -> dict[str, float]:
    """Per word kind (colour, shape): hit rate, mean signed offset in cells (x right, y down) and word count."""
    scores: dict[str, float] = {}
    for kind in ("colour", "shape"):
        mine = [r for r in records if r["kind"] == kind]
        hit, dx, dy = (np.mean([[r["hit"], r["dx"], r["dy"]] for r in mine], axis=0) if mine
                       else (float("nan"),) * 3)
        scores.update({f"pointing_{kind}": float(hit), f"offset_{kind}_x": float(dx), f"offset_{kind}_y": float(dy),
                       f"pointed_{kind}_words": len(mine)})
    return scores


def shapes_scores(captions: Sequence, objects: Sequence, image_sizes: Sequence[tuple[int, int]],
                  input_size: int = DEFAULT_INPUT_SIZE) -> dict[str, float]:
    """Shapes benchmark over a dataset: object precision/recall/F1 and pointing accuracy (micro over words), and
    per word kind (`pointing_by_kind`): pointing_colour, pointing_shape, offset_{colour,shape}_{x,y} in cells.

    captions: `Caption`s (with .text, .words, .attention); objects: per image, its objects; image_sizes: (W, H);
    input_size: the model's input side S (`config.image_size`: cell geometry, see heatmap.cell_centres).
    """
    if not len(captions) == len(objects) == len(image_sizes):
        raise ValueError(f"expected as many objects lists and image sizes as captions, got {len(captions)} "
                         f"captions, {len(objects)} objects lists, {len(image_sizes)} sizes")
    f1 = object_f1([c.text for c in captions], objects)
    records = [r for caption, objs, size in zip(captions, objects, image_sizes)
               for r in pointing_records(caption.words, caption.attention, objs, size, input_size)]
    hits, total = sum(r["hit"] for r in records), len(records)
    return {"object_precision": f1["precision"], "object_recall": f1["recall"], "object_f1": f1["f1"],
            "pointing_accuracy": hits / total if total else float("nan"), "pointed_words": total,
            **pointing_by_kind(records)}

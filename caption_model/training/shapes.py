"""Synthetic shapes images: the offline smoke/demo dataset, with ground-truth boxes for grounding metrics.

Spec: canvas W, H uniform in [160, 480]; background one RGB colour, channels in [225, 255];
1-3 objects, distinct (colour, shape) pairs, non-overlapping boxes of side [0.2, 0.35] * min(W, H) fully inside
the canvas. Every caption names each object once as "<colour> <shape>"; relations come from box centres.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOUR_WORDS = frozenset(COLOURS)
SHAPE_WORDS = frozenset(SHAPES)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive), in pixels


@dataclass
class ShapeObject:
    colour: str
    shape: str
    box: Box

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class ShapesExample:
    image: Image.Image
    captions: list[str]
    objects: list[ShapeObject] = field(default_factory=list)


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject) -> None:
    x0, y0, x1, y1 = obj.box
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    """Relation of a to b from box centres, along the axis where they differ most."""
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ax - bx) >= abs(ay - by):
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"


_ONE_TEMPLATES = ("a {a}", "a {a} on a plain background", "there is a {a}", "a single {a}", "an image of a {a}")
_TWO_TEMPLATES = (
    "a {a} {rel} a {b}",
    "a {a} and a {b}",
    "there is a {a} {rel} a {b}",
    "a {b} and a {a} {rel} it",
    "two shapes a {a} and a {b}",
)
_THREE_TEMPLATES = (
    "a {a} a {b} and a {c}",
    "a {a} {rel} a {b} and a {c}",
    "three shapes a {a} a {b} and a {c}",
    "there is a {a} a {b} and a {c}",
    "a {c} with a {a} {rel} a {b}",
)


def make_captions(objects: list[ShapeObject], rng: np.random.Generator) -> list[str]:
    """Five varied captions; each names every object exactly once."""
    captions = []
    for template_index in range(5):
        order = [objects[i] for i in rng.permutation(len(objects))]
        names = {key: obj.name for key, obj in zip("abc", order)}
        if len(order) == 1:
            template = _ONE_TEMPLATES[template_index]
        elif len(order) == 2:
            template = _TWO_TEMPLATES[template_index]
        else:
            template = _THREE_TEMPLATES[template_index]
        rel = _relation(order[0], order[1]) if len(order) > 1 else ""
        captions.append(template.format(rel=rel, **names))
    return captions


def generate_shapes_example(rng: np.random.Generator, max_tries: int = 200) -> ShapesExample:
    """One image of the spec above with five captions and the objects' boxes."""
    width, height = (int(v) for v in rng.integers(160, 481, size=2))
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    num_objects = int(rng.integers(1, 4))
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = [kinds[i] for i in rng.choice(len(kinds), size=num_objects, replace=False)]

    objects: list[ShapeObject] = []
    for colour, shape in chosen:
        for _ in range(max_tries):
            side = int(round(rng.uniform(0.2, 0.35) * min(width, height)))
            x0 = int(rng.integers(0, width - side + 1))
            y0 = int(rng.integers(0, height - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if not any(_overlaps(box, other.box) for other in objects):
                objects.append(ShapeObject(colour, shape, box))
                break
    # Rarely the canvas is too crowded for the last object: keep the ones that fit.
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj)
    return ShapesExample(image=image, captions=make_captions(objects, rng), objects=objects)


def shapes_corpus(num_examples: int = 200, seed: int = 0) -> list[str]:
    """All captions of `num_examples` generated images (for training a tokenizer)."""
    rng = np.random.default_rng(seed)
    return [c for _ in range(num_examples) for c in generate_shapes_example(rng).captions]

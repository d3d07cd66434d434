"""Caption datasets for training and evaluation: one schema for every source, bad records skipped and counted.

Every source (`sources.load_source`, or "shapes") ends as a `datasets.DatasetDict` with splits
train/validation/test and one schema:

    image       datasets.Image()   (bytes or a local path; decodes to PIL)
    captions    list[str]          training targets: cleaned (lowercase, no punctuation but in-word apostrophes
                                   and hyphens, at most `max_words` words), never empty
    references  list[str]          the same captions as the source wrote them (those that clean to something):
                                   what validation and test are scored against, because the COCO-caption protocol
                                   tokenises raw references itself ("A dog's T-shirt ." is "a dog 's t-shirt"
                                   there; cleaning keeps "dog's" and "t-shirt" so that targets read the same)
    image_id    str                an id column, else the image's file name (path inside an imagefolder),
                                   "shapes-<split>-<n>" for shapes
    objects     list[{colour, shape, box}]   shapes only (ground truth for object F1 / pointing accuracy)

Bad records never crash a run: an unreadable image (missing, corrupt, truncated, not an image) drops its record,
an empty caption drops that caption (and the record when none is left); all are counted in a `LoadReport` and
logged. The `LoadReport` also says how the images were split (`sources.SPLIT_METHODS`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, DatasetInfo, Features, Image, List, Value, concatenate_datasets
from datasets.table import InMemoryTable
from PIL import Image as PILImage

from caption_model.processing import in_threads
from caption_model.training.shapes import generate_shapes_example
from caption_model.training.sources import (SPLIT_GENERATED, SPLITS, Columns, describe_split, load_source,
                                            source_kind)

if TYPE_CHECKING:
    from caption_model.training.config import TrainConfig

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "jxie/flickr8k"
MAX_CAPTION_WORDS = 30


# --------------------------------------------------------------------------------------------------- cleaning


IN_WORD_MARKS = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")  # a word: letters/digits, joined by ' or - inside


def clean_caption(text: str | None, max_words: int | None = MAX_CAPTION_WORDS) -> str:
    """Lowercase; keep an apostrophe or hyphen between two letters or digits ("dog's", "t-shirt", "isn't": one
    word each); every other punctuation mark becomes a space; collapse whitespace; keep `max_words` words.

    The in-word marks stay because the COCO-caption scorer reads raw references with the PTB tokenizer, which keeps
    "t-shirt" whole and splits "dog's" into "dog 's": a target cleaned to "dogs" or "t shirt" would teach the model
    words that never match a reference. Other marks (a trailing "dogs'", a dash between words) are dropped there too.
    """
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ValueError(f"expected a caption string, got {type(text).__name__}: {text!r}")
    text = re.sub(r"[\u2019\u2018`\u00b4]", "'", text.lower())  # typographic apostrophes -> '
    words = IN_WORD_MARKS.findall(text)  # "a dog's t-shirt, - running!" -> [a, dog's, t-shirt, running]
    return " ".join(words[:max_words] if max_words else words)


# ----------------------------------------------------------------------------------------------- load report


@dataclass
class LoadReport:
    """What loading dropped, per reason (counts over all splits) and the kept images per split."""

    unreadable_images: int = 0  # missing, corrupt, truncated or not an image: record dropped
    empty_captions: int = 0  # caption text empty after cleaning: caption dropped
    images_without_captions: int = 0  # readable image whose captions were all empty: record dropped
    kept: dict[str, int] = field(default_factory=dict)  # split -> images kept
    unreadable_ids: list[str] = field(default_factory=list)  # image_id of every unreadable image
    split_method: str = ""  # how the images were split: one of sources.SPLIT_METHODS

    def summary(self) -> str:
        kept = ", ".join(f"{k}={v}" for k, v in self.kept.items())
        return (f"skipped {self.unreadable_images} unreadable images, {self.empty_captions} empty captions, "
                f"{self.images_without_captions} images without captions; kept {kept}")


# ------------------------------------------------------------------------------------------ record checking


def _image_readable(image: dict) -> bool:
    """True when PIL can verify and fully decode the image given as {"bytes", "path"}."""
    try:
        def open_image():
            data = image.get("bytes")
            return PILImage.open(io.BytesIO(data) if data else image["path"])

        with open_image() as im:
            im.verify()  # structure / checksums
        with open_image() as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, still reads every scan (catches truncation)
            im.load()
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return False


def _check_record(image: dict, captions: list, max_words: int | None, validate: bool) -> dict:
    """Columns `captions` (cleaned, empties dropped), `references` (the kept ones as written), `_empty` (how many
    dropped), `_readable`."""
    cleaned = [clean_caption(c, max_words) for c in captions]
    kept = [(clean, raw) for clean, raw in zip(cleaned, captions) if clean]
    return {"captions": [clean for clean, _ in kept], "references": [raw for _, raw in kept],
            "_empty": len(cleaned) - len(kept), "_readable": _image_readable(image) if validate else True}


def _empty_split(features: Features) -> Dataset:
    """A dataset of no rows with `features`, built from an empty Arrow table: `add_column` on an empty selection
    fails in datasets (it concatenates zero-row tables), and naming the fingerprint spares hashing the table."""
    table = pa.Table.from_pylist([], schema=features.arrow_schema)
    made_by = json.dumps(["empty", features.to_dict()], sort_keys=True, default=str)
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=features.copy()),
                   fingerprint=hashlib.sha256(made_by.encode()).hexdigest()[:16])


def _clean_split(ds: Dataset, max_words: int | None, report: LoadReport, validate_images: bool) -> Dataset:
    """Clean captions, drop unreadable images and empty captions (counted in `report`), decode images as PIL."""
    if len(ds) == 0:  # a split too small to hold an image (a seeded split of 2 images)
        return _empty_split(Features({**ds.features, "image": Image(), "references": List(Value("string"))}))
    ds = ds.cast_column("image", Image(decode=False))
    checks = ds.map(_check_record, input_columns=["image", "captions"], remove_columns=ds.column_names,
                    fn_kwargs={"max_words": max_words, "validate": validate_images}, num_proc=1,
                    desc="checking images and captions")
    ds = concatenate_datasets([ds.remove_columns("captions"), checks], axis=1)

    readable = np.asarray(list(ds["_readable"]), dtype=bool)
    has_caption = np.asarray([len(c) > 0 for c in ds["captions"]], dtype=bool)
    ids = list(ds["image_id"])
    report.unreadable_images += int((~readable).sum())
    report.unreadable_ids += [ids[i] for i in np.flatnonzero(~readable)]
    report.empty_captions += int(sum(ds["_empty"]))
    report.images_without_captions += int((readable & ~has_caption).sum())

    ds = ds.select(np.flatnonzero(readable & has_caption))
    return ds.remove_columns(["_readable", "_empty"]).cast_column("image", Image())


def _finish(splits: dict[str, Dataset], max_words: int | None, validate_images: bool,
            source: str, split_method: str) -> tuple[DatasetDict, LoadReport]:
    report = LoadReport(split_method=split_method)
    out = DatasetDict()
    for name in SPLITS:
        out[name] = _clean_split(splits[name], max_words, report, validate_images)
        report.kept[name] = len(out[name])
    log = logger.warning if report.unreadable_images or report.empty_captions else logger.info
    log("%s: %s", source, report.summary())
    return out, report


# ------------------------------------------------------------------------------------------------ shapes


_SHAPES_FEATURES = Features(
    image=Image(), captions=List(Value("string")), references=List(Value("string")), image_id=Value("string"),
    objects=List({"colour": Value("string"), "shape": Value("string"), "box": List(Value("int32"))}))


def _shapes_split(name: str, size: int, rng: np.random.Generator) -> Dataset:
    # The split's fingerprint names what made it (split, size, generator state) instead of datasets hashing the
    # finished table with dill, which raises PicklingError on pyarrow's MonthDayNano under Python 3.12.
    made_by = json.dumps([name, size, rng.bit_generator.state], sort_keys=True, default=str)
    rows: dict[str, list] = {"image": [], "captions": [], "references": [], "image_id": [], "objects": []}
    for i in range(size):
        example = generate_shapes_example(rng)
        rows["image"].append(example.image)
        rows["captions"].append([clean_caption(c) for c in example.captions])
        rows["references"].append(list(example.captions))
        rows["image_id"].append(f"shapes-{name}-{i:06d}")
        rows["objects"].append([{"colour": o.colour, "shape": o.shape, "box": [int(v) for v in o.box]}
                                for o in example.objects])
    rows["image"] = in_threads(_SHAPES_FEATURES["image"].encode_example, rows["image"])  # PNG bytes, in parallel
    table = pa.Table.from_pydict(_SHAPES_FEATURES.encode_batch(rows), schema=_SHAPES_FEATURES.arrow_schema)
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=_SHAPES_FEATURES.copy()),
                   fingerprint=hashlib.sha256(made_by.encode()).hexdigest()[:16])


def load_shapes_dataset(num_train: int = 2000, num_val: int = 200, num_test: int = 200,
                        seed: int = 0) -> DatasetDict:
    """Synthetic shapes images (`shapes.generate_shapes_example`) with 5 captions and an `objects` column of boxes.

    Each split draws from its own random stream (seeded with (seed, split index)), so no image repeats across
    splits and a split's images do not depend on the other splits' sizes.
    """
    sizes = {"train": num_train, "validation": num_val, "test": num_test}
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"expected a non-negative int for the {name} size, got {size!r}")
    return DatasetDict({name: _shapes_split(name, size, np.random.default_rng([seed, index]))
                        for index, (name, size) in enumerate(sizes.items())})


# ------------------------------------------------------------------------------------------- entry points


def load_caption_dataset(source: str | Path = DEFAULT_SOURCE, split: str | None = None, *,
                         max_words: int | None = MAX_CAPTION_WORDS, seed: int = 0, cache_dir: str | None = None,
                         validate_images: bool = True, shapes_sizes: tuple[int, int, int] = (2000, 200, 200),
                         image_column: str | None = None, caption_columns: list[str] | None = None,
                         return_report: bool = False):
    """Load captions from `source` as a DatasetDict train/validation/test (schema in the module docstring).

    source: "shapes"; a local imagefolder (images + metadata.csv/.jsonl), Kaggle-layout folder, original-layout
      folder, folder of parquet files or one .parquet file; otherwise a Hub dataset id (default `jxie/flickr8k`).
    split: None for all three splits, or one split name to get that `Dataset` only.
    image_column, caption_columns: the columns of a Hub/parquet/imagefolder dataset (default: `image`, and the
      caption columns found by `sources.find_caption_columns`).
    seed: seeded split of a one-split source without split files (not Karpathy's split: `sources.describe_split`),
      and the shapes generator seed.
    return_report: also return the `LoadReport` of skipped records, as `(data, report)`.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"expected split None or one of {SPLITS}, got {split!r}")
    if str(source) == "shapes":
        data, report = load_shapes_dataset(*shapes_sizes, seed=seed), LoadReport(split_method=SPLIT_GENERATED)
        report.kept = {name: len(ds) for name, ds in data.items()}
    else:
        raw = load_source(source, seed, cache_dir, Columns(image_column, tuple(caption_columns or ())))
        data, report = _finish(raw.splits, max_words, validate_images, str(source), raw.method)
    result = data if split is None else data[split]
    return (result, report) if return_report else result


def load_training_data(cfg: TrainConfig, split: str | None = None, return_report: bool = False):
    """`cfg`'s data (all splits, or one) with images left undecoded ({bytes, path}) so the feature cache can key
    them by content; `max_train_images` cuts the train split. return_report: `(data, LoadReport)`."""
    data, report = load_caption_dataset(cfg.source, split, max_words=cfg.max_caption_words, seed=cfg.seed,
                                        shapes_sizes=tuple(cfg.shapes_sizes), image_column=cfg.image_column,
                                        caption_columns=cfg.caption_columns, return_report=True)
    logger.info("data: %s", report.summary())
    if split is None and not all(len(data[name]) for name in SPLITS):
        raise ValueError(f"{cfg.source}: expected images in every split, got {report.kept}; a source with one split "
                         f"needs at least 3 readable, captioned images")
    data = data.cast_column("image", Image(decode=False))
    if split is None and cfg.max_train_images:
        data["train"] = data["train"].select(range(min(cfg.max_train_images, len(data["train"]))))
    return (data, report) if return_report else data


def describe_data(cfg: TrainConfig, data: DatasetDict, report: LoadReport) -> dict:
    """What a checkpoint records about its data (the model card reads it): source_kind, num_train_images, and the
    split: `split_method` (sources.SPLIT_METHODS) and `split_description` ("seeded 6000/1000/1000 split (seed 0)
    of a one-split source, not comparable with published test scores")."""
    return {"source_kind": source_kind(cfg.source), "num_train_images": len(data["train"]),
            "split_method": report.split_method,
            "split_description": describe_split(report.split_method, report.kept, cfg.seed)}

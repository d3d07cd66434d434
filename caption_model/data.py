"""Caption datasets through `datasets`: Flickr8k (Hub, parquet, Kaggle and original folders), shapes, collate.

Every source ends as a `datasets.DatasetDict` with splits train/validation/test and one schema:

    image     datasets.Image()   (bytes or a local path; decodes to PIL)
    captions  list[str]          cleaned (lowercase, no punctuation, at most `max_words` words), never empty
    image_id  str                file name for Flickr8k, "shapes-<split>-<n>" for shapes
    objects   list[{colour, shape, box}]   shapes only (ground truth for object F1 / pointing accuracy)

Bad records never crash a run: an unreadable image (missing, corrupt, truncated, not an image) drops its record,
an empty caption drops that caption (and the record when none is left); all are counted in a `LoadReport` and
logged.
"""

from __future__ import annotations

import csv
import io
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, List, Value, concatenate_datasets, load_dataset
from PIL import Image as PILImage

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "jxie/flickr8k"
SPLITS = ("train", "validation", "test")
MAX_CAPTION_WORDS = 30
KARPATHY_SIZES = (6000, 1000, 1000)  # Flickr8k train/validation/test images (Karpathy & Fei-Fei 2015)
IGNORE_INDEX = -100  # label value the loss ignores

# Split names other datasets use, mapped onto ours.
_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                  "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
# Original Flickr8k layout: captions file, image folders, split files.
_TOKEN_FILE = "Flickr8k.token.txt"
_ORIGINAL_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "validation": "Flickr_8k.devImages.txt",
                "test": "Flickr_8k.testImages.txt"}
_KAGGLE_CAPTIONS = "captions.txt"


# --------------------------------------------------------------------------------------------------- cleaning


def clean_caption(text: str | None, max_words: int | None = MAX_CAPTION_WORDS) -> str:
    """Lowercase, drop apostrophes, turn other punctuation into spaces, collapse whitespace, keep `max_words`."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ValueError(f"expected a caption string, got {type(text).__name__}: {text!r}")
    text = re.sub(r"['\u2019`]", "", text.lower())  # "dog's" -> "dogs"
    words = re.sub(r"[\W_]+", " ", text).split()  # "t-shirt," -> "t shirt"
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
    """Columns `captions` (cleaned, empties dropped), `_empty` (how many dropped), `_readable`."""
    cleaned = [clean_caption(c, max_words) for c in captions]
    kept = [c for c in cleaned if c]
    return {"captions": kept, "_empty": len(cleaned) - len(kept),
            "_readable": _image_readable(image) if validate else True}


def _clean_split(ds: Dataset, max_words: int | None, report: LoadReport, validate_images: bool) -> Dataset:
    """Clean captions, drop unreadable images and empty captions (counted in `report`), decode images as PIL."""
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
            source: str) -> tuple[DatasetDict, LoadReport]:
    report = LoadReport()
    out = DatasetDict()
    for name in SPLITS:
        out[name] = _clean_split(splits[name], max_words, report, validate_images)
        report.kept[name] = len(out[name])
    log = logger.warning if report.unreadable_images or report.empty_captions else logger.info
    log("%s: %s", source, report.summary())
    return out, report


# ---------------------------------------------------------------------------------------------- splitting


def karpathy_split_sizes(num_images: int) -> tuple[int, int, int]:
    """Train/validation/test sizes: 1000/1000 held out from >= 8000 images, else the same 6:1:1 proportions."""
    if num_images < 0:
        raise ValueError(f"expected a non-negative number of images, got {num_images}")
    total = sum(KARPATHY_SIZES)
    if num_images >= total:
        held = KARPATHY_SIZES[1]
        return num_images - 2 * held, held, held
    held = round(num_images * KARPATHY_SIZES[1] / total)
    if num_images >= 3:
        held = max(held, 1)
    return num_images - 2 * held, held, held


def karpathy_split(image_ids: Sequence[str], seed: int = 0) -> dict[str, list[str]]:
    """Deterministic split of image ids: sort by name, shuffle with `seed`, cut at `karpathy_split_sizes`."""
    names = sorted(set(image_ids))
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    n_train, n_val, _ = karpathy_split_sizes(len(names))
    return {"train": shuffled[:n_train], "validation": shuffled[n_train:n_train + n_val],
            "test": shuffled[n_train + n_val:]}


def _split_by_ids(ds: Dataset, seed: int) -> dict[str, Dataset]:
    """Split one dataset Karpathy-style by its `image_id` column."""
    ids = list(ds["image_id"])
    parts = karpathy_split(ids, seed)
    split_of = {image_id: name for name, members in parts.items() for image_id in members}
    return {name: ds.select([i for i, image_id in enumerate(ids) if split_of[image_id] == name])
            for name in SPLITS}


# ------------------------------------------------------------------------------ Hub / parquet (jxie schema)


def _normalise_columns(ds: Dataset, split: str) -> Dataset:
    """Map a Hub/parquet schema (`image`, `caption_0`.. or `captions`/`caption`) onto image/captions/image_id."""
    if "image" not in ds.column_names:
        raise ValueError(f"expected an `image` column, got columns {ds.column_names}")
    numbered = sorted((c for c in ds.column_names if re.fullmatch(r"caption_\d+", c)), key=lambda c: int(c[8:]))
    if "captions" in ds.column_names:
        caption_of = lambda row: list(row["captions"] or [])  # noqa: E731
    elif numbered:
        caption_of = lambda row: [row[c] for c in numbered]  # noqa: E731
    elif "caption" in ds.column_names:
        caption_of = lambda row: [row["caption"]]  # noqa: E731
    else:
        raise ValueError(f"expected caption columns `caption_0`..`caption_N`, `captions` or `caption`, "
                         f"got {ds.column_names}")
    id_column = next((c for c in ("image_id", "filename", "file_name", "image_name") if c in ds.column_names), None)
    ds = ds.cast_column("image", Image(decode=False))

    def normalise(row, index):
        path = row["image"].get("path") if isinstance(row["image"], dict) else None
        image_id = row[id_column] if id_column else (Path(path).name if path else f"{split}-{index:06d}")
        return {"captions": caption_of(row), "image_id": str(image_id)}

    # Only the small columns are written; the image column is kept as it is (no copy of the image bytes).
    meta = ds.map(normalise, with_indices=True, remove_columns=ds.column_names,
                  features=Features(captions=List(Value("string")), image_id=Value("string")),
                  desc=f"normalising {split}")
    return concatenate_datasets([ds.select_columns(["image"]), meta], axis=1)


def _canonical_splits(raw: DatasetDict, seed: int, source: str) -> dict[str, Dataset]:
    """Rename split aliases (val, dev, ...); split Karpathy-style when only one split exists."""
    splits: dict[str, Dataset] = {}
    for name, ds in raw.items():
        canonical = _SPLIT_ALIASES.get(str(name).lower())
        if canonical is None:
            raise ValueError(f"{source}: unknown split {name!r}; expected one of {sorted(_SPLIT_ALIASES)}")
        splits[canonical] = _normalise_columns(ds, canonical)
    if set(splits) == set(SPLITS):
        return splits
    if len(splits) == 1:
        return _split_by_ids(next(iter(splits.values())), seed)
    raise ValueError(f"{source}: expected splits train/validation/test or a single split, got {sorted(raw)}")


def _parquet_split(path: Path) -> str | None:
    """Split named by a parquet file's name or folder (train-0000.parquet, data/validation/x.parquet)."""
    for part in reversed(path.parts):
        for token in re.split(r"[^a-zA-Z]+", part.lower()):
            if token in _SPLIT_ALIASES:
                return _SPLIT_ALIASES[token]
    return None


def _parquet_data_files(folder: Path) -> dict[str, list[str]]:
    files = sorted(folder.rglob("*.parquet"))
    by_split: dict[str, list[str]] = {}
    for f in files:
        by_split.setdefault(_parquet_split(f.relative_to(folder)) or "train", []).append(str(f))
    return by_split


def _load_parquet(data_files: dict[str, list[str]], cache_dir: str | None) -> DatasetDict:
    return load_dataset("parquet", data_files=data_files, cache_dir=cache_dir)


# --------------------------------------------------------------------------------------- local folders


def _records_dataset(captions_by_image: dict[str, list[str]], image_dir: Path) -> Dataset:
    """Dataset of image paths (not opened yet) + raw captions, one row per image, sorted by name."""
    names = sorted(captions_by_image)
    return Dataset.from_dict(
        {"image": [str(image_dir / n) for n in names], "captions": [captions_by_image[n] for n in names],
         "image_id": names},
        features=Features(image=Image(decode=False), captions=List(Value("string")), image_id=Value("string")))


def read_kaggle_captions(path: str | Path) -> dict[str, list[str]]:
    """`captions.txt` of the Kaggle layout: CSV with header `image,caption` (captions may hold commas)."""
    captions: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        if header[:2] != ["image", "caption"]:
            raise ValueError(f"{path}: expected the CSV header `image,caption`, got {','.join(header)!r}")
        for row in reader:
            if not row:
                continue
            # An unquoted caption with commas arrives as several fields: join them back.
            captions.setdefault(row[0].strip(), []).append(",".join(row[1:]))
    return captions


def read_flickr_tokens(path: str | Path) -> dict[str, list[str]]:
    """`Flickr8k.token.txt`: lines `name.jpg#<n><TAB>caption`."""
    captions: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            key, sep, caption = line.partition("\t")
            if not sep:
                raise ValueError(f"{path}:{number}: expected `name.jpg#n<TAB>caption`, got {line[:80]!r}")
            captions.setdefault(key.rsplit("#", 1)[0].strip(), []).append(caption)
    return captions


def _find(folder: Path, name: str) -> Path | None:
    """`folder/name`, or the first match below `folder`."""
    direct = folder / name
    return direct if direct.exists() else next(iter(sorted(folder.rglob(name))), None)


def _split_files(folder: Path) -> dict[str, set[str]] | None:
    """Image names per split from the Flickr_8k.*Images.txt files; None when they are absent."""
    found = {split: _find(folder, name) for split, name in _SPLIT_FILES.items()}
    if not any(found.values()):
        return None
    missing = [_SPLIT_FILES[s] for s, p in found.items() if p is None]
    if missing:
        raise ValueError(f"{folder}: found some split files but not {missing}; expected all three or none")
    return {split: {ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()}
            for split, p in found.items()}


def _split_folder_dataset(ds: Dataset, folder: Path, seed: int) -> dict[str, Dataset]:
    """Use the split files when the folder has them, else a Karpathy-style split."""
    members = _split_files(folder)
    if members is None:
        return _split_by_ids(ds, seed)
    ids = list(ds["image_id"])
    unlisted = sum(1 for i in ids if not any(i in m for m in members.values()))
    if unlisted:
        logger.info("%s: %d captioned images are in no split file; left out", folder, unlisted)
    return {s: ds.select([i for i, image_id in enumerate(ids) if image_id in members[s]]) for s in SPLITS}


def _load_kaggle(folder: Path, seed: int) -> dict[str, Dataset]:
    image_dir = folder / "Images"
    ds = _records_dataset(read_kaggle_captions(folder / _KAGGLE_CAPTIONS), image_dir)
    return _split_folder_dataset(ds, folder, seed)


def _load_original(folder: Path, seed: int) -> dict[str, Dataset]:
    token_file = _find(folder, _TOKEN_FILE)
    image_dir = next((d for name in _ORIGINAL_IMAGE_DIRS if (d := _find(folder, name)) and d.is_dir()), None)
    if image_dir is None:
        raise ValueError(f"{folder}: expected an image folder named one of {_ORIGINAL_IMAGE_DIRS}")
    ds = _records_dataset(read_flickr_tokens(token_file), image_dir)
    return _split_folder_dataset(ds, folder, seed)


def _load_local(path: Path, seed: int, cache_dir: str | None) -> dict[str, Dataset]:
    """Pick the layout of a local folder or parquet file."""
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{path}: expected a folder or a .parquet file, got a {path.suffix or 'plain'} file")
        split = _parquet_split(Path(path.name)) or "train"
        return _canonical_splits(_load_parquet({split: [str(path)]}, cache_dir),
                                 seed, str(path))
    if (path / _KAGGLE_CAPTIONS).is_file() and (path / "Images").is_dir():
        return _load_kaggle(path, seed)
    if _find(path, _TOKEN_FILE):
        return _load_original(path, seed)
    data_files = _parquet_data_files(path)
    if data_files:
        return _canonical_splits(_load_parquet(data_files, cache_dir), seed, str(path))
    raise ValueError(f"{path}: expected a Kaggle layout (Images/ + captions.txt), an original layout "
                     f"({_TOKEN_FILE} + image folder) or parquet files; found none")


# ------------------------------------------------------------------------------------------------ shapes


_SHAPES_FEATURES = Features(
    image=Image(), captions=List(Value("string")), image_id=Value("string"),
    objects=List({"colour": Value("string"), "shape": Value("string"), "box": List(Value("int32"))}))


def _shapes_split(name: str, size: int, rng: np.random.Generator) -> Dataset:
    from caption_model.shapes import generate_shapes_example

    rows: dict[str, list] = {"image": [], "captions": [], "image_id": [], "objects": []}
    for i in range(size):
        example = generate_shapes_example(rng)
        rows["image"].append(example.image)
        rows["captions"].append([clean_caption(c) for c in example.captions])
        rows["image_id"].append(f"shapes-{name}-{i:06d}")
        rows["objects"].append([{"colour": o.colour, "shape": o.shape, "box": [int(v) for v in o.box]}
                                for o in example.objects])
    return Dataset.from_dict(rows, features=_SHAPES_FEATURES)


def load_shapes_dataset(num_train: int = 2000, num_val: int = 200, num_test: int = 200,
                        seed: int = 0) -> DatasetDict:
    """Synthetic shapes images (DESIGN.md spec) with 5 captions and an `objects` column of boxes.

    Each split draws from its own random stream (seeded with (seed, split index)), so no image repeats across
    splits and a split's images do not depend on the other splits' sizes.
    """
    sizes = {"train": num_train, "validation": num_val, "test": num_test}
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"expected a non-negative int for the {name} size, got {size!r}")
    return DatasetDict({name: _shapes_split(name, size, np.random.default_rng([seed, index]))
                        for index, (name, size) in enumerate(sizes.items())})


# ------------------------------------------------------------------------------------------- entry point


def load_caption_dataset(source: str | Path = DEFAULT_SOURCE, split: str | None = None, *,
                         max_words: int | None = MAX_CAPTION_WORDS, seed: int = 0, cache_dir: str | None = None,
                         validate_images: bool = True, shapes_sizes: tuple[int, int, int] = (2000, 200, 200),
                         return_report: bool = False):
    """Load captions from `source` as a DatasetDict train/validation/test (schema in the module docstring).

    source: "shapes"; a local Kaggle-layout folder, original-layout folder, folder of parquet files or one
      .parquet file; otherwise a Hub dataset id with the `jxie/flickr8k` schema (default).
    split: None for all three splits, or one split name to get that `Dataset` only.
    seed: Karpathy-style split seed (sources without split files) and shapes generator seed.
    return_report: also return the `LoadReport` of skipped records, as `(data, report)`.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"expected split None or one of {SPLITS}, got {split!r}")
    if str(source) == "shapes":
        data, report = load_shapes_dataset(*shapes_sizes, seed=seed), LoadReport()
        report.kept = {name: len(ds) for name, ds in data.items()}
    else:
        path = Path(source).expanduser()
        if path.exists():
            splits = _load_local(path, seed, cache_dir)
        else:
            splits = _canonical_splits(load_dataset(str(source), cache_dir=cache_dir), seed, str(source))
        data, report = _finish(splits, max_words, validate_images, str(source))
    result = data if split is None else data[split]
    return (result, report) if return_report else result


# ------------------------------------------------------------------------------------------------ collate


class CaptionCollator:
    """Batch rows {image, captions, image_id} for the model: pixel_values, input_ids, attention_mask, labels.

    tokenizer: a BERT tokenizer; each caption becomes `[CLS] caption [SEP]`, padded to the longest in the batch.
    preprocess: list of PIL images or paths -> (B, 3, S, S) float tensor (e.g. `ImageCaptioner.preprocess`).
    flatten=False: one random caption per image (a new draw each time the image is batched, i.e. each epoch).
    flatten=True: every caption of every image (evaluation); `pixel_values` repeats each image per caption and
      `image_index` (N,) says which image row a caption belongs to.
    Also returns `image_ids` and `references` (all cleaned captions per image) for the metrics.
    """

    def __init__(self, tokenizer, max_length: int, preprocess: Callable, flatten: bool = False,
                 seed: int | None = None):
        if max_length < 3:
            raise ValueError(f"expected max_length >= 3 ([CLS], a word, [SEP]), got {max_length}")
        self.tokenizer, self.max_length, self.preprocess, self.flatten = tokenizer, max_length, preprocess, flatten
        self.rng = random.Random(seed)

    def _pick(self, rows: list[dict]) -> tuple[list[str], list[int]]:
        """Captions to encode and, for each, the row of its image."""
        if self.flatten:
            pairs = [(c, i) for i, row in enumerate(rows) for c in row["captions"]]
        else:
            pairs = [(self.rng.choice(row["captions"]), i) for i, row in enumerate(rows)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        if not rows:
            raise ValueError("expected at least one row to collate, got an empty batch")
        for row in rows:
            if not row.get("captions"):
                raise ValueError(f"expected a non-empty `captions` list, got {row.get('captions')!r} "
                                 f"for image {row.get('image_id')!r}")
        captions, owner = self._pick(rows)
        enc = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        cls_id = getattr(self.tokenizer, "cls_token_id", None)
        if cls_id is not None and int(enc["input_ids"][0, 0]) != cls_id:
            raise ValueError(f"expected the tokenizer to start captions with [CLS] (id {cls_id}), "
                             f"got id {int(enc['input_ids'][0, 0])}; is add_special_tokens off?")
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = IGNORE_INDEX  # (N, T)
        pixel_values = self.preprocess([row["image"] for row in rows])  # (B, 3, S, S)
        image_index = torch.tensor(owner, dtype=torch.long)  # (N,)
        if self.flatten:
            pixel_values = pixel_values.index_select(0, image_index)  # (N, 3, S, S)
        return {"pixel_values": pixel_values, "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"], "labels": labels, "image_index": image_index,
                "image_ids": [row["image_id"] for row in rows],
                "references": [list(row["captions"]) for row in rows]}

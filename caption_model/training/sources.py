"""Where caption records come from: Hub/parquet datasets, imagefolders, local Flickr8k folders, and their splits.

`load_source` returns raw splits (image undecoded, captions as found, image_id) and how they were split;
`data.load_caption_dataset` cleans them. Layouts (`source_kind` names them): a Hub dataset id ("hub") or parquet
files ("parquet") with an image column and caption columns (named, or found: `captions`, `caption_0`..`caption_N`,
`caption`, `text`), a `datasets` imagefolder ("imagefolder": images + `metadata.csv` / `metadata.jsonl` with
`file_name` and caption columns), the Kaggle folder (`Images/` + `captions.txt`) and the original folder
(`Flickr8k.token.txt` + an image folder + optional `Flickr_8k.*Images.txt` split files), both "flickr8k".

Splits, and what a run records about them (`SPLIT_METHODS`): a source's own train/validation/test ("own"); the
official Flickr8k split files `Flickr_8k.{train,dev,test}Images.txt` wherever a local folder has them ("split-files":
the 6000/1000/1000 split published Flickr8k scores use); otherwise a one-split source is cut by a seeded shuffle
("seeded"). The seeded split has Flickr8k's sizes but not its members: test scores on it do not compare with
published ones, and the run says so (`describe_split`).
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, List, Value, concatenate_datasets, load_dataset

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FLICKR8K_SPLIT_SIZES = (6000, 1000, 1000)  # Flickr8k train/validation/test images (the official split files)
# How a source's images were split (recorded in training_config.json, metrics.json and the model card).
SPLIT_OWN = "own"  # the dataset's own train/validation/test splits
SPLIT_FILES = "split-files"  # the official Flickr_8k.{train,dev,test}Images.txt files
SPLIT_SEEDED = "seeded"  # a seeded shuffle of a one-split source: Flickr8k's sizes, not its members
SPLIT_GENERATED = "generated"  # synthetic shapes: each split drawn from its own random stream
SPLIT_METHODS = (SPLIT_OWN, SPLIT_FILES, SPLIT_SEEDED, SPLIT_GENERATED)

# Split names other datasets use, mapped onto ours.
_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                  "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
# Original Flickr8k layout: captions file, image folders, split files.
_TOKEN_FILE = "Flickr8k.token.txt"
_ORIGINAL_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "validation": "Flickr_8k.devImages.txt",
                "test": "Flickr_8k.testImages.txt"}
_KAGGLE_CAPTIONS = "captions.txt"
_METADATA_FILES = ("metadata.csv", "metadata.jsonl")  # datasets imagefolder convention
_ID_COLUMNS = ("image_id", "filename", "file_name", "image_name")


@dataclass(frozen=True)
class SourceSplits:
    """Raw splits of a source and how its images were split (one of `SPLIT_METHODS`)."""

    splits: dict[str, Dataset]  # train/validation/test
    method: str


@dataclass(frozen=True)
class Columns:
    """Which columns of a Hub/parquet/imagefolder dataset hold the image and the captions."""

    image: str | None = None  # None: "image"
    captions: tuple[str, ...] = ()  # each holds one caption or a list of them; (): found by name


# ---------------------------------------------------------------------------------------------- splitting


def seeded_split_sizes(num_images: int) -> tuple[int, int, int]:
    """Train/validation/test sizes: 1000/1000 held out from >= 8000 images, else the same 6:1:1 proportions."""
    if num_images < 0:
        raise ValueError(f"expected a non-negative number of images, got {num_images}")
    total = sum(FLICKR8K_SPLIT_SIZES)
    if num_images >= total:
        held = FLICKR8K_SPLIT_SIZES[1]
        return num_images - 2 * held, held, held
    held = round(num_images * FLICKR8K_SPLIT_SIZES[1] / total)
    if num_images >= 3:
        held = max(held, 1)
    return num_images - 2 * held, held, held


def seeded_split(image_ids: Sequence[str], seed: int = 0) -> dict[str, list[str]]:
    """Deterministic split of image ids: sort by name, shuffle with `seed`, cut at `seeded_split_sizes`.
    Neither Karpathy's split nor the official one: only their sizes."""
    names = sorted(set(image_ids))
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    n_train, n_val, _ = seeded_split_sizes(len(names))
    return {"train": shuffled[:n_train], "validation": shuffled[n_train:n_train + n_val],
            "test": shuffled[n_train + n_val:]}


def _split_by_ids(ds: Dataset, seed: int) -> SourceSplits:
    """Split one dataset by a seeded shuffle of its `image_id` column."""
    ids = list(ds["image_id"])
    parts = seeded_split(ids, seed)
    split_of = {image_id: name for name, members in parts.items() for image_id in members}
    return SourceSplits({name: ds.select([i for i, image_id in enumerate(ids) if split_of[image_id] == name])
                         for name in SPLITS}, SPLIT_SEEDED)


def describe_split(method: str, sizes: dict[str, int], seed: int | None = None) -> str:
    """The split in words, for metrics.json and the model card: "seeded 6000/1000/1000 split (seed 0) of a
    one-split source, not comparable with published test scores"."""
    counts = "/".join(str(sizes.get(name, 0)) for name in SPLITS)
    if method == SPLIT_SEEDED:
        return (f"seeded {counts} split (seed {seed}) of a one-split source, not comparable with published test "
                f"scores")
    if method == SPLIT_FILES:
        return f"official Flickr8k split files ({', '.join(_SPLIT_FILES.values())}): {counts}"
    if method == SPLIT_OWN:
        return f"the dataset's own train/validation/test splits: {counts}"
    if method == SPLIT_GENERATED:
        return f"generated synthetic splits: {counts}"
    raise ValueError(f"expected a split method among {SPLIT_METHODS}, got {method!r}")


# ----------------------------------------------------------------------------- Hub / parquet / imagefolder


def find_caption_columns(column_names: Sequence[str]) -> list[str]:
    """Caption columns by convention: `captions` (a list), else `caption_0`..`caption_N`, `caption`, `text`."""
    numbered = sorted((c for c in column_names if re.fullmatch(r"caption_\d+", c)), key=lambda c: int(c[8:]))
    for found in (["captions"], numbered, ["caption"], ["text"]):
        if found and all(c in column_names for c in found):
            return found
    raise ValueError(f"expected caption columns `captions`, `caption_0`..`caption_N`, `caption` or `text`, got "
                     f"columns {list(column_names)}; name them with --caption-columns A,B,...")


def _select_columns(ds: Dataset, columns: Columns) -> tuple[str, list[str]]:
    """(image column, caption columns) of `ds`; a clear error naming the columns found when one is missing."""
    names = ds.column_names
    image = columns.image or "image"
    if image not in names:
        raise ValueError(f"--image-column: expected a column {image!r}, got columns {names}" if columns.image else
                         f"expected an `image` column (or name it with --image-column), got columns {names}")
    captions = list(columns.captions) or find_caption_columns(names)
    missing = [c for c in captions if c not in names]
    if missing:
        raise ValueError(f"--caption-columns: expected columns {missing} in the data, got columns {names}")
    return image, captions


def _caption_list(row: dict, caption_columns: list[str]) -> list[str | None]:
    """The captions of a row: string columns and list columns flattened in order (None kept: counted later)."""
    found: list[str | None] = []
    for column in caption_columns:
        value = row[column]
        values = value if isinstance(value, (list, tuple)) else [value]
        found += [v if v is None or isinstance(v, str) else str(v) for v in values]
    return found


def _normalise_columns(ds: Dataset, split: str, columns: Columns = Columns(), root: Path | None = None) -> Dataset:
    """Map a Hub/parquet/imagefolder schema onto image/captions/image_id. image_id: an id column, else the image
    file's path (relative to `root`), else `<split>-<row>`."""
    image_column, caption_columns = _select_columns(ds, columns)
    id_column = next((c for c in _ID_COLUMNS if c in ds.column_names and c != image_column), None)
    ds = ds.cast_column(image_column, Image(decode=False))

    def image_id(row, index) -> str:
        path = row[image_column].get("path") if isinstance(row[image_column], dict) else None
        if id_column:
            return str(row[id_column])
        if path and root is not None and Path(path).is_relative_to(root):
            return Path(path).relative_to(root).as_posix()
        return Path(path).name if path else f"{split}-{index:06d}"

    def normalise(row, index):
        return {"captions": _caption_list(row, caption_columns), "image_id": image_id(row, index)}

    # Only the small columns are written; the image column is kept as it is (no copy of the image bytes).
    meta = ds.map(normalise, with_indices=True, remove_columns=ds.column_names,
                  features=Features(captions=List(Value("string")), image_id=Value("string")),
                  desc=f"normalising {split}")
    images = ds.select_columns([image_column]).rename_column(image_column, "image") if image_column != "image" \
        else ds.select_columns(["image"])
    return concatenate_datasets([images, meta], axis=1)


def _canonical_splits(raw: DatasetDict, seed: int, source: str, columns: Columns = Columns(),
                      root: Path | None = None, folder: Path | None = None) -> SourceSplits:
    """Rename split aliases (val, dev, ...). A source with one split is cut by the official split files when
    `folder` (a local source) has them, else by a seeded shuffle."""
    splits: dict[str, Dataset] = {}
    for name, ds in raw.items():
        canonical = _SPLIT_ALIASES.get(str(name).lower())
        if canonical is None:
            raise ValueError(f"{source}: unknown split {name!r}; expected one of {sorted(_SPLIT_ALIASES)}")
        try:
            splits[canonical] = _normalise_columns(ds, canonical, columns, root)
        except ValueError as error:
            raise ValueError(f"{source} ({name} split): {error}") from None
    if set(splits) == set(SPLITS):
        return SourceSplits(splits, SPLIT_OWN)
    if len(splits) == 1:
        only = next(iter(splits.values()))
        return _split_folder_dataset(only, folder, seed) if folder is not None else _split_by_ids(only, seed)
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
    """Image file names per split from the Flickr_8k.*Images.txt files; None when they are absent."""
    found = {split: _find(folder, name) for split, name in _SPLIT_FILES.items()}
    if not any(found.values()):
        return None
    missing = [_SPLIT_FILES[s] for s, p in found.items() if p is None]
    if missing:
        raise ValueError(f"{folder}: found some split files but not {missing}; expected all three or none")
    return {split: {ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()}
            for split, p in found.items()}


def _split_folder_dataset(ds: Dataset, folder: Path, seed: int) -> SourceSplits:
    """Use the split files when the folder has them (an image is matched by its file name: the `image_id` of a
    Flickr8k layout, the last part of an imagefolder's or parquet file's image path), else a seeded split."""
    members = _split_files(folder)
    if members is None:
        return _split_by_ids(ds, seed)
    names = [Path(image_id).name for image_id in ds["image_id"]]
    unlisted = sum(1 for name in names if not any(name in m for m in members.values()))
    if unlisted:
        logger.info("%s: %d captioned images are in no split file; left out", folder, unlisted)
    logger.info("%s: split by the official split files", folder)
    return SourceSplits({s: ds.select([i for i, name in enumerate(names) if name in members[s]]) for s in SPLITS},
                        SPLIT_FILES)


def _load_kaggle(folder: Path, seed: int) -> SourceSplits:
    image_dir = folder / "Images"
    ds = _records_dataset(read_kaggle_captions(folder / _KAGGLE_CAPTIONS), image_dir)
    return _split_folder_dataset(ds, folder, seed)


def _load_original(folder: Path, seed: int) -> SourceSplits:
    token_file = _find(folder, _TOKEN_FILE)
    image_dir = next((d for name in _ORIGINAL_IMAGE_DIRS if (d := _find(folder, name)) and d.is_dir()), None)
    if image_dir is None:
        raise ValueError(f"{folder}: expected an image folder named one of {_ORIGINAL_IMAGE_DIRS}")
    ds = _records_dataset(read_flickr_tokens(token_file), image_dir)
    return _split_folder_dataset(ds, folder, seed)


def _has_metadata(folder: Path) -> bool:
    """An imagefolder: metadata.csv / metadata.jsonl in the folder or in its split folders."""
    return any(next(folder.rglob(name), None) is not None for name in _METADATA_FILES)


def local_layout(path: Path) -> str:
    """parquet | imagefolder | kaggle | original for an existing local path; ValueError for anything else."""
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{path}: expected a folder or a .parquet file, got a {path.suffix or 'plain'} file")
        return "parquet"
    if (path / _KAGGLE_CAPTIONS).is_file() and (path / "Images").is_dir():
        return "kaggle"
    if _find(path, _TOKEN_FILE):
        return "original"
    if _parquet_data_files(path):
        return "parquet"
    if _has_metadata(path):
        return "imagefolder"
    raise ValueError(f"{path}: expected an imagefolder (images + metadata.csv or metadata.jsonl), parquet files, a "
                     f"Kaggle layout (Images/ + captions.txt) or an original layout ({_TOKEN_FILE} + image folder); "
                     f"found none")


def source_kind(source: str | Path) -> str:
    """What the model card calls the data: shapes | hub | parquet | imagefolder | flickr8k (a local Flickr8k)."""
    if str(source) == "shapes":
        return "shapes"
    path = Path(source).expanduser()
    if not path.exists():
        return "hub"
    layout = local_layout(path)
    return "flickr8k" if layout in ("kaggle", "original") else layout


def _load_local(path: Path, seed: int, cache_dir: str | None, columns: Columns) -> SourceSplits:
    """Load a local folder or parquet file by its layout. A one-split folder (imagefolder, parquet) that holds the
    official split files is cut by them."""
    layout = local_layout(path)
    if layout == "kaggle":
        return _load_kaggle(path, seed)
    if layout == "original":
        return _load_original(path, seed)
    if layout == "imagefolder":
        root = path.resolve()  # the image paths datasets records start with it
        raw = load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir)
        return _canonical_splits(raw, seed, str(path), columns, root=root, folder=root)
    files = {_parquet_split(Path(path.name)) or "train": [str(path)]} if path.is_file() else _parquet_data_files(path)
    # A folder of parquet files may hold the split files too; a lone file's parent folder is not searched.
    return _canonical_splits(_load_parquet(files, cache_dir), seed, str(path), columns,
                             folder=None if path.is_file() else path)


# ------------------------------------------------------------------------------------------------ entry point


def load_source(source: str | Path, seed: int, cache_dir: str | None,
                columns: Columns = Columns()) -> SourceSplits:
    """Raw splits train/validation/test of a local folder or parquet file, else of a Hub dataset id, and how they
    were split (a Hub dataset with one split: a seeded split).
    `columns` names the image and caption columns of Hub, parquet and imagefolder data (the Flickr8k layouts
    have fixed ones)."""
    path = Path(source).expanduser()
    if path.exists():
        if (columns.image or columns.captions) and local_layout(path) in ("kaggle", "original"):
            logger.warning("%s: a Flickr8k layout has fixed columns; --image-column/--caption-columns ignored", path)
        return _load_local(path, seed, cache_dir, columns)
    return _canonical_splits(load_dataset(str(source), cache_dir=cache_dir), seed, str(source), columns)

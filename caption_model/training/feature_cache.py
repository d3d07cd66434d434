"""Frozen-encoder feature cache: the output of the frozen part of the ResNet, computed once per image.

Features are stored as fp16 `.npy` files under `<root>/<encoder signature>/<image key>.npy`. The signature
(`ImageEncoder.cache_signature()`) covers the input size, the frozen stages and their weights, so changing the
encoder config starts a new, empty cache instead of reusing stale features. Writes are atomic (temp + rename).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image


def image_key(image: Any) -> str:
    """A content key for an image: a datasets Image dict {bytes, path}, a PIL image, or a path."""
    digest = hashlib.sha1()
    if isinstance(image, dict):
        if image.get("bytes"):
            digest.update(image["bytes"])
        elif image.get("path"):
            path = image["path"]
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            raise ValueError(f"expected an image dict with bytes or a path, got keys {sorted(image)}")
    elif isinstance(image, Image.Image):
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    elif isinstance(image, (str, os.PathLike)):
        return image_key({"path": os.fspath(image)})
    else:
        raise ValueError(f"expected an image dict, PIL image or path, got {type(image).__name__}")
    return digest.hexdigest()


def decode_image(image: Any) -> Any:
    """A datasets Image dict {bytes, path} -> something `ImageCaptioner.preprocess` accepts."""
    if isinstance(image, dict):
        return image["bytes"] if image.get("bytes") else image["path"]
    return image


class FeatureCache:
    """Look up or compute frozen-encoder features for a batch of images; counts hits and misses."""

    def __init__(self, root: str | os.PathLike, model):
        self.model = model
        self.signature = model.encoder.cache_signature()
        self.folder = Path(root) / self.signature
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def get(self, images: Sequence[Any], keys: Sequence[str] | None = None) -> torch.Tensor:
        """images (B,) -> frozen features (B, C', h', w') as float32, computing and storing the missing ones."""
        keys = list(keys) if keys is not None else [image_key(im) for im in images]
        found: dict[int, np.ndarray] = {}
        missing = []
        for index, key in enumerate(keys):
            path = self._path(key)
            if path.is_file():
                try:
                    found[index] = np.load(path)
                    continue
                except (OSError, ValueError):  # a damaged entry is recomputed
                    pass
            missing.append(index)
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            device = self.model.device
            pixels = self.model.preprocess([decode_image(images[i]) for i in missing]).to(device)
            with torch.inference_mode():
                features = self.model.encoder.frozen_features(pixels).to(torch.float16).cpu().numpy()
            for index, feature in zip(missing, features):
                self._write(self._path(keys[index]), feature)
                found[index] = feature
        batch = np.stack([found[i] for i in range(len(keys))])  # (B, C', h', w') fp16
        return torch.from_numpy(batch).float()

    @staticmethod
    def _write(path: Path, array: np.ndarray) -> None:
        handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "wb") as file:
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            file.write(buffer.getvalue())
        os.replace(temp, path)

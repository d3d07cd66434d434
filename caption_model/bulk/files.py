"""Which files caption-images captions: paths, folders (searched recursively) and glob patterns -> one listing in
a fixed order, and the identity of a file in the output (its absolute path)."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence

from . import UsageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})


def file_key(path: str) -> str:
    """The identity of a file in the output: its absolute path (relative paths resolve against the cwd)."""
    return os.path.normcase(os.path.abspath(path))


def find_images(paths: Sequence[str], exclude: str | None = None) -> list[str]:
    """Files, folders (recursive, image extensions only, hidden entries skipped) and globs -> paths in argument
    order, each once; a folder's files in sorted order, so the listing is the same on every run and in every
    process. `exclude`: a folder never searched (the heatmap folder). UsageError for a path or pattern that
    matches nothing, or when no image is found at all."""
    found: dict[str, str] = {}
    excluded = file_key(exclude) if exclude else None
    for arg in paths:
        if os.path.exists(arg):
            matches = [arg]
        elif any(char in arg for char in "*?["):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise UsageError(f"no file matches the pattern {arg!r}")
        else:
            raise UsageError(f"expected an image file, a folder or a glob pattern, but {arg!r} does not exist")
        for match in matches:
            files = _walk_images(match, excluded) if os.path.isdir(match) else [match]
            for file in files:
                found.setdefault(file_key(file), file)
    if not found:
        raise UsageError(f"no images found in {' '.join(paths)} (folders are searched for "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    return list(found.values())


def _walk_images(folder: str, excluded: str | None) -> list[str]:
    images = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and file_key(os.path.join(root, d)) != excluded)
        images += [os.path.join(root, name) for name in sorted(files)
                   if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return images

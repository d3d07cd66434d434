"""The demo Space bundle: only what serving needs, staged into a folder that becomes one Space commit.

    stage_space_folder(out, repo_id, space_id) -> sorted file list: app.py, serving.py, caption_model/ without
        its training/ package, examples/, requirements.txt (inference + app dependencies), README.md (Space card)
The Space installs exactly what CI tested: the project's requirements.txt, which `make lock` writes with the
locked versions of the inference + app dependencies. Gradio itself comes from the card's `sdk_version`, which is
that locked version, so it is left out of requirements.txt.
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from pathlib import Path

from caption_model.hub.card import DEFAULT_LICENSE

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SPACE_VARIABLE = "CAPTION_MODEL"  # serving reads the model repo id from this Space variable
SPACE_REVISION_VARIABLE = "CAPTION_MODEL_REVISION"  # the model branch the app loads (app.py --revision)
SPACE_TOKEN_SECRET = "HF_TOKEN"  # a private model's Space reads it with this secret (huggingface_hub's variable)
APP_FILE = "app.py"  # the UI, and the Space entry point
SERVING_FILES = ("serving.py", "mcp_server.py")  # beside app.py when the project has them
PACKAGE = "caption_model"
CACHES = ("__pycache__", "*.pyc", "*.pyo")
NOT_SHIPPED = ("training", "bulk", "cli.py")  # parts of caption_model that never run in the Space (training,
# batch captioning: they import datasets, accelerate, pyarrow, which the Space does not install)
SPACE_PYTHON = "3.11"  # the Space's Python: the version the lock is resolved and tested for
SDK_PACKAGE = "gradio"  # installed by the Space from the card's sdk_version
# training/evaluation only: never installed in the Space, even if a requirements.txt lists them
NOT_SERVED = {"datasets", "evaluate", "pycocoevalcap", "accelerate"}


class SpaceError(ValueError):
    """The project root lacks a file the Space needs."""


def requirement_name(line: str) -> str | None:
    """'torch==2.1  # why' -> 'torch'; None for comments, options (-r, -e) and blank lines."""
    match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#")[0])
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else None


def _requirement_lines(root: Path) -> list[str]:
    """The project's requirements.txt without comments, options and blank lines (markers kept)."""
    lines = [line.split("#")[0].strip() for line in (root / "requirements.txt").read_text().splitlines()]
    return [line for line in lines if requirement_name(line)]


def locked_gradio_version(root: Path) -> str:
    """The gradio version requirements.txt pins: the Space's sdk_version. SpaceError when it pins none."""
    for line in _requirement_lines(root):
        if requirement_name(line) == SDK_PACKAGE and "==" in line:
            return line.split(";")[0].split("==")[1].strip()
    raise SpaceError(f"{root / 'requirements.txt'} pins no {SDK_PACKAGE} version (expected a line "
                     f"'{SDK_PACKAGE}==X.Y.Z', as `make lock` writes): the Space's sdk_version must be the locked one")


def space_requirements(root: Path) -> str:
    """requirements.txt of the Space: the project's (exact versions), without gradio (the sdk_version) and without
    training-only packages."""
    kept = [line for line in _requirement_lines(root) if requirement_name(line) not in NOT_SERVED | {SDK_PACKAGE}]
    return "\n".join(dict.fromkeys(kept)) + "\n"


def _space_card(repo_id: str, space_id: str, license: str, sdk_version: str, preload: str | None = None):
    from huggingface_hub import SpaceCard, SpaceCardData

    data = SpaceCardData(
        title="Image captions with word heatmaps", sdk="gradio", sdk_version=sdk_version,
        python_version=SPACE_PYTHON, app_file=APP_FILE, preload_from_hub=[preload] if preload else None,
        license=license, models=[repo_id], emoji="🔎", colorFrom="blue", colorTo="yellow",
        pinned=False, short_description="Captions an image and shows where each word looked",
    )
    body = (f"# Image captions with word heatmaps\n\nUpload an image: the model [{repo_id}]"
            f"(https://huggingface.co/{repo_id}) writes a caption and shows a heatmap for each word.\n\n"
            f"The model repo is read from the Space variable `{SPACE_VARIABLE}`.\n\n"
            "Programmatic use:\n\n```python\nfrom gradio_client import Client, handle_file\n\n"
            f'Client("{space_id}").predict(image=handle_file("photo.jpg"), api_name="/caption")\n```\n')
    return SpaceCard(f"---\n{data.to_yaml()}\n---\n{body}")


def check_project(project_root: str | os.PathLike | None = None) -> Path:
    """The project root the Space is built from; SpaceError naming the first file it lacks."""
    root = Path(project_root or PROJECT_ROOT)
    for needed in (APP_FILE, "requirements.txt", f"{PACKAGE}/__init__.py"):
        if not (root / needed).is_file():
            raise SpaceError(f"cannot build the Space: {root / needed} not found (the Space needs {APP_FILE}, "
                             f"{PACKAGE}/ and requirements.txt from the project root)")
    return root


def stage_space_folder(out_dir: str | os.PathLike, repo_id: str, space_id: str, *, license: str = DEFAULT_LICENSE,
                       project_root: str | os.PathLike | None = None, preload: str | None = None) -> list[str]:
    """Write the Space into `out_dir` -> sorted file list (see the module docstring for what goes in). `preload`:
    the card's `preload_from_hub` entry ("REPO file,file [commit]"), so the model is fetched when the Space is
    built, not at every cold start."""
    root, out = check_project(project_root), Path(out_dir)
    locked_gradio_version(root)  # refuse before writing anything
    out.mkdir(parents=True, exist_ok=True)
    for name in (APP_FILE, *SERVING_FILES):
        if (root / name).is_file():
            shutil.copyfile(root / name, out / name)
    shutil.copytree(root / PACKAGE, out / PACKAGE, dirs_exist_ok=True, ignore=_left_out(root / PACKAGE))
    if (root / "examples").is_dir():  # the app's example images
        shutil.copytree(root / "examples", out / "examples", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(*CACHES, ".*"))
    (out / "requirements.txt").write_text(space_requirements(root))
    _space_card(repo_id, space_id, license, locked_gradio_version(root), preload).save(out / "README.md")
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def _left_out(package: Path):
    """copytree filter: caches everywhere, NOT_SHIPPED only directly under the package."""
    caches = shutil.ignore_patterns(*CACHES)

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = set(NOT_SHIPPED) & set(names) if Path(folder) == package else set()
        return set(caches(folder, names)) | top

    return ignore

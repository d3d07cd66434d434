"""The demo Space bundle: only what serving needs, staged into a folder that becomes one Space commit.

    stage_space_folder(out, repo_id, space_id) -> sorted file list: app.py, serving.py, caption_model/ without
        its training/ package, examples/, requirements.txt (inference + app dependencies), README.md (Space card)
Gradio itself is pinned by the card's sdk_version, so it is left out of requirements.txt.
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
SPACE_REVISION_VARIABLE = "CAPTION_MODEL_REVISION"  # set only when publishing to a branch other than main
APP_FILE = "app.py"  # the UI, and the Space entry point
SERVING_FILES = ("serving.py",)  # beside app.py when the project has them
PACKAGE = "caption_model"
CACHES = ("__pycache__", "*.pyc", "*.pyo")
NOT_SHIPPED = ("training",)  # subpackages of caption_model that never run in the Space
# requirements.txt entries the Space does not install when the project has no pyproject.toml with an "app" extra:
# training/evaluation only, and gradio (pinned through the Space's sdk_version).
NOT_SERVED = {"datasets", "evaluate", "pycocoevalcap", "accelerate", "gradio", "gradio-client"}


class SpaceError(ValueError):
    """The project root lacks a file the Space needs."""


def requirement_name(line: str) -> str | None:
    """'torch==2.1  # why' -> 'torch'; None for comments, options (-r, -e) and blank lines."""
    match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#")[0])
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else None


def space_requirements(root: Path) -> str:
    """requirements.txt of the Space: inference + app dependencies, gradio left to sdk_version.

    From pyproject.toml (`dependencies` + the `app` extra) when it declares them, else the project's
    requirements.txt without the training-only packages.
    """
    pyproject = root / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text()).get("project", {}) if pyproject.is_file() else {}
    app_extra = project.get("optional-dependencies", {}).get("app")
    if project.get("dependencies") and app_extra:
        lines = [*project["dependencies"], *app_extra]
    else:
        lines = (root / "requirements.txt").read_text().splitlines()
    kept = [line for line in lines if requirement_name(line) and requirement_name(line) not in NOT_SERVED]
    return "\n".join(dict.fromkeys(kept)) + "\n"


def _space_card(repo_id: str, space_id: str, license: str):
    import gradio
    from huggingface_hub import SpaceCard, SpaceCardData

    data = SpaceCardData(
        title="Image captions with word heatmaps", sdk="gradio", sdk_version=gradio.__version__,
        app_file=APP_FILE, license=license, models=[repo_id], emoji="🔎", colorFrom="blue", colorTo="yellow",
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
                       project_root: str | os.PathLike | None = None) -> list[str]:
    """Write the Space into `out_dir` -> sorted file list (see the module docstring for what goes in)."""
    root, out = check_project(project_root), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (APP_FILE, *SERVING_FILES):
        if (root / name).is_file():
            shutil.copyfile(root / name, out / name)
    shutil.copytree(root / PACKAGE, out / PACKAGE, dirs_exist_ok=True, ignore=_left_out(root / PACKAGE))
    if (root / "examples").is_dir():  # the app's example images
        shutil.copytree(root / "examples", out / "examples", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(*CACHES, ".*"))
    (out / "requirements.txt").write_text(space_requirements(root))
    _space_card(repo_id, space_id, license).save(out / "README.md")
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def _left_out(package: Path):
    """copytree filter: caches everywhere, NOT_SHIPPED only directly under the package."""
    caches = shutil.ignore_patterns(*CACHES)

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = set(NOT_SHIPPED) & set(names) if Path(folder) == package else set()
        return set(caches(folder, names)) | top

    return ignore

"""The project installs: a fresh virtualenv outside the repository gets `caption_model` (inference dependencies
only, the COCO metric module, the `caption-images` script), and requirements.txt matches pyproject.toml.

Offline and fast: the venv sees this interpreter's packages (torch, ...) through a .pth file, and pip installs
a copy of the project with --no-deps --no-build-isolation (the copy: an in-tree build writes build/ and
*.egg-info into the source folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from caption_model.hub import space as hub_space

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TRAINING_ONLY = {"datasets", "evaluate", "pycocoevalcap", "accelerate"}
APP_ONLY = {"gradio", "fastapi", "uvicorn", "mcp"}


def names(requirements: list[str]) -> set[str]:
    return {hub_space.requirement_name(line) for line in requirements} - {None}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A new virtualenv with a copy of the project installed, outside the repository."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, source / name)
    shutil.copytree(ROOT / "caption_model", source / "caption_model", ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # --system-site-packages reaches the base interpreter's packages, not this (virtual) env's: add them
    Path(site, "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-build-isolation", "--no-index", "--quiet", str(source)],
                             capture_output=True, text=True, timeout=300, env=_clean_env())
    assert install.returncode == 0, install.stdout + install.stderr
    return env_dir


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}


def run_in(venv: Path, *command: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, cwd=venv.parent, env=_clean_env(),
                          timeout=timeout)


def test_a_fresh_virtualenv_installs_and_imports_the_project(venv):
    proc = run_in(venv, str(venv / "bin" / "python"), "-c",
                  "import json, caption_model, importlib.metadata as m; from caption_model.training import metrics; "
                  "print(json.dumps([caption_model.__version__, caption_model.__file__, "
                  "m.version('caption-model'), m.requires('caption-model'), metrics.COCO_CAPTION_METRIC_PATH]))")
    assert proc.returncode == 0, proc.stderr
    version, location, dist_version, requires, metric_folder = json.loads(proc.stdout.splitlines()[-1])
    from caption_model import __version__

    assert version == dist_version == __version__
    assert Path(location).is_relative_to(venv) and not Path(location).is_relative_to(ROOT)
    assert (Path(metric_folder) / "coco_caption_metric.py").is_file()  # package data
    inference = names([r for r in requires if "extra ==" not in r])
    assert {"torch", "torchvision", "transformers", "safetensors", "huggingface-hub", "pillow"} <= inference
    assert not (TRAINING_ONLY | APP_ONLY) & inference


def test_the_console_script_runs_outside_the_repository(venv):
    proc = run_in(venv, str(venv / "bin" / "caption-images"), "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout and "--no-repeat-ngram-size" in proc.stdout


def test_extras_and_pins():
    extras = PYPROJECT["optional-dependencies"]
    assert names(extras["train"]) == TRAINING_ONLY and names(extras["app"]) == APP_ONLY
    assert {"caption-model", "pytest", "gradio-client", "mcp"} <= names(extras["dev"])
    assert "caption-model[train,app]" in extras["dev"]
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(PYPROJECT["dependencies"])  # as the Makefile installs
    assert "torch==2.14.1 torchvision==0.29.1" in (ROOT / "Makefile").read_text()


def test_requirements_files_agree_with_pyproject():
    """requirements.txt is what the app installs: the inference dependencies + the app extra, the same lines."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    expected = PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["app"]
    assert [line for line in lines if line] == expected
    dev = [line.split("#")[0].strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()]
    assert [line for line in dev if line] == ["-e .[dev]"]


def test_the_space_installs_inference_and_app_dependencies_only():
    requirements = hub_space.space_requirements(ROOT).splitlines()
    expected = [r for r in PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["app"]
                if hub_space.requirement_name(r) != "gradio"]  # gradio comes from the Space's sdk_version
    assert requirements == expected


def test_the_readme_and_every_model_card_show_the_same_install_line():
    from caption_model.config import INSTALL_COMMAND
    from caption_model.hub.card import render_model_card

    assert INSTALL_COMMAND in (ROOT / "README.md").read_text()
    assert INSTALL_COMMAND in str(render_model_card({"image_size": 128, "encoder_stage": "layer3"}))

"""The project installs: a fresh virtualenv outside the repository gets `caption_model` (inference dependencies
only, the COCO metric module, the `caption-images` script), and the lock files agree with pyproject.toml.

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
from packaging.requirements import Requirement

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
    assert {"caption-model", "pytest", "gradio-client", "mcp", "uv"} <= names(extras["dev"])
    assert "caption-model[train,app]" in extras["dev"]
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(PYPROJECT["dependencies"])
    assert "-r requirements-dev.txt" in (ROOT / "Makefile").read_text()  # make install installs the lock


def test_fast_moving_dependencies_stop_at_the_newest_major_version_tested():
    """An upper bound on each package whose majors break us, one major above the locked version."""
    declared = {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in all_requirements()}
    locked = pins(ROOT / "requirements.lock")
    for name in ("transformers", "gradio", "huggingface-hub", "datasets", "accelerate", "mcp"):
        upper = [spec for spec in declared[name].specifier if spec.operator == "<"]
        assert upper, f"{name} has no upper bound in pyproject.toml"
        next_major = int(locked[name].split(".")[0]) + 1
        assert upper[0].version.split(".")[0] == str(next_major), (name, str(declared[name].specifier), locked[name])


def all_requirements() -> list[str]:
    return PYPROJECT["dependencies"] + [r for extra in PYPROJECT["optional-dependencies"].values() for r in extra]


def pins(lock: Path) -> dict[str, str]:
    """name -> version of every `name==version` line of a lock file (the lines for other platforms included)."""
    found = {}
    for line in lock.read_text().splitlines():
        line = line.split("#")[0].split(";")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            found[name.strip().lower().replace("_", "-")] = version.strip()
    return found


def test_the_lock_satisfies_pyproject():
    """requirements.lock pins every dependency of every extra inside pyproject.toml's range: a range changed
    without `make lock` fails here, not in a user's install."""
    locked = pins(ROOT / "requirements.lock")
    for line in all_requirements():
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        if name == "caption-model":
            continue
        assert name in locked, f"{line}: not in requirements.lock (run `make lock`)"
        assert requirement.specifier.contains(locked[name], prereleases=True), \
            f"{line}: requirements.lock has {locked[name]} (run `make lock`)"
    assert all("==" in line for line in lock_lines(ROOT / "requirements.lock"))  # exact versions only


def lock_lines(lock: Path) -> list[str]:
    lines = [line.split("#")[0].strip() for line in lock.read_text().splitlines()]
    return [line for line in lines if line]


def test_requirements_txt_is_the_app_part_of_the_lock():
    """requirements.txt (a Space, `pip install -r requirements.txt`) pins the inference + app dependencies at the
    lock's versions, and nothing training-only; requirements-dev.txt is the lock plus the project."""
    app, locked = pins(ROOT / "requirements.txt"), pins(ROOT / "requirements.lock")
    assert all("==" in line for line in lock_lines(ROOT / "requirements.txt"))
    assert {name: locked.get(name) for name in app} == app
    expected = names(PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["app"])
    assert expected <= set(app) and not TRAINING_ONLY & set(app)
    dev = lock_lines(ROOT / "requirements-dev.txt")
    assert dev == ["-r requirements.lock", "-e .[dev]"]


def test_the_space_installs_inference_and_app_dependencies_only():
    requirements = hub_space.space_requirements(ROOT).splitlines()
    expected = [line for line in lock_lines(ROOT / "requirements.txt")
                if hub_space.requirement_name(line) != "gradio"]  # gradio comes from the Space's sdk_version
    assert requirements == expected


def test_the_root_readme_is_a_space_card_on_the_locked_gradio():
    front_matter = (ROOT / "README.md").read_text().split("---")[1]
    assert f'sdk_version: "{hub_space.locked_gradio_version(ROOT)}"' in front_matter
    assert f'python_version: "{hub_space.SPACE_PYTHON}"' in front_matter


def test_the_readme_and_every_model_card_show_the_same_install_line():
    from caption_model.config import INSTALL_COMMAND
    from caption_model.hub.card import render_model_card

    assert INSTALL_COMMAND in (ROOT / "README.md").read_text()
    assert INSTALL_COMMAND in str(render_model_card({"image_size": 128, "encoder_stage": "layer3"}))

"""Version drift: does the project still work on the newest versions pyproject.toml allows, and on the oldest?

    python scripts/drift_check.py newest|lowest [--dir DIR] [--keep]

requirements.lock is what users install and what the test suite runs on; library users get any version inside
pyproject.toml's ranges. This resolves one end of those ranges with uv (`newest`: the highest versions allowed,
ignoring the lock; `lowest`: every declared lower bound at once, `--resolution lowest-direct` with the floors as
constraints), installs it into a virtualenv of its own, then, on those versions:

1. trains a tiny shapes checkpoint with train.py (datasets, accelerate, tokenizers, the training loop),
2. runs scripts/smoke_install.py on it (load, greedy and beam captions, caption-images, app.py's /health and one
   /caption call through gradio_client),
3. runs the decoder parity tests (tests/test_fast_inference.py): the one-token step against transformers' own
   forward (and its KV cache), the fast path against the reference decoding, the int8 mode, on this transformers.

Prints the versions it resolved and each phase's time; exits non-zero when a phase fails. `.ci/run` runs both
ends; a failure names the version that broke before a user meets it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ("torch", "transformers", "tokenizers", "huggingface-hub", "gradio", "gradio-client", "datasets",
         "accelerate", "mcp", "numpy", "pillow")
TINY_TRAINING = [
    "--preset", "shapes", "--shapes-sizes", "48,8,8", "--image-size", "64", "--encoder-stage", "layer2",
    "--encoder-trainable", "layer2", "--hidden-size", "32", "--num-hidden-layers", "1", "--num-attention-heads", "2",
    "--intermediate-size", "64", "--attention-dim", "32", "--tokenizer-vocab-size", "120", "--batch-size", "8",
    "--eval-max-length", "8", "--max-eval-images", "8", "--mixed-precision", "no", "--max-steps", "40",
    "--heatmap-offset-images", "0",
]
PARITY_TESTS = ["tests/test_fast_inference.py"]


def lower_bounds(pyproject: Path) -> list[str]:
    """`name==X` for every `>=X` (and `==X`) in pyproject.toml's dependencies and extras."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    floors = []
    for line in requirements:
        requirement = Requirement(line)
        floors += [f"{requirement.name}=={spec.version}" for spec in requirement.specifier
                   if spec.operator in (">=", "==")]
    return sorted(set(floors))


def run(phase: str, command: list[str], timings: dict[str, float], **kwargs) -> None:
    print(f"drift: {phase}: {' '.join(command)}", flush=True)
    started = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, **kwargs)
    timings[phase] = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"drift: {phase} failed (exit {proc.returncode}); see the output above")


def resolve(mode: str, python: Path, folder: Path, timings: dict[str, float]) -> Path:
    """Write folder/requirements.txt: exact versions of one end of pyproject.toml's ranges, every extra."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise SystemExit("drift: uv not found: it comes with the dev extra (make install)")
    out = folder / "requirements.txt"
    command = [uv, "pip", "compile", "pyproject.toml", "--all-extras", "--python", str(python), "--upgrade",
               "--quiet", "--no-header", "-o", str(out)]
    if mode == "lowest":
        floors = folder / "floors.txt"
        floors.write_text("\n".join(lower_bounds(ROOT / "pyproject.toml")) + "\n")
        command += ["--resolution", "lowest-direct", "-c", str(floors)]
    run("resolve", command, timings)
    return out


def pinned_versions(requirements: Path) -> dict[str, str]:
    versions = {}
    for line in requirements.read_text().splitlines():
        if "==" in line and not line.startswith(("#", " ")):
            name, version = line.split(";")[0].strip().split("==")
            versions[name.lower().replace("_", "-")] = version
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["newest", "lowest"])
    parser.add_argument("--dir", type=Path, help="work folder (default .drift/MODE; emptied first)")
    parser.add_argument("--keep", action="store_true", help="keep the virtualenv afterwards (it takes ~6 GB)")
    args = parser.parse_args(argv)
    folder = (args.dir or ROOT / ".drift" / args.mode).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    timings: dict[str, float] = {}
    venv = folder / "venv"
    python = venv / "bin" / "python"
    run("venv", [sys.executable, "-m", "venv", str(venv)], timings)
    requirements = resolve(args.mode, python, folder, timings)
    versions = pinned_versions(requirements)
    print(f"drift: {args.mode} resolved " + ", ".join(f"{name} {versions.get(name, '-')}" for name in SHOWN),
          flush=True)
    try:
        run("install", [str(python), "-m", "pip", "install", "--quiet", "--no-compile", "-r", str(requirements)],
            timings)
        run("install project", [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-e", "."], timings)
        checkpoint = folder / "checkpoint"
        run("train", [str(python), "train.py", *TINY_TRAINING, "--output-dir", str(checkpoint)], timings,
            stdout=subprocess.DEVNULL)
        run("smoke", [str(python), "scripts/smoke_install.py", str(checkpoint / "best")], timings)
        run("parity tests", [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *PARITY_TESTS], timings)
    finally:
        if not args.keep:
            shutil.rmtree(venv, ignore_errors=True)
    print(f"drift: {args.mode} passed on " + ", ".join(f"{n} {versions.get(n, '-')}" for n in SHOWN) + "; "
          + ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in timings.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

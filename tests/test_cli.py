"""caption-images: folders, globs, bad files skipped and named, resumable JSONL/CSV output, heatmap strips, exit
codes. In-process through cli.main() (fast), plus one real `python -m caption_model.cli` run."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from caption_model import ImageCaptioner, cli
from caption_model.cli import EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, LABEL_HEIGHT, STRIP_HEIGHT
from conftest import shapes_images

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--precision", "fp32", "--batch-size", "2", "--beams", "2", "--max-length", "12", "--device", "cpu"]


@pytest.fixture
def photos(tmp_path) -> Path:
    """Three good images (one in a subfolder), a text file named .jpg, a truncated JPEG and a non-image file."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    first, second, third = shapes_images(3, seed=77)
    first.save(folder / "one.png")
    second.save(folder / "two.jpg", quality=95)
    third.save(folder / "sub" / "three.jpg", quality=95)
    (folder / "notes.jpg").write_text("not an image, only named like one\n")
    buffer = io.BytesIO()
    third.save(buffer, "JPEG", quality=95)
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "readme.txt").write_text("left alone: not an image extension\n")
    return folder


GOOD = {"one.png", "two.jpg", "three.jpg"}
BAD = {"notes.jpg", "cut.jpg"}


def run(*args, model: str) -> int:
    """cli.main with the fast options first, so that `args` may override them."""
    return cli.main(FAST + ["--model", model] + [str(a) for a in args])


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def names(rows: list[dict]) -> list[str]:
    return sorted(Path(row["file"]).name for row in rows)


def test_folder_with_bad_files_writes_the_good_ones_names_the_bad_and_resumes(photos, tmp_path, tiny_checkpoint,
                                                                            capsys):
    out, strips = tmp_path / "captions.jsonl", tmp_path / "strips"
    assert run(photos, "--out", out, "--heatmaps", strips, model=tiny_checkpoint) == EXIT_SKIPPED
    err = capsys.readouterr().err
    for bad in BAD:
        assert sum(f"skipped {photos / bad}:" in line for line in err.splitlines()) == 1, err
    assert "notes.jpg is not an image" in err and "truncated" in err
    assert "3 captioned, 2 skipped, 0 already in" in err
    rows = jsonl_rows(out)
    assert names(rows) == sorted(GOOD)
    for row in rows:
        assert set(row) == {"file", "caption", "words", "score", "grid_size", "image_size", "heatmap", "model",
                            "cell_geometry"}
        assert row["caption"] == " ".join(row["words"]) and row["words"] and row["score"] <= 0
        assert row["grid_size"] == [8, 8] and row["image_size"] == list(Image.open(row["file"]).size)
        geometry = row["cell_geometry"]  # the tiny model: 64 px input, stride 8
        assert geometry["input_size"] == 64 and geometry["stride"] == [8, 8]
        assert geometry["cell_centres_x"][1] == pytest.approx(8.5 * row["image_size"][0] / 64, abs=1e-3)
        strip = Image.open(row["heatmap"])  # the image, then one overlay per word
        width = round(row["image_size"][0] * STRIP_HEIGHT / row["image_size"][1])
        assert strip.size == (width * (1 + len(row["words"])), STRIP_HEIGHT + LABEL_HEIGHT)
    assert len(list(strips.iterdir())) == 3

    # again: nothing captioned twice; the bad files are not in the output, so they are tried (and named) again
    assert run(photos, "--out", out, "--heatmaps", strips, model=tiny_checkpoint) == EXIT_SKIPPED
    err = capsys.readouterr().err
    assert "0 captioned, 2 skipped, 3 already in" in err and str(photos / "notes.jpg") in err
    assert jsonl_rows(out) == rows
    assert len(list(strips.iterdir())) == 3  # the strip folder is never searched for images

    # the bad files removed and a new image added: only the new one is captioned, exit 0
    for bad in BAD:
        (photos / bad).unlink()
    shapes_images(1, seed=5)[0].save(photos / "sub" / "four.png")
    assert run(photos, "--out", out, model=tiny_checkpoint) == EXIT_OK
    assert "1 captioned, 0 skipped, 3 already in" in capsys.readouterr().err
    assert names(jsonl_rows(out)) == sorted(GOOD | {"four.png"})


def test_csv_output_and_glob_patterns(photos, tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "captions.csv"
    assert run(f"{photos}/*.png", f"{photos}/**/three.jpg", "--out", out, model=tiny_checkpoint) == EXIT_OK
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["file"]).name for r in rows] == ["one.png", "three.jpg"]
    for row in rows:
        assert json.loads(row["words"]) == row["caption"].split()
        assert (row["grid_h"], row["grid_w"]) == ("8", "8") and float(row["score"]) <= 0
        assert (int(row["image_width"]), int(row["image_height"])) == Image.open(row["file"]).size
        assert row["heatmap"] == "" and row["model"] == tiny_checkpoint
    # the folder too: the two globbed files are done, the bad ones are skipped, one header only
    assert run(photos, "--out", out, model=tiny_checkpoint) == EXIT_SKIPPED
    assert "1 captioned, 2 skipped, 2 already in" in capsys.readouterr().err
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join(cli.CSV_COLUMNS) and len(lines) == 4


def test_rows_match_the_python_api(photos, tmp_path, tiny_checkpoint):
    out = tmp_path / "captions.jsonl"
    assert run(photos / "one.png", photos / "two.jpg", "--out", out, model=tiny_checkpoint) == EXIT_OK
    captioner = ImageCaptioner.from_pretrained(tiny_checkpoint)
    for row in jsonl_rows(out):
        expected = captioner.caption(row["file"], num_beams=2, max_length=12)
        assert row["caption"] == expected.text and row["score"] == pytest.approx(expected.score, abs=1e-4)


def test_an_interrupted_run_leaves_a_partial_row_that_the_next_run_drops(photos, tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "captions.jsonl"
    assert run(photos / "one.png", "--out", out, model=tiny_checkpoint) == EXIT_OK
    with out.open("a") as handle:
        handle.write('{"file": "' + str(photos / "two.jpg"))  # killed mid-write
    assert run(photos / "one.png", photos / "two.jpg", "--out", out, model=tiny_checkpoint) == EXIT_OK
    assert "dropping an incomplete last row" in capsys.readouterr().err
    assert names(jsonl_rows(out)) == ["one.png", "two.jpg"]


def test_usage_errors_exit_2_and_say_what_was_expected(photos, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    out = tmp_path / "c.jsonl"
    cases = [
        ([photos / "missing.jpg", "--out", out], "does not exist"),
        ([f"{photos}/*.gif", "--out", out], "no file matches the pattern"),
        ([photos / "readme.txt", "--out", tmp_path / "c.txt"], "expected --out to end in .jsonl, .csv or .parquet"),
        ([photos, "--out", out, "--no-repeat-ngram-size", "-1"], "no_repeat_ngram_size must be"),
        ([photos, "--out", out, "--beams", "17"], "--beams must be between 1 and 16"),
    ]
    for args, message in cases:
        assert run(*args, model=tiny_checkpoint) == EXIT_USAGE, message
        assert message in capsys.readouterr().err
    assert cli.main([str(photos), "--out", str(out), "--batch-size", "0"]) == EXIT_USAGE
    assert "expected a whole number >= 1" in capsys.readouterr().err
    monkeypatch.delenv("CAPTION_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)  # no checkpoints/shapes/best here
    assert cli.main([str(photos), "--out", str(out)]) == EXIT_USAGE
    assert "no model given: pass --model" in capsys.readouterr().err
    assert run(photos, "--out", out, model=str(tmp_path / "nowhere")) == EXIT_USAGE
    assert "folder" in capsys.readouterr().err and not out.exists()
    (tmp_path / "other.jsonl").write_text("a line that is not JSON\n")
    assert run(photos, "--out", tmp_path / "other.jsonl", model=tiny_checkpoint) == EXIT_USAGE
    assert "is not a caption file written by caption-images" in capsys.readouterr().err
    assert cli.main(["--help"]) == EXIT_OK


def test_model_from_the_environment(photos, tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("CAPTION_MODEL", tiny_checkpoint)
    out = tmp_path / "c.jsonl"
    assert cli.main([str(photos / "one.png"), "--out", str(out), *FAST]) == EXIT_OK
    assert jsonl_rows(out)[0]["model"] == tiny_checkpoint


def test_python_m_runs_the_int8_mode_without_training_code(photos, tmp_path, tiny_checkpoint):
    """A real process, the default precision (int8), cwd outside the repository; the CLI never imports
    caption_model.training (a plain `pip install` has no datasets/evaluate). accelerate is not checked:
    transformers imports it whenever it is installed."""
    out = tmp_path / "captions.jsonl"
    code = ("import runpy, sys\n"
            "sys.argv = ['caption-images'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('caption_model.cli', run_name='__main__')\n"
            "except SystemExit as exit_:\n    status = exit_.code\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('caption_model.training') or m in "
            "('datasets', 'evaluate', 'gradio', 'pycocoevalcap'))\n"
            "print('LOADED', loaded)\nsys.exit(status)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CAPTION_PRECISION", None)
    proc = subprocess.run([sys.executable, "-c", code, str(photos), "--out", str(out), "--model", tiny_checkpoint,
                           "--beams", "1"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == EXIT_SKIPPED, proc.stderr
    assert "LOADED []" in proc.stdout, proc.stdout
    assert names(jsonl_rows(out)) == sorted(GOOD)
    help_run = subprocess.run([sys.executable, "-m", "caption_model.cli", "--help"], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=120)
    assert help_run.returncode == 0 and "--no-repeat-ngram-size" in help_run.stdout

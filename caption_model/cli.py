"""caption-images: caption files, folders and globs into a JSONL or CSV file, optionally with heatmap strips.

    caption-images photos/ extra/*.png --out captions.jsonl --heatmaps heatmaps/
    python -m caption_model.cli photos/ --out captions.csv --model USER/REPO

Rows are appended and flushed per batch, so an interrupted run loses at most one batch and a re-run skips the
files already in the output. A file that cannot be read or captioned is named on stderr and skipped; it is not
written, so the next run tries it again. Exit status: 0 every file captioned (or already done), 2 usage error
(bad arguments, a path that matches nothing, a model that cannot be loaded), 3 some files were skipped.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .cpu.fast_mode import REQUESTS
from .generation import DEFAULT_NO_REPEAT_NGRAM_SIZE, DEFAULT_REPETITION_PENALTY, Caption, check_repetition_control
from .heatmap import DEFAULT_INPUT_SIZE, cell_geometry
from .processing import load_image, original_size

EXIT_OK, EXIT_USAGE, EXIT_SKIPPED = 0, 2, 3
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
LOCAL_CHECKPOINT = Path("checkpoints") / "shapes" / "best"  # what `make demo` / train.py --preset shapes write
CSV_COLUMNS = ["file", "caption", "words", "score", "grid_h", "grid_w", "image_width", "image_height", "heatmap",
               "model"]
STRIP_HEIGHT = 192  # px of each tile in a heatmap strip
LABEL_HEIGHT = 24  # px of the word under each tile


class UsageError(Exception):
    """Bad arguments: the message says what was expected and what came (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caption-images", description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 all captioned, 2 usage error, 3 some files skipped (named on stderr).")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="image files, folders (searched recursively for " + " ".join(sorted(IMAGE_EXTENSIONS))
                        + ") or glob patterns such as 'photos/**/*.jpg'")
    parser.add_argument("--out", required=True,
                        help="output file: .jsonl or .csv (appended to; the files already in it are skipped)")
    parser.add_argument("--model", default=None,
                        help=f"Hub model id or checkpoint folder (default: $CAPTION_MODEL, else ./{LOCAL_CHECKPOINT})")
    parser.add_argument("--heatmaps", default=None, metavar="DIR",
                        help="also write one PNG per image: the image, then one heatmap overlay per word")
    parser.add_argument("--beams", type=_positive_int, default=3, help="beam size; 1 = greedy (default 3)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--max-length", type=_positive_int, default=30, help="most tokens per caption (default 30)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=DEFAULT_NO_REPEAT_NGRAM_SIZE,
                        help=f"never repeat an n-gram of this many tokens; 0 = off (default "
                        f"{DEFAULT_NO_REPEAT_NGRAM_SIZE})")
    parser.add_argument("--repetition-penalty", type=float, default=DEFAULT_REPETITION_PENALTY,
                        help="multiply the log-probability of tokens already in the caption by this; 1.0 = off "
                        f"(default {DEFAULT_REPETITION_PENALTY})")
    parser.add_argument("--precision", choices=("int8",) + REQUESTS, default=os.environ.get("CAPTION_PRECISION", "auto"),
                        help="auto (or int8): the fast CPU mode the app serves, chosen for this CPU; int8-vnni / "
                        "int8-avx2 force one; fp32: the weights as trained (default $CAPTION_PRECISION, else auto)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: the CPUs this process may use)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


# --- which files ------------------------------------------------------------------------------------------------
def file_key(path: str) -> str:
    """The identity of a file in the output: its absolute path (relative paths resolve against the cwd)."""
    return os.path.normcase(os.path.abspath(path))


def find_images(paths: Sequence[str], exclude: str | None = None) -> list[str]:
    """Files, folders (recursive, image extensions only, hidden entries skipped) and globs -> paths in argument
    order, each once. `exclude`: a folder never searched (the heatmap folder). UsageError for a path or
    pattern that matches nothing, or when no image is found at all."""
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


# --- the output file --------------------------------------------------------------------------------------------
class CaptionFile:
    """The .jsonl or .csv output: the files it already holds, and appending rows (flushed per call)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.format = self.path.suffix.lower().lstrip(".")
        if self.format not in ("jsonl", "csv"):
            raise UsageError(f"expected --out to end in .jsonl or .csv, got {path!r}")
        self.done = self._read_done() if self.path.is_file() else set()
        self._handle = None  # opened at the first write: a run that fails before captioning leaves no file

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8", newline="")
        if self.format == "csv":
            self._csv = csv.DictWriter(self._handle, fieldnames=CSV_COLUMNS)
            if self.path.stat().st_size == 0:
                self._csv.writeheader()

    def _read_done(self) -> set[str]:
        """Keys of the files in the existing output; an incomplete last line (a killed run) is cut off."""
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            print(f"caption-images: {self.path}: dropping an incomplete last row (an interrupted run)",
                  file=sys.stderr)
            with self.path.open("r+b") as handle:
                handle.truncate(cut)
            data = data[:cut]
        text = data.decode("utf-8")
        try:
            if self.format == "csv":
                reader = csv.DictReader(text.splitlines())
                if reader.fieldnames and reader.fieldnames != CSV_COLUMNS:
                    raise ValueError(f"columns {reader.fieldnames}, expected {CSV_COLUMNS}")
                files = [row["file"] for row in reader]
            else:
                files = [json.loads(line)["file"] for line in text.splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(f"{self.path} exists but is not a caption file written by caption-images ({error}); "
                             "pass another --out or move it away") from error
        return {file_key(file) for file in files}

    def write(self, rows: list[dict]) -> None:
        if self._handle is None:
            self._open()
        for row in rows:
            if self.format == "csv":
                gh, gw = row["grid_size"]
                width, height = row["image_size"]
                self._csv.writerow({**{k: row[k] for k in ("file", "caption", "score", "model")},
                                    "words": json.dumps(row["words"]), "grid_h": gh, "grid_w": gw,
                                    "image_width": width, "image_height": height, "heatmap": row["heatmap"] or ""})
            else:
                self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


# --- heatmap strips ---------------------------------------------------------------------------------------------
def heatmap_strip(image: Image.Image, caption: Caption, height: int = STRIP_HEIGHT,
                  input_size: int = DEFAULT_INPUT_SIZE) -> Image.Image:
    """The image, then one overlay per word (caption_model.heatmap.overlay; `input_size` the model's input side),
    each tile labelled -> one RGB image."""
    from .heatmap import overlay  # matplotlib: only when strips are asked for

    width = max(1, round(image.width * height / image.height))
    small = image.resize((width, height), Image.Resampling.BICUBIC)
    tiles = [(small, "(image)")]
    tiles += [(overlay(small, caption.attention[i], input_size=input_size), word)
              for i, word in enumerate(caption.words)]
    strip = Image.new("RGB", (width * len(tiles), height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(strip)
    font = _font()
    for index, (tile, label) in enumerate(tiles):
        strip.paste(tile, (index * width, 0))
        draw.text((index * width + width / 2, height + LABEL_HEIGHT / 2), label, fill="black", font=font, anchor="mm")
    return strip


def _font():
    try:
        return ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def heatmap_name(file: str) -> str:
    """A strip's file name: the image's stem and a short hash of its path (images in different folders may
    share a name)."""
    digest = hashlib.sha1(file_key(file).encode("utf-8")).hexdigest()[:8]
    return f"{Path(file).stem}-{digest}.png"


# --- captioning -------------------------------------------------------------------------------------------------
def default_model() -> str:
    """$CAPTION_MODEL, else ./checkpoints/shapes/best when it holds a checkpoint; UsageError otherwise."""
    if os.environ.get("CAPTION_MODEL"):
        return os.environ["CAPTION_MODEL"]
    if (LOCAL_CHECKPOINT / "config.json").is_file():
        return str(LOCAL_CHECKPOINT)
    raise UsageError(f"no model given: pass --model USER/REPO (a Hub model id) or a checkpoint folder, or set "
                     f"CAPTION_MODEL (there is no ./{LOCAL_CHECKPOINT} here either)")


def load_captioner(model: str, precision: str):
    """The captioner in eval mode (int8: the fast CPU mode); UsageError saying why it could not be loaded."""
    from .captioner import ImageCaptioner

    path = Path(model).expanduser()
    if model.startswith((".", "/", "~")) and not path.is_dir():
        raise UsageError(f"expected --model to be a checkpoint folder or a Hub model id, but folder {model!r} "
                         "does not exist")
    try:
        captioner = ImageCaptioner.from_pretrained(str(path) if path.is_dir() else model)
    except Exception as error:  # Hub, IO and key errors all mean "cannot use this model"
        raise UsageError(f"could not load model {model!r}: {type(error).__name__}: {error} (expected a checkpoint "
                         "folder written by save_pretrained or a Hub model repo id)") from error
    return captioner.eval().quantize_int8(mode="auto" if precision == "int8" else precision)


def caption_images(captioner, images: list, args: argparse.Namespace) -> list[Caption | Exception]:
    """One batched call; if it fails, one call per image, so one bad image costs only itself."""
    options = dict(num_beams=args.beams, max_length=args.max_length, no_repeat_ngram_size=args.no_repeat_ngram_size,
                   repetition_penalty=args.repetition_penalty)
    try:
        return captioner.caption_batch(images, **options)
    except Exception:
        results: list[Caption | Exception] = []
        for image in images:
            try:
                results.append(captioner.caption(image, **options))
            except Exception as error:
                results.append(error)
        return results


def make_row(file: str, image: Image.Image, caption: Caption, grid: tuple[int, int], model: str,
             heatmap: str | None, input_size: int = DEFAULT_INPUT_SIZE) -> dict:
    return {"file": file, "caption": caption.text, "words": list(caption.words), "score": round(caption.score, 6),
            "grid_size": [int(grid[0]), int(grid[1])],  # [gh, gw]: rows and columns of the attention grid
            "image_size": list(original_size(image)),  # [width, height] of the (EXIF-upright) image file
            "heatmap": heatmap, "model": model,
            # JSON Lines only: cell (i, j)'s receptive-field centre is (cell_centres_x[j], cell_centres_y[i]) px
            "cell_geometry": cell_geometry(grid, original_size(image), input_size)}


def run_batch(captioner, files: list[str], args: argparse.Namespace, out: CaptionFile, report) -> list[str]:
    """Caption `files`, write their rows (and strips) -> the files skipped; `report(line)` names each one."""
    skipped, loaded = [], []
    side = max(captioner.config.image_size, STRIP_HEIGHT if args.heatmaps else 0)  # decode no larger than needed
    for file in files:
        try:
            loaded.append((file, load_image(file, min_side=side)))
        except ValueError as error:  # processing.ImageLoadError: not an image, truncated, decompression bomb
            skipped.append(file)
            report(f"skipped {file}: {error}")
    results = caption_images(captioner, [image for _, image in loaded], args) if loaded else []
    rows = []
    for (file, image), result in zip(loaded, results):
        if isinstance(result, Exception):
            skipped.append(file)
            report(f"skipped {file}: could not caption it ({type(result).__name__}: {result})")
            continue
        strip = None
        if args.heatmaps:
            strip = os.path.join(args.heatmaps, heatmap_name(file))
            heatmap_strip(image, result, input_size=captioner.config.image_size).save(strip)
        rows.append(make_row(file, image, result, captioner.config.grid_size, args.model, strip,
                             captioner.config.image_size))
    out.write(rows)
    return skipped


def caption_all(captioner, todo: list[str], args: argparse.Namespace, out: CaptionFile) -> list[str]:
    """Caption `todo` batch by batch under a progress bar -> the files skipped."""
    from tqdm.auto import tqdm

    skipped: list[str] = []
    with tqdm(total=len(todo), unit="image", desc="captioning", file=sys.stderr, disable=None) as bar:
        report = lambda line: tqdm.write(line, file=sys.stderr)  # noqa: E731 (keeps the bar intact)
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            skipped += run_batch(captioner, batch, args, out, report)
            bar.update(len(batch))
    return skipped


def summary(captioned: int, skipped: list[str], already: int, out: Path) -> str:
    line = f"caption-images: {captioned} captioned, {len(skipped)} skipped, {already} already in {out}"
    if skipped:
        names = ", ".join(skipped[:10]) + (f", ... ({len(skipped) - 10} more)" if len(skipped) > 10 else "")
        line += f"\nskipped (not written; a re-run tries them again): {names}"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 all captioned, 2 usage error, 3 some files skipped)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or argparse's own usage error (status 2)
        return int(exit_.code or 0)
    try:
        return _run(args)
    except UsageError as error:
        print(f"caption-images: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    if args.beams > 16:
        raise UsageError(f"--beams must be between 1 and 16, got {args.beams}")
    try:
        check_repetition_control(args.no_repeat_ngram_size, args.repetition_penalty)
    except ValueError as error:
        raise UsageError(str(error)) from error
    files = find_images(args.paths, exclude=args.heatmaps)
    out = CaptionFile(args.out)
    try:
        todo = [file for file in files if file_key(file) not in out.done]
        if not todo:
            print(summary(0, [], len(files), out.path), file=sys.stderr)
            return EXIT_OK
        args.model = args.model or default_model()
        captioner = load_captioner(args.model, args.precision)
        if args.max_length > captioner.config.max_position_embeddings - 1:
            raise UsageError(f"--max-length must be at most {captioner.config.max_position_embeddings - 1} for "
                             f"this model, got {args.max_length}")
        from .cpu.threads import set_inference_threads

        set_inference_threads(args.threads)
        if args.heatmaps:
            os.makedirs(args.heatmaps, exist_ok=True)
        try:
            skipped = caption_all(captioner, todo, args, out)
        except KeyboardInterrupt:
            print(f"caption-images: interrupted; the rows written so far are in {out.path}: run the same command "
                  "again to continue", file=sys.stderr)
            return 130
    finally:
        out.close()
    print(summary(len(todo) - len(skipped), skipped, len(files) - len(todo), out.path), file=sys.stderr)
    return EXIT_SKIPPED if skipped else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

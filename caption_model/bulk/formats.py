"""The output file of caption-images, in four formats. Each reads back the rows it holds (to resume) and writes
all its rows at once, into a temporary file renamed over the old one, so the file itself is never half-written:
only the merge (shards.py) writes it, from the rows the processes left in their part files.

A row, as a process writes it (JSON Lines keeps it whole):
    {"file", "caption", "words", "score", "grid_size": [gh, gw], "image_size": [W, H], "heatmap", "model",
     "cell_geometry"}
    .jsonl       one row per line
    .csv         the flat columns CSV_COLUMNS, `words` as a JSON list; no cell geometry
    .parquet     the same columns typed (`words` a list of strings): what `datasets.load_dataset("parquet")` loads
    imagefolder  <folder>/metadata.jsonl with `file_name` (the image's path inside the folder), caption, score and
                 model: the `datasets` imagefolder convention, which train.py --source <folder> trains on
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from . import UsageError
from .files import file_key

FORMATS = ("jsonl", "csv", "parquet", "imagefolder")
CSV_COLUMNS = ["file", "caption", "words", "score", "grid_h", "grid_w", "image_width", "image_height", "heatmap",
               "model"]
METADATA_FILE = "metadata.jsonl"  # the imagefolder's caption file (datasets' name)

Records = list[tuple[str, Any]]  # (file_key, the format's own record), in file order


def open_output(out: str, kind: str = "auto") -> "Output":
    """The output named by --out and --format ("auto": from the name: .jsonl, .csv, .parquet, or a file named
    metadata.jsonl for an imagefolder). UsageError for a name that says no format."""
    path = Path(out)
    if kind == "auto":
        suffix = path.suffix.lower().lstrip(".")
        kind = "imagefolder" if path.name == METADATA_FILE else suffix
        if kind not in FORMATS:
            raise UsageError(f"expected --out to end in .jsonl, .csv or .parquet (or --format imagefolder with --out "
                             f"the image folder), got {out!r}")
    if kind not in FORMATS:
        raise UsageError(f"expected --format to be one of auto, {', '.join(FORMATS)}; got {kind!r}")
    return {"jsonl": JsonLines, "csv": Csv, "parquet": Parquet, "imagefolder": ImageFolder}[kind](path)


class Output:
    """One output file: read() what it holds, record() a new row in its form, write() all records at once."""

    kind = ""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> tuple[Records, bool]:
        """The records already in the file (none when it does not exist), and whether an unfinished last line was
        dropped (a file appended to by a killed run of an earlier version)."""
        raise NotImplementedError

    def record(self, row: dict) -> Any:
        raise NotImplementedError

    def write(self, records: Sequence[Any]) -> None:
        raise NotImplementedError

    def check_files(self, files: Sequence[str]) -> None:
        """UsageError when some of `files` cannot have a row in this output (before any captioning)."""

    def not_ours(self, error: Exception) -> UsageError:
        return UsageError(f"{self.path} exists but is not a caption file written by caption-images ({error}); "
                          "pass another --out or move it away")


class JsonLines(Output):
    kind = "jsonl"

    def read(self) -> tuple[Records, bool]:
        if not self.path.is_file():
            return [], False
        text, dropped = _complete_lines(self.path)
        try:
            records = [(self.key(json.loads(line)), line) for line in text.splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError) as error:
            raise self.not_ours(error) from error
        return records, dropped

    def key(self, row: dict) -> str:
        return file_key(row["file"])

    def record(self, row: dict) -> str:
        return json.dumps(row, ensure_ascii=False)

    def write(self, records: Sequence[str]) -> None:
        def lines(handle):
            for record in records:
                handle.write(record + "\n")

        _replace_text(self.path, lines)


class ImageFolder(JsonLines):
    """<folder>/metadata.jsonl beside the images; `--out` names the folder or that file."""

    kind = "imagefolder"

    def __init__(self, path: Path):
        if path.is_file() and path.name != METADATA_FILE:
            raise UsageError(f"--format imagefolder: expected --out to be the image folder or its {METADATA_FILE}, "
                             f"got the file {str(path)!r}")
        self.folder = path.parent if path.name == METADATA_FILE else path
        super().__init__(self.folder / METADATA_FILE)

    def key(self, row: dict) -> str:
        return file_key(os.path.join(self.folder, row["file_name"]))

    def record(self, row: dict) -> str:
        entry = {"file_name": self.file_name(row["file"]), "caption": row["caption"], "score": row["score"],
                 "model": row["model"]}
        return json.dumps(entry, ensure_ascii=False)

    def file_name(self, file: str) -> str:
        """`file`'s path inside the folder, with / (what datasets reads); UsageError for a file outside it."""
        relative = os.path.relpath(os.path.abspath(file), os.path.abspath(self.folder))
        if relative == ".." or relative.startswith(".." + os.sep) or os.path.isabs(relative):
            raise UsageError(f"--format imagefolder: expected every image inside {str(self.folder)!r} (metadata.jsonl "
                             f"names each by its path in the folder), but {file!r} is outside it")
        return Path(relative).as_posix()

    def check_files(self, files: Sequence[str]) -> None:
        for file in files:
            self.file_name(file)


class Csv(Output):
    kind = "csv"

    def read(self) -> tuple[Records, bool]:
        if not self.path.is_file():
            return [], False
        text, dropped = _complete_lines(self.path)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            if reader.fieldnames and reader.fieldnames != CSV_COLUMNS:
                raise ValueError(f"columns {reader.fieldnames}, expected {CSV_COLUMNS}")
            records = [(file_key(row["file"]), row) for row in reader]
        except (ValueError, KeyError, TypeError, csv.Error) as error:
            raise self.not_ours(error) from error
        return records, dropped

    def record(self, row: dict) -> dict:
        gh, gw = row["grid_size"]
        width, height = row["image_size"]
        return {"file": row["file"], "caption": row["caption"], "words": json.dumps(row["words"]),
                "score": row["score"], "grid_h": gh, "grid_w": gw, "image_width": width, "image_height": height,
                "heatmap": row["heatmap"] or "", "model": row["model"]}

    def write(self, records: Sequence[dict]) -> None:
        def rows(handle):
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(records)

        _replace_text(self.path, rows)


class Parquet(Output):
    kind = "parquet"

    def read(self) -> tuple[Records, bool]:
        if not self.path.is_file():
            return [], False
        import pyarrow.parquet as pq  # with datasets; only when Parquet is asked for

        try:
            table = pq.read_table(self.path)
            if table.schema.names != _parquet_schema().names:
                raise ValueError(f"columns {table.schema.names}, expected {_parquet_schema().names}")
        except (ValueError, OSError) as error:  # pyarrow.ArrowInvalid is a ValueError
            raise self.not_ours(error) from error
        return [(file_key(row["file"]), row) for row in table.to_pylist()], False

    def record(self, row: dict) -> dict:
        gh, gw = row["grid_size"]
        width, height = row["image_size"]
        return {"file": row["file"], "caption": row["caption"], "words": list(row["words"]),
                "score": float(row["score"]), "grid_h": gh, "grid_w": gw, "image_width": width,
                "image_height": height, "heatmap": row["heatmap"], "model": row["model"]}

    def write(self, records: Sequence[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(list(records), schema=_parquet_schema())
        _replace(self.path, lambda temporary: pq.write_table(table, temporary))


def _parquet_schema():
    import pyarrow as pa

    return pa.schema([("file", pa.string()), ("caption", pa.string()), ("words", pa.list_(pa.string())),
                      ("score", pa.float64()), ("grid_h", pa.int32()), ("grid_w", pa.int32()),
                      ("image_width", pa.int32()), ("image_height", pa.int32()), ("heatmap", pa.string()),
                      ("model", pa.string())])


def _complete_lines(path: Path) -> tuple[str, bool]:
    """The file's text up to its last newline, and whether an unfinished last line was dropped."""
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1 if data and not data.endswith(b"\n") else len(data)
    return data[:cut].decode("utf-8"), cut < len(data)


def _replace_text(path: Path, write: Callable[[Any], None]) -> None:
    def text(temporary: Path) -> None:
        with temporary.open("w", encoding="utf-8", newline="") as handle:
            write(handle)

    _replace(path, text)


def _replace(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary) then rename it over `path`: a reader (or a killed run) sees the old file or the new one,
    never a mix. The data reaches the disk before the rename (fsync), so a power cut cannot leave an empty file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)

"""How the work is cut and put back together: batches cut at fixed places of the listing and dealt to the
processes in contiguous runs; each process's part file (one line per batch: a JSON list of its rows, flushed per
batch); and the merge that folds the part files into the output file, in listing order, each file once.

Why batches are cut from the listing and never re-cut: an image's caption can depend on the images that share its
batch (the int8 mode quantises a batch's activations with one scale). Cut at fixed places, an image meets the same
neighbours whether 1 process or 8 caption the listing, and again when a killed run is resumed (a batch is in a
part file whole or not at all), so the output is the same file whichever way it was made, given the same
--batch-size, --threads and options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from . import UsageError
from .files import file_key
from .formats import Output

T = TypeVar("T")


def cut_batches(listing: Sequence[str], done: set[str], batch_size: int) -> list[list[str]]:
    """The files of `listing` whose key is not in `done`, in batches: batch k holds what is left of
    listing[k*B : (k+1)*B]; empty batches are dropped."""
    batches = []
    for start in range(0, len(listing), batch_size):
        batch = [file for file in listing[start:start + batch_size] if file_key(file) not in done]
        if batch:
            batches.append(batch)
    return batches


def deal(batches: Sequence[T], index: int, count: int) -> list[T]:
    """Process `index` of `count`'s share: a contiguous run of batches, one more for each of the first
    len(batches) % count processes (the split accelerate's split_between_processes makes)."""
    if not 0 <= index < count:
        raise ValueError(f"expected a process index in [0, {count}), got {index}")
    size, extra = divmod(len(batches), count)
    start = index * size + min(index, extra)
    return list(batches[start:start + size + (1 if index < extra else 0)])


def parts_folder(output_path: Path) -> Path:
    """Where the processes write their part files: a hidden folder beside the output (never searched for
    images, ignored by `datasets`)."""
    return output_path.with_name(f".{output_path.name}.parts")


def part_path(folder: Path, index: int, count: int) -> Path:
    return folder / f"part-{index:05d}-of-{count:05d}.jsonl"


class PartFile:
    """One process's rows: one line per batch, a JSON list of the batch's rows, flushed once written. A process
    killed while writing leaves an unfinished last line, which read_part ignores: its batch is captioned again."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None  # opened at the first batch: a process with nothing to write leaves no file

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self._handle is None:
            self._open()
        self._handle.write(json.dumps(rows, ensure_ascii=False) + "\n")
        self._handle.flush()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():  # left by a run whose parts were not merged: keep its complete lines only
            data = self.path.read_bytes()
            with self.path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
        self._handle = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_part(path: Path) -> list[dict]:
    """The rows of a part file's complete lines (an unfinished last line is ignored)."""
    data = path.read_bytes()
    rows = []
    for number, line in enumerate(data[:data.rfind(b"\n") + 1].decode("utf-8").splitlines(), start=1):
        try:
            batch = json.loads(line)
            if not isinstance(batch, list) or not all(isinstance(row, dict) and isinstance(row.get("file"), str)
                                                      for row in batch):
                raise ValueError(f"got {line[:80]!r}")
        except ValueError as error:
            raise UsageError(f"{path}, line {number}: expected a JSON list of caption rows ({error}); it was not "
                             "written by caption-images: move it away") from error
        rows += batch
    return rows


@dataclass
class Merged:
    keys: set[str]  # the file keys the output holds after the merge
    added: int  # rows that came from part files


def merge_parts(output: Output, listing: Sequence[str], report: Callable[[str], None]) -> Merged:
    """Fold the part files beside `output` into it.

    The output then holds the rows of files in `listing` in listing order, each file once (a row already in the
    output wins), after any rows of files not in the listing (runs over other paths), which keep their order.
    The file is replaced whole (formats.py), then the parts are deleted: a kill at any point leaves each row in
    the output, in a part or in both, and the next merge drops the repeat. Nothing is rewritten when there are
    no parts and the output is whole."""
    existing, dropped = output.read()
    if dropped:
        report(f"caption-images: {output.path}: dropping an incomplete last row (an interrupted run)")
    folder = parts_folder(output.path)
    parts = sorted(folder.glob("part-*.jsonl")) if folder.is_dir() else []
    if not parts and not dropped:
        return Merged({key for key, _ in existing}, 0)
    records: dict[str, object] = {}
    for key, record in existing:
        records.setdefault(key, record)  # a repeated file keeps its first row
    added = 0
    for part in parts:
        for row in read_part(part):
            key = file_key(row["file"])
            if key not in records:
                records[key] = output.record(row)
                added += 1
    position = {file_key(file): index for index, file in enumerate(listing)}
    ordered = sorted(records, key=lambda key: position.get(key, -1))  # stable: the rest keep their order
    output.write([records[key] for key in ordered])
    for part in parts:
        part.unlink()
    try:
        folder.rmdir()
    except OSError:  # not there, or something else in it
        pass
    return Merged(set(records), added)

"""caption-images on several processes (issue 27): batches cut at fixed places of the listing and dealt whole, the
part files and their merge, resuming a killed run with another process count, the Parquet and imagefolder outputs;
and the real `accelerate launch` with 2 CPU processes, which must write the file that 1 process writes."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caption_model import cli
from caption_model.bulk.files import file_key, find_images
from caption_model.bulk.formats import open_output
from caption_model.bulk.shards import PartFile, cut_batches, deal, merge_parts, part_path, parts_folder, read_part
from caption_model.cli import EXIT_OK, EXIT_SKIPPED, EXIT_USAGE
from conftest import shapes_images

ROOT = Path(__file__).resolve().parents[1]
# the int8 mode (auto on x86-64), whose captions depend on each batch's neighbours: what the fixed cuts protect
OPTIONS = ["--precision", "auto", "--batch-size", "2", "--beams", "2", "--max-length", "12", "--device", "cpu",
           "--threads", "1"]
IMAGES = 40


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """40 images in two subfolders (odd batch counts per process) and one file that is not an image."""
    folder = tmp_path_factory.mktemp("processes") / "photos"
    for index, image in enumerate(shapes_images(IMAGES, seed=27)):
        sub = folder / ("a" if index < 25 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        image.save(sub / f"{index:03d}.png")
    (folder / "a" / "010-broken.jpg").write_text("not an image\n")
    return folder


@pytest.fixture(scope="module")
def reference(photos, tiny_checkpoint, tmp_path_factory) -> str:
    """The output of one process, in this process: the text every other way of running must write."""
    out = tmp_path_factory.mktemp("reference") / "captions.jsonl"
    assert run(photos, "--out", out, model=tiny_checkpoint) == EXIT_SKIPPED
    return out.read_text()


def run(*args, model: str) -> int:
    return cli.main(OPTIONS + ["--model", model] + [str(a) for a in args])


def launch_command(processes: int, *args, model: str) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes N` (torchrun underneath: N processes on a machine without a
    GPU too; `--cpu --num_processes N` starts one without MPI) of `python -m caption_model.cli`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "caption_model.cli",
            *OPTIONS, "--model", model, *[str(a) for a in args]]


def launch_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's caption_model, installed or not


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def row_files(text: str) -> list[str]:
    return [json.loads(line)["file"] for line in text.splitlines()]


# --- batches and shares (no model) ------------------------------------------------------------------------------
def test_batches_are_cut_at_fixed_places_and_each_file_goes_to_one_process():
    rng = random.Random(0)
    for _ in range(300):
        listing = [f"/p/{i:03d}.png" for i in range(rng.randrange(0, 30))]
        done = {file_key(f) for f in listing if rng.random() < 0.3}
        batch_size, count = rng.randrange(1, 6), rng.randrange(1, 5)
        batches = cut_batches(listing, done, batch_size)
        shares = [deal(batches, index, count) for index in range(count)]
        assert [batch for share in shares for batch in share] == batches  # contiguous, in order, all dealt
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        files = [file for batch in batches for file in batch]
        assert files == [f for f in listing if file_key(f) not in done]  # each file still to do, once
        for batch in batches:  # a batch never straddles a cut of the listing
            assert len({listing.index(file) // batch_size for file in batch}) == 1
    with pytest.raises(ValueError, match="process index"):
        deal([], 2, 2)


def test_the_merge_keeps_listing_order_and_one_row_per_file_and_drops_a_half_written_batch(tmp_path):
    listing = [str(tmp_path / f"{name}.png") for name in "abcdef"]

    def row(name: str) -> dict:
        return {"file": str(tmp_path / f"{name}.png"), "caption": f"caption {name}", "words": ["caption", name],
                "score": -0.5, "grid_size": [8, 8], "image_size": [64, 64], "heatmap": None, "model": "m"}

    out = open_output(str(tmp_path / "captions.jsonl"))
    out.write([out.record(row("x")), out.record(row("c"))])  # x: from a run over other paths
    folder = parts_folder(out.path)
    first = PartFile(part_path(folder, 0, 3))
    first.write([row("a"), row("b")])
    first.close()
    with part_path(folder, 0, 3).open("a") as handle:  # killed while writing its next batch
        handle.write(json.dumps([row("e"), row("f")])[:30])
    second = PartFile(part_path(folder, 1, 3))
    second.write([row("d"), row("c")])  # c is already in the output: dropped
    second.close()
    assert [r["file"] for r in read_part(part_path(folder, 0, 3))] == listing[:2]

    merged = merge_parts(out, listing, report=print)
    assert merged.added == 3 and merged.keys == {file_key(f) for f in [*listing[:4], str(tmp_path / "x.png")]}
    assert row_files(out.path.read_text()) == [str(tmp_path / "x.png"), *listing[:4]]
    assert not folder.exists()

    again = PartFile(part_path(folder, 0, 1))  # a part left half-written is cut back to whole batches on reopen
    again.path.parent.mkdir(parents=True)
    again.path.write_text(json.dumps([row("e")]) + "\n" + '[{"file": "')
    again.write([row("f")])
    again.close()
    assert [Path(r["file"]).stem for r in read_part(again.path)] == ["e", "f"]


# --- the real launcher ------------------------------------------------------------------------------------------
def test_two_processes_write_the_file_one_process_writes(photos, reference, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.jsonl"
    proc = subprocess.run(launch_command(2, photos, "--out", out, model=tiny_checkpoint), capture_output=True,
                          text=True, env=launch_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]  # several processes: skipped files do not fail the run
    assert out.read_text() == reference  # same rows, same order, same captions and scores
    broken = photos / "a" / "010-broken.jpg"
    assert sum(f"skipped {broken}:" in line for line in proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    assert f"{IMAGES} captioned, 1 skipped, 0 already in" in proc.stderr and "2 processes" in proc.stderr
    assert not parts_folder(out).exists()
    files = row_files(reference)
    assert len(files) == len(set(files)) == IMAGES


def test_a_run_killed_mid_way_resumes_on_another_process_count_into_the_same_file(photos, reference,
                                                                                    tiny_checkpoint, tmp_path):
    """SIGKILL every process of a 2-process run once some batches are written, then continue on 1 process."""
    import psutil  # an accelerate dependency

    out = tmp_path / "captions.jsonl"
    folder = parts_folder(out)
    log = (tmp_path / "launch.log").open("w")
    launcher = subprocess.Popen(launch_command(2, photos, "--out", out, model=tiny_checkpoint),
                                stdout=log, stderr=subprocess.STDOUT, env=launch_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while launcher.poll() is None and time.monotonic() < deadline:
            if sum(part.read_bytes().count(b"\n") for part in folder.glob("part-*")) >= 3:
                break
            time.sleep(0.01)
        processes = psutil.Process(launcher.pid).children(recursive=True)
        for process in processes:  # the workers run in sessions of their own: kill each
            process.send_signal(signal.SIGKILL)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=60)
    finally:
        launcher.kill()
        log.close()
    assert not out.exists(), f"the run ended before it was killed\n{(tmp_path / 'launch.log').read_text()[-2000:]}"
    left = [row["file"] for part in folder.glob("part-*") for row in read_part(part)]
    assert 3 <= len(left) < IMAGES

    assert run(photos, "--out", out, model=tiny_checkpoint) == EXIT_SKIPPED
    assert out.read_text() == reference
    assert not folder.exists()


def test_leftovers_of_a_killed_three_process_run_resume_on_two_processes(photos, reference, tiny_checkpoint,
                                                                        tmp_path):
    """The parts a 3-process run leaves when killed (whole batches; process 2 killed while writing its second)
    -> a 2-process run writes the reference file, captioning only the batches that are missing."""
    row_of = {row["file"]: row for row in map(json.loads, reference.splitlines())}
    batches = cut_batches(find_images([str(photos)]), set(), batch_size=2)
    shares = [deal(batches, index, 3) for index in range(3)]
    out = tmp_path / "captions.jsonl"
    folder = parts_folder(out)
    first, third = PartFile(part_path(folder, 0, 3)), PartFile(part_path(folder, 2, 3))
    for batch in shares[0][:2]:
        first.write([row_of[file] for file in batch])
    first.close()
    third.write([row_of[file] for file in shares[2][0]])
    third.close()
    with part_path(folder, 2, 3).open("a") as handle:
        handle.write(json.dumps([row_of[file] for file in shares[2][1]])[:-40])  # killed mid-line
    proc = subprocess.run(launch_command(2, photos, "--out", out, model=tiny_checkpoint), capture_output=True,
                          text=True, env=launch_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    assert "6 rows left in part files by an interrupted run are now in" in proc.stderr
    assert f"{IMAGES - 6} captioned, 1 skipped, 6 already in" in proc.stderr
    assert out.read_text() == reference
    assert not folder.exists()


# --- formats ----------------------------------------------------------------------------------------------------
def test_parquet_output_loads_back_with_datasets(photos, reference, tiny_checkpoint, tmp_path, capsys):
    from datasets import load_dataset

    out = tmp_path / "captions.parquet"
    assert run(f"{photos}/a/00*.png", "--out", out, model=tiny_checkpoint) == EXIT_OK
    assert run(f"{photos}/a/00*.png", f"{photos}/a/011.png", "--out", out, model=tiny_checkpoint) == EXIT_OK
    assert "1 captioned, 0 skipped, 10 already in" in capsys.readouterr().err
    loaded = load_dataset("parquet", data_files=str(out), split="train")
    expected = {row["file"]: row for row in map(json.loads, reference.splitlines())}
    assert len(loaded) == 11 and loaded[-1]["file"].endswith("011.png")
    for row in loaded.select(range(10)):  # 011.png met other neighbours in its batch than in the reference
        want = expected[row["file"]]
        assert (row["caption"], row["words"], row["score"]) == (want["caption"], want["words"], want["score"])
        assert [row["grid_h"], row["grid_w"]] == want["grid_size"] and row["heatmap"] is None


def test_imagefolder_output_is_what_training_loads(photos, reference, tiny_checkpoint, tmp_path, capsys):
    from caption_model.training.data import load_caption_dataset

    folder = tmp_path / "captioned"
    shutil.copytree(photos / "b", folder / "b")
    shutil.copy(photos / "a" / "010-broken.jpg", folder)
    assert run(folder, "--format", "imagefolder", "--out", folder, model=tiny_checkpoint) == EXIT_SKIPPED
    metadata = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [entry["file_name"] for entry in metadata] == [f"b/{i:03d}.png" for i in range(25, IMAGES)]
    expected = {Path(row["file"]).name: row["caption"] for row in map(json.loads, reference.splitlines())}
    assert all(entry["caption"] == expected[Path(entry["file_name"]).name] for entry in metadata)

    data = load_caption_dataset(str(folder))  # train.py --source FOLDER: Karpathy-style splits of one folder
    loaded = {row["image_id"]: row["captions"] for split in data.values() for row in split}
    assert loaded == {entry["file_name"]: [entry["caption"]] for entry in metadata}

    capsys.readouterr()  # the same folder again, named by its metadata.jsonl: nothing to do
    assert run(folder, "--out", folder / "metadata.jsonl", model=tiny_checkpoint) == EXIT_SKIPPED
    assert "0 captioned, 1 skipped, 15 already in" in capsys.readouterr().err
    assert run(photos / "a" / "000.png", "--format", "imagefolder", "--out", folder,
               model=tiny_checkpoint) == EXIT_USAGE
    assert "expected every image inside" in capsys.readouterr().err


# --- without accelerate; accelerate's one-process CPU launch ----------------------------------------------------
def test_without_accelerate_a_plain_run_is_one_process(photos, reference, tiny_checkpoint, tmp_path, monkeypatch):
    """The inference install has no accelerate: caption-images runs as one process, as before."""
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate now raises ImportError
    out = tmp_path / "captions.jsonl"
    assert run(photos, "--out", out, model=tiny_checkpoint) == EXIT_SKIPPED
    assert out.read_text() == reference
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run(photos, "--out", tmp_path / "other.jsonl", model=tiny_checkpoint) == EXIT_USAGE


def test_an_accelerate_cpu_launch_of_one_process_says_how_to_start_several(monkeypatch, capsys):
    from caption_model.bulk.processes import start_processes

    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu --num_processes 2` sets
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    processes = start_processes("auto")
    assert (processes.count, processes.device.type) == (1, "cpu")
    assert "--multi_gpu --num_processes N" in capsys.readouterr().err

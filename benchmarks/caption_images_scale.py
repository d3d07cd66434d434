"""caption-images on 1 process and on N through `accelerate launch`: images/s of each, whether they write the same
file, and a run killed mid-way and resumed (issue 27).

    python benchmarks/caption_images_scale.py checkpoints/shapes/best --images 500          # 1 vs 2 processes
    python benchmarks/caption_images_scale.py CHECKPOINT --images 500 --processes 2 --kill-at 0.5 --resume-processes 1

Generates `--images` shapes images (PNG, caption_model.training.shapes) in a temporary folder, then runs the real
command line: `python -m caption_model.cli` (1 process) and `accelerate launch --multi_gpu --num_processes N -m
caption_model.cli` (N processes; on a machine without a GPU each is a CPU process), every process with
`--threads` torch threads. images/s is the CLI's own figure: images captioned over the time from the moment every
process has its model to the last one's end (start-up and model loading are in the wall time beside it); "waited"
is the most any process waited for its loader threads' next batch.
--kill-at F also starts an N-process run, SIGKILLs every process once F of the images are in its part files,
resumes with --resume-processes and compares the final file with the 1-process one. Prints the CPU, a table and
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from caption_model.bulk.shards import parts_folder, read_part  # noqa: E402
from caption_model.cpu.features import describe_cpu  # noqa: E402

RATE = re.compile(r"([0-9.]+) images/s over ([0-9.]+) s, .*at most ([0-9.]+) s waiting")


def make_images(folder: Path, count: int, seed: int) -> None:
    import numpy as np

    from caption_model.training.shapes import generate_shapes_example

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for index in range(count):
        generate_shapes_example(rng).image.save(folder / f"{index:05d}.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(processes: int, cli_args: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "caption_model.cli", *cli_args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "caption_model.cli", *cli_args]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def caption(processes: int, cli_args: list[str]) -> dict:
    """One run to the end -> images/s (the CLI's), wall seconds, its exit status and summary line."""
    start = time.perf_counter()
    proc = subprocess.run(command(processes, cli_args), capture_output=True, text=True, env=environment())
    wall = time.perf_counter() - start
    found = RATE.search(proc.stderr)
    if proc.returncode != 0 or not found:
        sys.exit(f"caption-images failed ({processes} processes, exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = next(line for line in proc.stderr.splitlines() if "captioned," in line)
    return {"processes": processes, "images_per_s": float(found.group(1)), "captioning_s": float(found.group(2)),
            "waited_s": float(found.group(3)), "wall_s": round(wall, 1), "summary": summary}


def killed_and_resumed(processes: int, resume_processes: int, fraction: float, total: int, cli_args: list[str],
                       out: Path) -> dict:
    """Start an N-process run, SIGKILL every process once `fraction` of the images are in part files, resume."""
    import psutil  # an accelerate dependency

    folder = parts_folder(out)
    launcher = subprocess.Popen(command(processes, cli_args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=environment(), start_new_session=True)
    written = 0
    while launcher.poll() is None:
        written = sum(len(read_part(part)) for part in folder.glob("part-*"))
        if written >= fraction * total:
            break
        time.sleep(0.2)
    if launcher.poll() is not None:
        sys.exit("the run ended before it was killed: raise --images or lower --kill-at")
    for child in psutil.Process(launcher.pid).children(recursive=True):  # workers run in sessions of their own
        child.send_signal(signal.SIGKILL)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    left = sum(len(read_part(part)) for part in folder.glob("part-*"))
    resumed = caption(resume_processes, cli_args)
    return {"killed_after_rows": left, "resumed": resumed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder (save_pretrained) or Hub id")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=12345, help="seed of the generated images")
    parser.add_argument("--processes", type=int, default=2, help="the N of the multi-process runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="auto", help="caption-images --precision")
    parser.add_argument("--kill-at", type=float, default=None, help="also kill an N-process run at this fraction")
    parser.add_argument("--resume-processes", type=int, default=None, help="processes of the resumed run (default N)")
    parser.add_argument("--skip-scaling", action="store_true", help="only the 1-process reference and --kill-at")
    parser.add_argument("--one-process-threads", type=int, default=None,
                        help="also a 1-process run with this many threads (what one process uses by default)")
    args = parser.parse_args()

    print(f"CPU: {describe_cpu()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="caption-images-scale-") as work:
        work = Path(work)
        make_images(work / "images", args.images, args.seed)
        common = [str(work / "images"), "--model", args.checkpoint, "--threads", str(args.threads), "--beams",
                  str(args.beams), "--batch-size", str(args.batch_size), "--precision", args.precision,
                  "--device", "cpu"]
        runs = {"1": caption(1, common + ["--out", str(work / "one.jsonl")])}
        reference = (work / "one.jsonl").read_text()
        identical = {}
        if not args.skip_scaling:
            out = work / f"n{args.processes}.jsonl"
            runs[str(args.processes)] = caption(args.processes, common + ["--out", str(out)])
            identical[f"{args.processes} processes"] = out.read_text() == reference
        if args.one_process_threads:
            out = work / "one-threads.jsonl"
            threads = ["--threads", str(args.one_process_threads)]
            runs[f"1 process, {args.one_process_threads} threads"] = caption(1, common + threads + ["--out", str(out)])
            identical[f"1 process, {args.one_process_threads} threads"] = out.read_text() == reference
        if args.kill_at is not None:
            out = work / "killed.jsonl"
            resume = args.resume_processes or args.processes
            killed = killed_and_resumed(args.processes, resume, args.kill_at, args.images,
                                        common + ["--out", str(out)], out)
            runs[f"{args.processes} killed, resumed on {resume}"] = killed["resumed"]
            runs[f"{args.processes} killed, resumed on {resume}"]["killed_after_rows"] = killed["killed_after_rows"]
            identical[f"killed and resumed on {resume}"] = out.read_text() == reference
        rows = len(reference.splitlines())

    print(f"\n{args.images} shapes images, beam {args.beams}, batch {args.batch_size}, {args.threads} torch "
          f"thread(s) per process, precision {args.precision}; {rows} rows in the 1-process file")
    print(f"{'run':<36} {'images/s':>9} {'captioning s':>13} {'waited s':>9} {'wall s':>8}")
    for name, result in runs.items():
        label = f"{name} process{'es' if name != '1' else ''}" if name.isdigit() else name
        print(f"{label:<36} {result['images_per_s']:>9.2f} {result['captioning_s']:>13.1f} "
              f"{result['waited_s']:>9.1f} {result['wall_s']:>8.1f}")
        if "killed_after_rows" in result:
            print(f"{'':<36} (killed with {result['killed_after_rows']} rows in part files; {result['summary']})")
    for name, same in identical.items():
        print(f"{name}: {'identical' if same else 'DIFFERENT'} file to the 1-process one")
    print(json.dumps({"cpu": describe_cpu(), "images": args.images, "runs": runs, "identical": identical}))


if __name__ == "__main__":
    main()

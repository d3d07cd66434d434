"""caption-images: caption files, folders and globs into a JSONL, CSV or Parquet file or a captioned imagefolder,
optionally with heatmap strips, on one process or many (`accelerate launch`: processes, GPUs, machines).

    caption-images photos/ extra/*.png --out captions.jsonl --heatmaps heatmaps/
    python -m caption_model.cli photos/ --out captions.csv --model USER/REPO
    accelerate launch --multi_gpu --num_processes 8 -m caption_model.cli photos/ --out captions.parquet

Process 0 lists the files and cuts them into batches at fixed places of the listing; each process captions its
contiguous share into a part file beside the output, one flushed line per batch; when all are done, process 0
merges the parts into the output, in listing order. A run interrupted at any point loses at most the batches being
written; the next run, with any number of processes, merges what was written and captions only the rest.
A file that cannot be read or captioned is named on stderr and skipped; it is not written, so the next run tries
it again. Exit status: 0 every file captioned (or already done; also when several processes ran and some files
were skipped, as their launcher takes any other status for a crash), 2 usage error (bad arguments, a path that
matches nothing, a model that cannot be loaded), 3 some files were skipped (one process), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .bulk import UsageError
from .bulk.captioning import Captioning, Decoding, ShareResult, caption_share
from .bulk.files import IMAGE_EXTENSIONS, find_images
from .bulk.formats import CSV_COLUMNS, FORMATS, Output, open_output  # noqa: F401 (CSV_COLUMNS: the CSV's columns)
from .bulk.processes import DEVICES, Processes, start_processes
from .bulk.shards import PartFile, cut_batches, deal, merge_parts, part_path, parts_folder
from .bulk.strips import LABEL_HEIGHT, STRIP_HEIGHT  # noqa: F401 (the strip layout: the CLI's API)
from .cpu.fast_mode import REQUESTS
from .cpu.threads import available_cpus
from .generation import DEFAULT_NO_REPEAT_NGRAM_SIZE, DEFAULT_REPETITION_PENALTY, check_repetition_control

EXIT_OK, EXIT_USAGE, EXIT_SKIPPED, EXIT_INTERRUPTED = 0, 2, 3, 130
LOCAL_CHECKPOINT = Path("checkpoints") / "shapes" / "best"  # what `make demo` / train.py --preset shapes write
DEFAULT_BATCH_SIZE = {"cpu": 8, "cuda": 64}  # images per forward: more does not speed up a CPU; a GPU wants many


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caption-images", description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 all captioned (or several processes ran), 2 usage error, 3 some files skipped "
               "(named on stderr), 130 interrupted.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="image files, folders (searched recursively for " + " ".join(sorted(IMAGE_EXTENSIONS))
                        + ") or glob patterns such as 'photos/**/*.jpg'")
    parser.add_argument("--out", required=True,
                        help="output file: .jsonl, .csv or .parquet, or the image folder with --format imagefolder "
                        "(the files already in it are skipped)")
    parser.add_argument("--format", choices=("auto",) + FORMATS, default="auto",
                        help="auto: from the --out name (a file named metadata.jsonl: imagefolder); imagefolder: "
                        "metadata.jsonl (file_name, caption) in the --out folder, beside the images, for train.py")
    parser.add_argument("--model", default=None,
                        help=f"Hub model id or checkpoint folder (default: $CAPTION_MODEL, else ./{LOCAL_CHECKPOINT})")
    parser.add_argument("--heatmaps", default=None, metavar="DIR",
                        help="also write one PNG per image: the image, then one heatmap overlay per word")
    parser.add_argument("--beams", type=_positive_int, default=3, help="beam size; 1 = greedy (default 3)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="images per forward pass (default 8 on a CPU, 64 on a GPU); resume with the same one to "
                        "get the same captions")
    parser.add_argument("--max-length", type=_positive_int, default=30, help="most tokens per caption (default 30)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=DEFAULT_NO_REPEAT_NGRAM_SIZE,
                        help=f"never repeat an n-gram of this many tokens; 0 = off (default "
                        f"{DEFAULT_NO_REPEAT_NGRAM_SIZE})")
    parser.add_argument("--repetition-penalty", type=float, default=DEFAULT_REPETITION_PENALTY,
                        help="multiply the log-probability of tokens already in the caption by this; 1.0 = off "
                        f"(default {DEFAULT_REPETITION_PENALTY})")
    parser.add_argument("--precision", choices=("int8",) + REQUESTS,
                        default=os.environ.get("CAPTION_PRECISION", "auto"),
                        help="auto (or int8): on a CPU the fast mode the app serves, chosen for this CPU, on a GPU "
                        "bf16 autocast; int8-vnni / int8-avx2 force a CPU mode; fp32: the weights as trained (default "
                        "$CAPTION_PRECISION, else auto)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: each process's GPU when there are GPUs, else the CPU (default auto)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads per process (default: the CPUs this process may use, shared among the "
                        "processes on this machine)")
    parser.add_argument("--loader-threads", type=_positive_int, default=None,
                        help="threads per process that decode and preprocess the next batches (default: as --threads, "
                        "at most 4)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


# --- the model --------------------------------------------------------------------------------------------------
def default_model() -> str:
    """$CAPTION_MODEL, else ./checkpoints/shapes/best when it holds a checkpoint; UsageError otherwise."""
    if os.environ.get("CAPTION_MODEL"):
        return os.environ["CAPTION_MODEL"]
    if (LOCAL_CHECKPOINT / "config.json").is_file():
        return str(LOCAL_CHECKPOINT)
    raise UsageError(f"no model given: pass --model USER/REPO (a Hub model id) or a checkpoint folder, or set "
                     f"CAPTION_MODEL (there is no ./{LOCAL_CHECKPOINT} here either)")


def load_captioner(model: str, precision: str, device: torch.device = torch.device("cpu")):
    """The captioner in eval mode on `device`: on a CPU in its fast mode (int8) unless fp32 is asked for, on a GPU
    in fp32 (the captioning casts to bf16); UsageError saying why it could not be loaded."""
    from .captioner import ImageCaptioner

    if device.type != "cpu" and precision not in ("auto", "fp32"):
        raise UsageError(f"--precision {precision} is a CPU mode; on {device} use auto (bf16 autocast) or fp32, or "
                         "--device cpu")
    path = Path(model).expanduser()
    if model.startswith((".", "/", "~")) and not path.is_dir():
        raise UsageError(f"expected --model to be a checkpoint folder or a Hub model id, but folder {model!r} "
                         "does not exist")
    try:
        captioner = ImageCaptioner.from_pretrained(str(path) if path.is_dir() else model)
    except Exception as error:  # Hub, IO and key errors all mean "cannot use this model"
        raise UsageError(f"could not load model {model!r}: {type(error).__name__}: {error} (expected a checkpoint "
                         "folder written by save_pretrained or a Hub model repo id)") from error
    if device.type != "cpu":
        return captioner.eval().to(device)
    return captioner.eval().quantize_int8(mode="auto" if precision == "int8" else precision)


# --- the plan: process 0 decides, every process follows -----------------------------------------------------------
@dataclass
class Plan:
    batches: list[list[str]]  # every batch still to caption, cut at fixed places of the listing
    already: int  # files of the listing already in the output
    parts: str  # the folder of the part files


@dataclass
class Listing:
    """What process 0 keeps for the final merge."""

    files: list[str]
    output: Output


def make_plan(args: argparse.Namespace, keep: Callable[[Listing], None]) -> Plan:
    """Process 0: list the files, fold the part files an interrupted run left into the output (whatever number of
    processes wrote them), and cut what is not in it into batches; keep(Listing) for the final merge."""
    files = find_images(args.paths, exclude=args.heatmaps)
    output = open_output(args.out, args.format)
    output.check_files(files)
    keep(Listing(files, output))
    merged = merge_parts(output, files, report=lambda line: print(line, file=sys.stderr))
    if merged.added:
        print(f"caption-images: {merged.added} rows left in part files by an interrupted run are now in "
              f"{output.path}", file=sys.stderr)
    batches = cut_batches(files, merged.keys, args.batch_size)
    return Plan(batches, len(files) - sum(len(batch) for batch in batches), str(parts_folder(output.path)))


def finish(listing: Listing, results: list[tuple[ShareResult, str]]) -> None:
    """Process 0, once every process is done: merge the part files into the output."""
    missing = [part for result, part in results if result.captioned and not Path(part).is_file()]
    if missing:
        raise UsageError(f"process 0 cannot see the part files {', '.join(missing)} that other processes wrote: "
                         "--out must be on a file system every machine shares (the parts stay where they are; a "
                         "run with --out there continues)")
    merge_parts(listing.output, listing.files, report=lambda line: print(line, file=sys.stderr))


# --- running ----------------------------------------------------------------------------------------------------
def threads_per_process(processes: Processes) -> int:
    """The CPUs this process may use, shared among the processes of its machine."""
    return max(1, available_cpus() // processes.local_count)


@contextlib.contextmanager
def progress(processes: Processes, total: int) -> Iterator[tuple[Callable[[str], None], Callable[[int], None]]]:
    """(report(line), advance(n)): a progress bar of this process's share on process 0 only; report prints above
    it (every process names its own skipped files)."""
    from tqdm.auto import tqdm

    description = "captioning" if processes.count == 1 else f"captioning (process 0 of {processes.count})"
    disable = None if processes.is_main else True  # None: shown when stderr is a terminal
    with tqdm(total=total, unit="image", desc=description, file=sys.stderr, disable=disable) as bar:
        yield (lambda line: tqdm.write(line, file=sys.stderr)), bar.update


def summary(captioned: int, skipped: list[str], already: int, out: Path, seconds: float | None = None,
            processes: int = 1, waited: float = 0.0) -> str:
    """The last line(s) of a run; `waited`: the seconds the slowest-fed process waited for its images."""
    line = f"caption-images: {captioned} captioned, {len(skipped)} skipped, {already} already in {out}"
    if seconds:
        line += (f" ({captioned / seconds:.2f} images/s over {seconds:.1f} s, {processes} "
                 f"process{'es' if processes > 1 else ''}, at most {waited:.1f} s waiting for images)")
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
        if error.echo:
            print(f"caption-images: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    if args.beams > 16:
        raise UsageError(f"--beams must be between 1 and 16, got {args.beams}")
    try:
        check_repetition_control(args.no_repeat_ngram_size, args.repetition_penalty)
    except ValueError as error:
        raise UsageError(str(error)) from error
    processes = start_processes(args.device)
    try:
        return _caption(args, processes)
    finally:
        processes.close()


def _caption(args: argparse.Namespace, processes: Processes) -> int:
    """Plan (process 0), caption this process's share, merge (process 0)."""
    args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE.get(processes.device.type, 8)
    kept: list[Listing] = []  # process 0's listing and output, for the final merge
    plan = processes.share(lambda: make_plan(args, kept.append))
    if not plan.batches:
        if processes.is_main:
            print(summary(0, [], plan.already, kept[0].output.path), file=sys.stderr)
        return EXIT_OK

    args.model = args.model or default_model()
    with processes.main_first():  # a Hub model is downloaded once per machine
        captioner = load_captioner(args.model, args.precision, processes.device)
    if args.max_length > captioner.config.max_position_embeddings - 1:
        raise UsageError(f"--max-length must be at most {captioner.config.max_position_embeddings - 1} for "
                         f"this model, got {args.max_length}")
    from .cpu.threads import set_inference_threads

    threads = set_inference_threads(args.threads or threads_per_process(processes))
    if args.heatmaps:
        os.makedirs(args.heatmaps, exist_ok=True)
    run = Captioning(captioner, Decoding(args.beams, args.max_length, args.no_repeat_ngram_size,
                                         args.repetition_penalty), args.model, args.heatmaps,
                     autocast=processes.device.type == "cuda" and args.precision == "auto")
    mine = deal(plan.batches, processes.index, processes.count)
    part = PartFile(part_path(Path(plan.parts), processes.index, processes.count))

    processes.wait()  # every process has its model: the clock starts together
    start = time.perf_counter()
    try:
        with progress(processes, sum(len(batch) for batch in mine)) as (report, advance):
            result = caption_share(run, mine, part, args.loader_threads or min(threads, 4), report, advance)
    except KeyboardInterrupt:
        part.close()
        return _interrupted(processes, kept, plan)
    finally:
        part.close()
    results = processes.gather((result, str(part.path)))
    seconds = time.perf_counter() - start
    skipped = [file for share, _ in results for file in share.skipped]
    if processes.is_main:
        finish(kept[0], results)
        captioned = sum(share.captioned for share, _ in results)
        waited = max(share.waited for share, _ in results)
        print(summary(captioned, skipped, plan.already, kept[0].output.path, seconds, processes.count, waited),
              file=sys.stderr)
    return EXIT_SKIPPED if skipped and processes.count == 1 else EXIT_OK


def _interrupted(processes: Processes, kept: list[Listing], plan: Plan) -> int:
    """Ctrl-C: one process merges what it wrote; with several, the parts wait for the next run."""
    if processes.count == 1:
        finish(kept[0], [])
        print(f"caption-images: interrupted; the rows written so far are in {kept[0].output.path}: run the same "
              "command again to continue", file=sys.stderr)
    elif processes.is_main:
        print(f"caption-images: interrupted; the rows written so far are in {plan.parts}: run the same command "
              "again (with any number of processes) to merge them and continue", file=sys.stderr)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

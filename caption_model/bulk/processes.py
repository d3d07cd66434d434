"""One process, or several started by `accelerate launch` (processes, GPUs, machines): which process this is, its
device, and the collective steps caption-images needs (process 0's plan to all, everyone's counts to process 0,
waiting). The one module that touches accelerate; without accelerate installed (the inference install) a plain
run is one process on its own.

    accelerate launch --multi_gpu --num_processes 8 -m caption_model.cli photos/ --out captions.jsonl

`accelerate launch --cpu --num_processes N` starts several CPU processes only through MPI (`--mpirun_hostfile`);
without it, it starts one. `--multi_gpu --num_processes N` (torchrun underneath) starts N processes on any machine:
each uses a GPU, or the CPU where there is none or caption-images is given --device cpu.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch

from . import UsageError

T = TypeVar("T")

# The last collective step waits for the slowest process, which may finish hours after the fastest on a long run;
# a process that crashes is stopped by the launcher, not by this timeout.
COLLECTIVE_TIMEOUT = timedelta(hours=24)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Processes:
    index: int  # this process's rank, 0 .. count - 1
    count: int  # processes in the run, over all machines
    local_count: int  # processes on this machine (they share its CPUs)
    device: torch.device
    state: Any = None  # accelerate's PartialState; None for a process on its own

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def share(self, make: Callable[[], T]) -> T:
        """Process 0 runs make() and every process gets its result. A UsageError raised there is raised in every
        process (printed by process 0 only), so all stop with one message."""
        if self.count == 1:
            return make()
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [None]
        if self.is_main:
            try:
                box = [("result", make())]
            except UsageError as error:
                box = [("error", str(error))]
        broadcast_object_list(box, from_process=0)
        kind, value = box[0]
        if kind == "error":
            raise UsageError(value, echo=self.is_main)
        return value

    def gather(self, value: T) -> list[T]:
        """Every process's `value`, in process order (on every process)."""
        if self.count == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def wait(self) -> None:
        """Wait until every process gets here."""
        if self.count > 1:
            self.state.wait_for_everyone()

    def close(self) -> None:
        """Leave the run: shut this process's side of the process group down (its connections and threads). A
        process that exits with them open may abort on the way out ("terminate called without an active
        exception", SIGABRT), failing a run whose work is done. Local: it waits for no other process."""
        if self.count > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Process 0 of each machine runs the block first (a Hub download lands in the cache once), then the
        others."""
        if self.count == 1:
            yield
            return
        with self.state.local_main_process_first():
            yield


def start_processes(device: str = "auto") -> Processes:
    """This process's place in the run. device: "auto" (a GPU when torch sees one, else the CPU), "cpu" or
    "cuda"; `accelerate launch --cpu` also means the CPU. UsageError for a device the machine lacks."""
    if device not in DEVICES:
        raise UsageError(f"expected --device to be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu or auto")
    cpu = device == "cpu" or not torch.cuda.is_available() or _env_flag("ACCELERATE_USE_CPU")
    try:
        from accelerate import PartialState
    except ImportError:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("this process is one of several (WORLD_SIZE is set), which needs accelerate: "
                             "pip install accelerate") from None
        return Processes(0, 1, 1, torch.device("cpu" if cpu else "cuda"))
    _warn_if_one_cpu_process_was_meant_to_be_many()
    state = PartialState(cpu=cpu, timeout=COLLECTIVE_TIMEOUT)
    if state.num_processes == 1 and (state.device.type == "cpu") != cpu:
        # accelerate keeps one state per process: a process on its own that set it up for another device before
        # (tests, the app) starts over, as training does (caption_model.training.loop)
        PartialState._reset_state()
        state = PartialState(cpu=cpu, timeout=COLLECTIVE_TIMEOUT)
    local_count = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if state.num_processes > 1 else 1
    return Processes(state.process_index, state.num_processes, local_count, state.device, state)


def _warn_if_one_cpu_process_was_meant_to_be_many() -> None:
    """`accelerate launch --cpu --num_processes N` without MPI starts one process: say so rather than let a user
    wait N times longer than expected. The launcher sets MASTER_ADDR only when N > 1."""
    launched_on_cpu = _env_flag("ACCELERATE_USE_CPU") and "MASTER_ADDR" in os.environ
    several = any(name in os.environ for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if launched_on_cpu and not several:
        print("caption-images: warning: `accelerate launch --cpu --num_processes N` started one process (accelerate "
              "starts several CPU processes only through MPI, --mpirun_hostfile); for N processes use `accelerate "
              "launch --multi_gpu --num_processes N` (on a GPU machine add --device cpu to caption-images)",
              file=sys.stderr)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")

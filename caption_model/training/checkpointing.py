"""Atomic checkpoint folders and resumable training state, in safetensors + JSON only (no pickle).

A checkpoint folder is written next to its final place and swapped in with renames, so a kill at any moment
leaves either the old complete folder or the new complete one (`recover_checkpoint` finishes an interrupted swap).
Folders and files get the usual modes (0777 / 0666 minus the umask), like any folder the user creates.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from caption_model.config import TRAINING_CONFIG_FILE

TRAINING_STATE_WEIGHTS = "training_state.safetensors"
TRAINING_STATE_JSON = "training_state.json"


def to_json(payload: Any, indent: int | None = 2) -> str:
    """Strict JSON text: non-finite floats (a NaN metric, -inf) become null, since NaN and Infinity are not JSON."""
    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value
    return json.dumps(finite(payload), indent=indent, allow_nan=False)


def recover_checkpoint(final: Path) -> None:
    """If a swap was interrupted (`final` gone, `final.old` present), put the old folder back."""
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.exists():
        os.replace(old, final)
    elif final.exists() and old.exists():
        shutil.rmtree(old, ignore_errors=True)


def write_folder_atomically(final: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_dir)` then swap the temp folder into `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(final)
    # mkdir honours the umask (tempfile.mkdtemp would make the published folder 0700); the random name is unique.
    temp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}")
    temp.mkdir()
    try:
        write(temp)
        old = final.with_name(final.name + ".old")
        if final.exists():
            os.replace(final, old)
        os.replace(temp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


def save_checkpoint(folder: str | os.PathLike, model, training_config: dict, extra: dict | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    state: dict | None = None) -> Path:
    """Atomically write a Hub-format folder (`model.save_pretrained`) + training_config.json + `extra` JSON files
    ({file name: payload}); with an optimizer, also the training state that makes the folder resumable."""
    def write(temp: Path) -> None:
        model.save_pretrained(temp)
        (temp / TRAINING_CONFIG_FILE).write_text(to_json(training_config))
        for name, payload in (extra or {}).items():
            (temp / name).write_text(to_json(payload))
        if optimizer is not None:
            save_training_state(temp, optimizer, scheduler, state or {})
    return write_folder_atomically(folder, write)


def save_training_state(folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict) -> None:
    """Optimizer tensors -> training_state.safetensors; step, scheduler and the rest -> training_state.json."""
    optimizer_state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in optimizer_state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(folder / TRAINING_STATE_WEIGHTS))
    payload = {
        **state,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
    }
    (folder / TRAINING_STATE_JSON).write_text(to_json(payload))


def load_training_state(folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict:
    """Restore what save_training_state wrote; returns the extra `state` dict (step, epoch, best score...)."""
    weights, info = folder / TRAINING_STATE_WEIGHTS, folder / TRAINING_STATE_JSON
    for path in (weights, info):
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume from {folder}: {path.name} is missing")
    tensors = load_file(str(weights))
    payload = json.loads(info.read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    for param_id, values in payload.pop("optimizer_scalars").items():
        state.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": payload.pop("optimizer_param_groups")})
    scheduler.load_state_dict(payload.pop("scheduler"))
    torch.set_rng_state(tensors["rng.torch"])
    return payload

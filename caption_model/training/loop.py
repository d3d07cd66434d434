"""The training loop under Accelerate (CPU, one GPU or several): setup, one epoch, validation + checkpoints, finish.

A run writes into `cfg.output_dir`: last/ (resumable: weights + optimizer, scheduler, RNG and loop position),
best/ (the best validation score so far), log.jsonl, and at the end metrics.json and the plots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caption_model import ImageCaptioner
from caption_model.config import METRICS_FILE, SAMPLES_FILE, WEIGHTS_FILE
from caption_model.training.calibration import calibrate_random_encoder
from caption_model.training.checkpointing import (load_training_state, recover_checkpoint, save_checkpoint,
                                                  to_json)
from caption_model.training.collate import CaptionCollator, collator_for
from caption_model.training.config import MIXED_PRECISIONS, TrainConfig, model_config, schedule
from caption_model.training.data import describe_data, load_training_data
from caption_model.training.evaluation import evaluate, selection_metric
from caption_model.training.feature_cache import FeatureCache
from caption_model.training.heatmap_offsets import offsets_on_split
from caption_model.training.plots import plot_loss_curve, plot_samples

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"  # one JSON record per logged step, cache count and validation
LOSS_CURVE_FILE = "loss_curve.png"
VALIDATION_METRICS_FILE = "validation_metrics.json"  # inside best/: the validation scores that chose it
ESTIMATE_AFTER_STEPS = 20  # steps timed before the run says how long the rest will take (fewer on short runs)


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg: TrainConfig, train_captions: list[str]) -> ImageCaptioner:
    """A new model: pretrained backbones where the config names them, else random + a WordPiece vocabulary."""
    tokenizer = None
    if cfg.decoder is None and cfg.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    elif cfg.decoder is None:
        from caption_model.training.tokenization import train_wordpiece_tokenizer

        tokenizer = train_wordpiece_tokenizer(train_captions, vocab_size=cfg.tokenizer_vocab_size)
    return ImageCaptioner.from_backbones(model_config(cfg), decoder=cfg.decoder,
                                         encoder_weights=cfg.encoder_weights, tokenizer=tokenizer)


def parameter_groups(model: ImageCaptioner, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: new layers (lr), pretrained BERT (lr_decoder), unfrozen ResNet stages (lr_encoder).
    Biases and norms get no weight decay."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    pretrained_decoder = cfg.decoder is not None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("encoder."):
            kind = "encoder"
        elif name.startswith("decoder.bert.") and pretrained_decoder and "crossattention" not in name:
            kind = "decoder"
        else:
            kind = "new"
        no_decay = param.ndim < 2 or "norm" in name.lower()
        groups.setdefault((kind, no_decay), []).append(param)
    lrs = {"new": cfg.lr, "decoder": cfg.lr_decoder, "encoder": cfg.lr_encoder}
    return [{"params": params, "lr": lrs[kind], "weight_decay": 0.0 if no_decay else cfg.weight_decay,
             "name": f"{kind}{'-no-decay' if no_decay else ''}"}
            for (kind, no_decay), params in sorted(groups.items())]


# ------------------------------------------------------------------------------------------------ setup
@dataclass
class Run:
    """What a training run carries from phase to phase."""

    cfg: TrainConfig
    output: Path
    accelerator: Any  # accelerate.Accelerator
    data: Any  # datasets.DatasetDict, images undecoded
    model: Any  # the model as Accelerate prepared it (DDP-wrapped on several GPUs)
    raw_model: ImageCaptioner  # the same model unwrapped: save, evaluate
    optimizer: torch.optim.Optimizer
    scheduler: Any
    collate: CaptionCollator
    cache: FeatureCache | None
    total_steps: int
    data_info: dict  # source_kind, num_train_images, split: recorded in training_config.json and metrics.json
    # Saved in last/ for --resume: optimizer steps done, epoch and batches done in it, best validation score and its
    # epoch, validations since it (early stopping) and whether the run stopped early.
    state: dict = field(default_factory=lambda: {"step": 0, "epoch": 0, "batches_done": 0, "best_name": None,
                                                 "best_score": None, "best_epoch": None, "since_best": 0,
                                                 "stopped_early": False})
    started: float = field(default_factory=time.perf_counter)
    images_seen: int = 0

    @property
    def last(self) -> Path:
        return self.output / "last"

    def log(self, record: dict) -> None:
        """Append to log.jsonl (main process) and send the numbers to the trackers."""
        if self.accelerator.is_main_process:
            with open(self.output / LOG_FILE, "a") as file:
                file.write(to_json(record, indent=None) + "\n")
        if self.accelerator.trackers:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.accelerator.log(numbers, step=record.get("step"))

    def save(self, name: str, model: ImageCaptioner | None = None, **kwargs) -> None:
        """Write checkpoint folder `name` of `model` (default: the model training)."""
        training_config = {**dataclasses.asdict(self.cfg), **self.data_info}
        save_checkpoint(self.output / name, model or self.raw_model, training_config, **kwargs)

    def save_last(self) -> None:
        if self.accelerator.is_main_process:
            self.save("last", optimizer=self.optimizer, scheduler=self.scheduler, state=self.state)


def resolve_mixed_precision(precision: str, device: str) -> str:
    """TrainConfig.mixed_precision -> what Accelerate gets: "auto" is bf16 on a CUDA GPU that has it and on a CPU
    with bf16 in hardware (AMX or AVX512-BF16: the shapes preset trains ~1.4x faster on a Zen 4), else "no"."""
    if precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device == "cpu":
        from caption_model.cpu.features import has_native_bf16, usable_flags

        return "bf16" if has_native_bf16(usable_flags()) else "no"
    return "no"  # mps: fp32


def _accelerator(cfg: TrainConfig, output: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import set_seed

    if cfg.device not in (None, "cuda", "mps", "cpu"):
        raise ValueError(f"expected device cuda, mps, cpu or None, got {cfg.device!r}")
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # Accelerate keeps one global state per process; a later run in the same process (tests, benchmarks, the
        # app's first run) may want another precision or device.
        AcceleratorState._reset_state(reset_partial_state=True)
    trackers = [cfg.report_to] if cfg.report_to else None
    device = cfg.device or ("cuda" if torch.cuda.is_available() else
                            "mps" if torch.backends.mps.is_available() else "cpu")  # Accelerate's choice
    precision = resolve_mixed_precision(cfg.mixed_precision, device)
    accelerator = Accelerator(mixed_precision=precision, log_with=trackers, project_dir=str(output),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps, cpu=cfg.device == "cpu")
    if cfg.device and accelerator.device.type != cfg.device:
        raise ValueError(f"--device {cfg.device}: expected that device to be available, Accelerate found "
                         f"{accelerator.device}")
    set_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if trackers:
        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in dataclasses.asdict(cfg).items()}
        accelerator.init_trackers("captioner", config=flat)
    return accelerator


def _optimizer(cfg: TrainConfig, model: ImageCaptioner, train_images: int, processes: int):
    """AdamW + warm-up/cosine schedule; returns (optimizer, scheduler, total optimizer steps)."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(parameter_groups(model, cfg))
    steps = schedule(cfg, train_images, processes)
    # Accelerate steps a prepared scheduler once per process per optimizer step: count in those units.
    scheduler = get_cosine_schedule_with_warmup(optimizer, steps["warmup_steps"] * processes,
                                                steps["total_steps"] * processes)
    return optimizer, scheduler, steps["total_steps"]


def setup(cfg: TrainConfig, resume: bool = False) -> Run:
    """Accelerator, data, model (new, or last/ with `resume`), feature cache, collator, optimizer and schedule."""
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    accelerator = _accelerator(cfg, output)
    data, report = load_training_data(cfg, return_report=True)
    last = output / "last"
    recover_checkpoint(last)
    recover_checkpoint(output / "best")
    if resume and not (last / WEIGHTS_FILE).is_file():
        raise SystemExit(f"--resume: no checkpoint to resume from at {last} (run without --resume first)")
    if resume:
        model = ImageCaptioner.from_pretrained(str(last))
    else:
        model = build_model(cfg, [c for caps in data["train"]["captions"] for c in caps])
    model.to(accelerator.device)
    if not resume:
        calibrate_random_encoder(model, data["train"], cfg)
    cache = None
    if cfg.feature_cache and model.encoder.num_frozen_stages > 0:
        cache = FeatureCache(cfg.cache_dir or output / "feature_cache", model)
        if cfg.num_workers and accelerator.device.type != "cpu":
            logger.warning("num_workers=%d ignored: the feature cache runs the encoder on %s inside the collator, "
                           "which DataLoader worker processes cannot do", cfg.num_workers, accelerator.device)
    collate = collator_for(model, cache, max_length=cfg.max_caption_words + 2, seed=cfg.seed,
                           all_captions=cfg.all_captions)
    optimizer, scheduler, total_steps = _optimizer(cfg, model, len(data["train"]), accelerator.num_processes)
    prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    run = Run(cfg, output, accelerator, data, prepared, accelerator.unwrap_model(prepared), optimizer, scheduler,
              collate, cache, total_steps, describe_data(cfg, data, report))
    if resume:
        run.state.update(load_training_state(last, optimizer, scheduler))
        logger.info("resuming from %s at step %d (epoch %d)", last, run.state["step"], run.state["epoch"])
    elif (output / LOG_FILE).exists():
        (output / LOG_FILE).unlink()
    return run


# ------------------------------------------------------------------------------------------------ one epoch
def _epoch_loader(run: Run, epoch: int, skip: int):
    """The same shuffled order for an epoch whatever happened before, so --resume can skip batches."""
    train = run.data["train"]
    order = np.random.default_rng([run.cfg.seed, epoch]).permutation(len(train))
    run.collate.set_epoch(epoch)
    device = run.accelerator.device.type
    workers = 0 if run.cache is not None and device != "cpu" else run.cfg.num_workers  # see setup
    loader = torch.utils.data.DataLoader(train.select(order), batch_size=run.cfg.batch_size, shuffle=False,
                                         collate_fn=run.collate, num_workers=workers, pin_memory=device == "cuda")
    loader = run.accelerator.prepare_data_loader(loader)
    return run.accelerator.skip_first_batches(loader, skip) if skip else loader


def _training_step(run: Run, batch: dict):
    """Forward, backward and (when gradients are due) clip + optimizer step; returns the model output."""
    accelerator, model = run.accelerator, run.model
    with accelerator.accumulate(model):
        out = model(**batch, context_loss_weight=run.cfg.context_loss_weight)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"non-finite loss {out.loss.item()} at step {run.state['step']} "
                f"(terms: { {k: v.item() for k, v in out.losses.items()} }); lower --lr or use "
                f"--mixed-precision no; the last good checkpoint is {run.last}")
        accelerator.backward(out.loss)
        if accelerator.sync_gradients and run.cfg.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), run.cfg.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
    return out


def _say_how_long(progress) -> None:
    """One line, once, after the first steps of this process: the time the remaining steps will take at their pace."""
    info = progress.format_dict  # n, initial, total, elapsed (s)
    per_step = info["elapsed"] / max(info["n"] - info["initial"], 1)
    left = per_step * (info["total"] - info["n"])
    when = f"about {left / 60:.0f} min" if left >= 90 else f"about {left:.0f} s"
    progress.write(f"train: {when} to go at this machine's pace so far ({info['total'] - info['n']} steps of "
                   f"{per_step:.2f} s), plus a validation pass after each epoch", file=sys.stderr)


def _after_step(run: Run, out, epoch: int, progress) -> None:
    """Progress bar (and once, how long the rest will take), log record every `log_every_steps`, last/ every
    `save_every_steps`."""
    step, cfg = run.state["step"], run.cfg
    rate = run.images_seen / max(time.perf_counter() - run.started, 1e-9)
    progress.update(1)
    progress.set_postfix(loss=f"{out.loss.item():.3f}", img_s=f"{rate:.1f}", epoch=epoch)
    if not progress.disable and progress.n - progress.initial == min(ESTIMATE_AFTER_STEPS,
                                                                     max(1, run.total_steps // 10)):
        _say_how_long(progress)
    if step % cfg.log_every_steps == 0 or step == 1:
        run.log({"step": step, "epoch": epoch, "loss": out.loss.item(),
                 **{f"loss_{k}": v.item() for k, v in out.losses.items()},
                 "lr": run.scheduler.get_last_lr()[0], "images_per_s": rate})
    if cfg.save_every_steps and step % cfg.save_every_steps == 0:
        run.save_last()


def train_epoch(run: Run, progress) -> None:
    """Train from the saved position to the end of the epoch, or until the last step."""
    state = run.state
    epoch, skipped = state["epoch"], state["batches_done"]
    run.model.train()
    for batch_index, batch in enumerate(_epoch_loader(run, epoch, skipped), start=skipped):
        out = _training_step(run, batch)
        state["batches_done"] = batch_index + 1
        run.images_seen += batch[run.collate.image_input].shape[0]
        if not run.accelerator.sync_gradients:
            continue  # accumulating gradients: no optimizer step yet
        state["step"] += 1
        _after_step(run, out, epoch, progress)
        if state["step"] >= run.total_steps:
            return
    state["epoch"], state["batches_done"] = epoch + 1, 0  # the epoch ran to its end


# ------------------------------------------------------------------------------------------------ validation
def validate(run: Run, epoch: int) -> None:
    """Score the model on validation; a better score than any before replaces best/, any other counts towards
    early stopping."""
    state = run.state
    metrics = evaluate(run.raw_model, run.data["validation"], run.cfg, desc=f"validation (epoch {epoch})")
    name, score = selection_metric(metrics)
    run.log({"step": state["step"], "epoch": epoch, **{f"val_{k}": v for k, v in metrics.items()}})
    logger.info("epoch %d validation: %s", epoch, _fmt(metrics))
    best = state["best_score"]
    if best is None or score > best:
        state.update(best_name=name, best_score=score, best_epoch=epoch, since_best=0)
        run.save("best", extra={VALIDATION_METRICS_FILE: metrics})
    else:
        state["since_best"] += 1


def _patience_spent(run: Run) -> bool:
    """Whether the main process's validations ran out of patience; every process gets the same answer (only the
    main process validates, and all must leave the loop together)."""
    spent = run.state["since_best"] >= run.cfg.early_stopping_patience if run.accelerator.is_main_process else False
    flag = torch.tensor([float(spent)], device=run.accelerator.device)
    return bool(run.accelerator.reduce(flag, reduction="sum").item() > 0)


def end_epoch(run: Run, epoch: int) -> None:
    """After an epoch (or the last step): cache counts, validation when due, early stopping, last/."""
    state, cfg = run.state, run.cfg
    if run.cache is not None:
        run.log({"step": state["step"], "epoch": epoch, "cache_hits": run.cache.hits,
                 "cache_misses": run.cache.misses})
    epoch_done = state["batches_done"] == 0
    due = (epoch_done and (epoch + 1) % cfg.eval_every_epochs == 0) or state["step"] >= run.total_steps
    if run.accelerator.is_main_process and due:
        validate(run, epoch)
    last_step = state["step"] >= run.total_steps  # the run ends here anyway: not an early stop
    if due and cfg.early_stopping_patience > 0 and not last_step and _patience_spent(run):
        state["stopped_early"] = True
        if run.accelerator.is_main_process:
            logger.info("early stopping after epoch %d: %d validations without a better %s than %.4f (epoch %d)",
                        epoch, state["since_best"], state["best_name"], state["best_score"], state["best_epoch"])
            run.log({"step": state["step"], "epoch": epoch, "stopped_early": True, "best_epoch": state["best_epoch"]})
    run.save_last()


# ------------------------------------------------------------------------------------------------ finish
def machine_record(run: Run, seconds: float) -> dict:
    """Where and how long this process trained (data, model, cache, steps, validation; not the final evaluation),
    and where it stopped (epochs done, the best validation's epoch, early stopping)."""
    from caption_model.cpu.features import describe_cpu

    device = run.accelerator.device
    record = {"train_seconds": round(seconds, 1), "steps": run.state["step"], "epochs_done": run.state["epoch"],
              "best_epoch": run.state["best_epoch"], "stopped_early": run.state["stopped_early"],
              "device": device.type, "cpu": describe_cpu(), "threads": torch.get_num_threads(),
              "processes": run.accelerator.num_processes, "mixed_precision": str(run.accelerator.mixed_precision)}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def finish(run: Run, seconds: float) -> dict:
    """Evaluate best/ on validation and test -> metrics.json (also in best/); the loss curve and sample heatmaps.
    `seconds`: how long the run took up to here, recorded with the machine under "run"."""
    output, cfg, data = run.output, run.cfg, run.data
    machine = machine_record(run, seconds)
    logger.info("trained %d steps in %.0f s on %s (%s, %d threads, mixed precision %s)", machine["steps"], seconds,
                machine.get("gpu", machine["cpu"]), machine["device"], machine["threads"], machine["mixed_precision"])
    best = ImageCaptioner.from_pretrained(str(output / "best")).to(run.accelerator.device)
    if cfg.heatmap_offset_images:  # measured on best/ (no boxes), then best/ is rewritten with them in its config
        began = time.perf_counter()
        best.config.heatmap_offsets = offsets_on_split(best, data["validation"], cfg.heatmap_offset_images)
        validation = json.loads((output / "best" / VALIDATION_METRICS_FILE).read_text())
        run.save("best", model=best, extra={VALIDATION_METRICS_FILE: validation})
        machine["heatmap_offsets_seconds"] = round(time.perf_counter() - began, 1)
    metrics = {"validation": evaluate(best, data["validation"], cfg, desc="validation"),
               "test": evaluate(best, data["test"], cfg, desc="test"),
               "eval": {"num_beams": cfg.eval_beams, "max_length": cfg.eval_max_length,
                        "max_eval_images": cfg.max_eval_images, "source": cfg.source, **run.data_info},
               "run": machine}
    (output / METRICS_FILE).write_text(to_json(metrics))
    plot_loss_curve(output / LOG_FILE, output / LOSS_CURVE_FILE)
    plot_samples(best, data["test"], output / SAMPLES_FILE)
    for name in (METRICS_FILE, SAMPLES_FILE):  # copies inside best/ that push_to_hub publishes with the weights
        shutil.copy(output / name, output / "best" / name)
    logger.info("test: %s", _fmt(metrics["test"]))
    print(to_json({"output_dir": str(output), "test": metrics["test"]}, indent=None))
    return metrics


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


# ------------------------------------------------------------------------------------------------ entry points
def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run training (from last/ with `resume`); returns the output folder (best/, last/, metrics.json, plots)."""
    from tqdm.auto import tqdm

    began = time.perf_counter()
    run = setup(cfg, resume)
    progress = tqdm(total=run.total_steps, initial=run.state["step"], desc="train", unit="step",
                    disable=not run.accelerator.is_local_main_process)
    while run.state["step"] < run.total_steps and not run.state["stopped_early"]:
        epoch = run.state["epoch"]
        train_epoch(run, progress)
        end_epoch(run, epoch)
    progress.close()
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        finish(run, time.perf_counter() - began)
    run.accelerator.end_training()
    return run.output


"""train.py / caption_model.training end to end on a tiny shapes config: checkpoints, resume, cache, outputs."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import numpy as np

import train
from conftest import build_tiny_captioner, shapes_images
from caption_model import ImageCaptioner
from caption_model.hub.card import build_model_card
from caption_model.training import loop
from caption_model.training.calibration import calibrate_frozen_batchnorm
from caption_model.training.checkpointing import load_training_state, to_json, write_folder_atomically
from caption_model.training.data import load_training_data
from caption_model.training.feature_cache import decode_image
from caption_model.training import heatmap_offsets
from caption_model.training.heatmap_offsets import measure_heatmap_offsets
from caption_model.training.shapes import generate_shapes_example

TINY = [
    "--preset", "shapes", "--shapes-sizes", "24,6,6", "--image-size", "64", "--encoder-stage", "layer2",
    "--encoder-trainable", "layer2", "--hidden-size", "32", "--num-hidden-layers", "1", "--num-attention-heads", "2",
    "--intermediate-size", "64", "--attention-dim", "32", "--tokenizer-vocab-size", "120", "--batch-size", "8",
    "--eval-max-length", "8", "--max-eval-images", "6", "--log-every-steps", "1",
    "--mixed-precision", "no",  # the preset's "auto" would train in bf16 on some CPUs only: same numbers everywhere
]


def run(tmp_path: Path, name: str, *extra: str) -> Path:
    output = tmp_path / name
    assert train.main(TINY + ["--output-dir", str(output), *extra]) == 0
    return output


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (Python's json accepts them; other JSON readers do not)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def read_log(output: Path) -> list[dict]:
    return [strict_json(line) for line in (output / "log.jsonl").read_text().splitlines()]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_training_writes_hub_checkpoints_metrics_and_plots(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger=heatmap_offsets.__name__)
    output = run(tmp_path, "run", "--epochs", "2")
    # after its first steps the run says how long the rest will take (6 steps: after the first)
    err = capsys.readouterr().err
    assert "train: about" in err and "to go at this machine's pace so far (5 steps of" in err, err
    for name in ("best", "last"):
        folder = output / name
        assert {"config.json", "model.safetensors", "tokenizer.json", "training_config.json"} <= {
            p.name for p in folder.iterdir()}
        assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in folder.iterdir())
    assert json.loads((output / "best" / "training_config.json").read_text())["image_size"] == 64
    metrics = strict_json((output / "metrics.json").read_text())
    assert {"object_f1", "pointing_accuracy"} <= set(metrics["test"]) and "validation" in metrics
    run_record = metrics["run"]  # where and how long it trained
    assert run_record["steps"] == 6 and run_record["device"] == "cpu" and run_record["train_seconds"] > 0
    assert run_record["cpu"] and run_record["threads"] >= 1 and run_record["mixed_precision"] == "no"
    assert stat.S_IMODE((output / "best").stat().st_mode) == 0o777 & ~current_umask()
    for plot in ("loss_curve.png", "samples.png"):
        assert (output / plot).stat().st_size > 1000
    model = ImageCaptioner.from_pretrained(str(output / "best"))
    assert model.grid_size == (8, 8)
    # the random encoder's frozen BatchNorms were calibrated on training images before the first step
    assert not torch.all(model.encoder.stem.bn1.running_var == 1)
    losses = [r["loss"] for r in read_log(output) if "loss" in r]
    assert len(losses) == 6  # 24 images / batch 8 = 3 steps per epoch, 2 epochs
    # best/ serves per-word map offsets measured on the validation images (the shapes preset's 200: all 6 here)
    assert run_record["heatmap_offsets_seconds"] > 0 and \
        "heatmap offsets (cells) measured on 6 validation images" in caplog.text
    stored = model.config.heatmap_offsets
    assert stored and all(len(pair) == 2 for pair in stored.values())
    model.config.heatmap_offsets = {}
    cfg, _ = train.parse_args(TINY + ["--output-dir", str(output)])
    validation = [decode_image(image) for image in load_training_data(cfg, "validation")["image"]]
    assert stored == measure_heatmap_offsets(model, validation)
    assert ImageCaptioner.from_pretrained(str(output / "last")).config.heatmap_offsets == {}  # measured for best/


def test_feature_cache_is_hit_on_second_epoch_and_rebuilt_when_encoder_changes(tmp_path):
    cache_dir = tmp_path / "cache"
    output = run(tmp_path, "a", "--epochs", "2", "--cache-dir", str(cache_dir))
    counts = [r for r in read_log(output) if "cache_hits" in r]
    assert [(r["cache_misses"], r["cache_hits"]) for r in counts] == [(24, 0), (24, 24)]
    assert len(list(cache_dir.iterdir())) == 1  # one encoder signature
    # Same encoder config again (same seed => same random frozen weights): every image is a hit at once.
    output = run(tmp_path, "b", "--epochs", "1", "--cache-dir", str(cache_dir))
    assert [(r["cache_misses"], r["cache_hits"]) for r in read_log(output) if "cache_hits" in r] == [(0, 24)]
    # A different input size changes what the frozen layers compute: a new, empty cache.
    output = run(tmp_path, "c", "--epochs", "1", "--cache-dir", str(cache_dir), "--image-size", "96")
    assert [(r["cache_misses"], r["cache_hits"]) for r in read_log(output) if "cache_hits" in r] == [(24, 0)]
    assert len(list(cache_dir.iterdir())) == 2


def test_kill_and_resume_continues_at_the_same_step_with_the_same_state(tmp_path, monkeypatch):
    straight = run(tmp_path, "straight", "--max-steps", "5", "--save-every-steps", "2")

    class Killed(Exception):
        pass

    real_save = loop.save_checkpoint

    def save_then_die(folder, *args, **kwargs):
        real_save(folder, *args, **kwargs)
        if Path(folder).name == "last" and kwargs.get("state", {}).get("step") == 2:
            raise Killed  # the process dies right after writing last/ at step 2 (mid-epoch: 3 steps per epoch)

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run(tmp_path, "killed", "--max-steps", "5", "--save-every-steps", "2")
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    killed = tmp_path / "killed"
    state = json.loads((killed / "last" / "training_state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_done"]) == (2, 0, 2)
    saved_optimizer = load_file(str(killed / "last" / "training_state.safetensors"))

    # Resuming restores exactly the optimizer state that was saved ...
    cfg, _ = train.parse_args(TINY + ["--output-dir", str(killed), "--max-steps", "5"])
    model = ImageCaptioner.from_pretrained(str(killed / "last"))
    optimizer = torch.optim.AdamW(loop.parameter_groups(model, cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    restored = load_training_state(killed / "last", optimizer, scheduler)
    assert restored["step"] == 2
    for param_id, param_state in optimizer.state_dict()["state"].items():
        for name, value in param_state.items():
            assert torch.equal(value, saved_optimizer[f"optimizer.{param_id}.{name}"])

    # ... and finishing the run lands on the same weights as the run that was never interrupted.
    run(tmp_path, "killed", "--max-steps", "5", "--save-every-steps", "2", "--resume")
    resumed_losses = {r["step"]: r["loss"] for r in read_log(killed) if "loss" in r}
    straight_losses = {r["step"]: r["loss"] for r in read_log(straight) if "loss" in r}
    assert list(resumed_losses) == [1, 2, 3, 4, 5]
    assert resumed_losses == pytest.approx(straight_losses, abs=1e-5)
    a = load_file(str(straight / "last" / "model.safetensors"))
    b = load_file(str(killed / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    # Equal up to float noise that Adam amplifies (oneDNN kernels, ~1e-4 here); a restarted optimizer moves every
    # weight by about the learning rate (1e-3) at once.
    worst = max(((a[k] - b[k]).abs() - 1e-3 * b[k].abs()).max().item() for k in a)
    assert worst <= 4e-4, f"resumed weights differ from the uninterrupted run by up to {worst:.2e}"


def test_resume_without_checkpoint_says_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint to resume from"):
        train.main(TINY + ["--output-dir", str(tmp_path / "none"), "--resume"])


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, capsys):
    assert train.main(TINY + ["--output-dir", str(tmp_path / "nan"), "--lr", "1e30", "--lr-encoder", "1e30",
                              "--lr-decoder", "1e30", "--max-grad-norm", "0", "--epochs", "3"]) == 2
    assert "non-finite loss" in capsys.readouterr().err


def test_bf16_mixed_precision_after_an_fp32_run_in_the_same_process(tmp_path):
    run(tmp_path, "fp32", "--max-steps", "1")
    output = run(tmp_path, "bf16", "--max-steps", "2", "--mixed-precision", "bf16")  # autocast on the CPU
    assert len([r for r in read_log(output) if "loss" in r]) == 2
    assert json.loads((output / "last" / "training_config.json").read_text())["mixed_precision"] == "bf16"
    assert strict_json((output / "metrics.json").read_text())["run"]["mixed_precision"] == "bf16"


def test_auto_mixed_precision_is_bf16_only_where_the_hardware_has_it(tmp_path, monkeypatch):
    from caption_model.cpu import features

    expected = "bf16" if features.has_native_bf16(features.usable_flags()) else "no"
    output = run(tmp_path, "auto", "--max-steps", "1", "--mixed-precision", "auto")
    assert strict_json((output / "metrics.json").read_text())["run"]["mixed_precision"] == expected
    assert json.loads((output / "last" / "training_config.json").read_text())["mixed_precision"] == "auto"
    assert train.parse_args(["--preset", "shapes"])[0].mixed_precision == "auto"
    for flags, precision in (({"avx2", "fma", "avx512_bf16"}, "bf16"), ({"avx2", "amx_bf16"}, "bf16"),
                             ({"avx2", "fma", "avx512f", "avx512_vnni"}, "no"), ({"asimd"}, "no")):
        monkeypatch.setattr(features, "usable_flags", lambda flags=flags: frozenset(flags))
        assert loop.resolve_mixed_precision("auto", "cpu") == precision
    for supported, precision in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert loop.resolve_mixed_precision("auto", "cuda") == precision
    assert loop.resolve_mixed_precision("auto", "mps") == "no"
    assert loop.resolve_mixed_precision("fp16", "cpu") == "fp16" and loop.resolve_mixed_precision("no", "cuda") == "no"
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        loop.resolve_mixed_precision("fp8", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_asking_for_a_missing_device_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--device cuda: expected that device to be available, Accelerate found cpu"):
        run(tmp_path, "cuda", "--device", "cuda")


def test_every_preset_field_can_be_overridden_from_the_command_line():
    cfg, _ = train.parse_args(["--preset", "flickr8k-small", "--epochs", "3", "--decoder", "none",
                               "--encoder-trainable", "layer4", "--feature-cache", "false", "--lr", "0.01"])
    assert (cfg.epochs, cfg.decoder, cfg.encoder_trainable, cfg.feature_cache, cfg.lr) == (3, None, ["layer4"],
                                                                                           False, 0.01)
    assert cfg.source == "jxie/flickr8k" and cfg.batch_size == 32  # the rest comes from the preset


# ------------------------------------------------------------------------------------ the Flickr8k recipe


def test_flickr8k_presets_train_on_all_captions_and_stop_early_on_validation_cider(capsys):
    for preset in ("flickr8k", "flickr8k-small"):
        cfg, _ = train.parse_args(["--preset", preset])
        assert cfg.all_captions and (cfg.epochs, cfg.batch_size, cfg.early_stopping_patience) == (15, 32, 3)
        # served maps: the phrase reading (benchmarks/photo_grounding.py), no per-word offsets
        assert (cfg.heatmap_reading, cfg.heatmap_offset_images) == ("phrase", 0)
        assert train.main(["--preset", preset, "--print-config"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["config"]["all_captions"] is True and printed["config"]["early_stopping_patience"] == 3
        # 6000 Flickr8k training images: 188 steps of 32 images (160 captions); warm-up counted in those steps
        assert printed["schedule"] == {"train_images": 6000, "captions_per_step": 160, "steps_per_epoch": 188,
                                       "total_steps": 2820, "warmup_steps": 141}
    assert loop.selection_metric({"Bleu_4": 0.3, "CIDEr": 0.5}) == ("CIDEr", 0.5)  # what early stopping watches
    shapes, _ = train.parse_args(["--preset", "shapes"])
    assert not shapes.all_captions and shapes.early_stopping_patience == 0  # its 10-unit CPU budget (config.py)


def test_early_stopping_ends_the_run_after_patience_validations_without_a_better_score(tmp_path, monkeypatch):
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])  # best at epoch 1; epochs 4 and 5 must never run
    real_evaluate = loop.evaluate

    def scripted(model, dataset, cfg, desc="eval"):
        if desc.startswith("validation (epoch"):
            return {"object_f1": next(scores)}
        return real_evaluate(model, dataset, cfg, desc)  # best/ scored at the end

    monkeypatch.setattr(loop, "evaluate", scripted)
    output = run(tmp_path, "stop", "--epochs", "6", "--early-stopping-patience", "2", "--heatmap-offset-images", "0")
    log = read_log(output)
    assert [r["epoch"] for r in log if "val_object_f1" in r] == [0, 1, 2, 3]
    assert [r for r in log if r.get("stopped_early")] == [{"step": 12, "epoch": 3, "stopped_early": True,
                                                            "best_epoch": 1}]
    run_record = strict_json((output / "metrics.json").read_text())["run"]
    assert (run_record["steps"], run_record["epochs_done"], run_record["best_epoch"], run_record["stopped_early"]) \
        == (12, 4, 1, True)
    assert json.loads((output / "best" / "validation_metrics.json").read_text()) == {"object_f1": 0.7}


def test_flickr8k_recipe_on_flickr8k_shaped_parquet(tmp_path, monkeypatch):
    """flickr8k-small's recipe, tiny, on the benchmarks' Flickr8k-shaped parquet (one split of 24 images): each
    step reads all 5 captions of its images, the COCO metrics are scored against the raw references, and
    metrics.json and the model card name the split for what it is."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from train_throughput import make_dataset

    from caption_model.training import evaluation

    source = make_dataset(tmp_path / "flickr8k-shaped", 24)
    references, steps = [], []
    real_scores, real_step = evaluation.coco_caption_scores, loop._training_step
    monkeypatch.setattr(evaluation, "coco_caption_scores",
                        lambda predictions, refs: references.extend(refs.values()) or real_scores(predictions, refs))
    monkeypatch.setattr(loop, "_training_step", lambda run_, batch: steps.append(
        (batch["image_features"].shape[0], batch["input_ids"].shape[0])) or real_step(run_, batch))
    output = tmp_path / "small"
    assert train.main([
        "--preset", "flickr8k-small", "--source", str(source), "--decoder", "none", "--encoder-weights", "none",
        "--image-size", "64", "--encoder-stage", "layer2", "--hidden-size", "32", "--num-hidden-layers", "1",
        "--num-attention-heads", "2", "--intermediate-size", "64", "--attention-dim", "32",
        "--tokenizer-vocab-size", "150", "--batch-size", "4", "--max-steps", "2", "--max-eval-images", "3",
        "--eval-max-length", "8", "--mixed-precision", "no", "--output-dir", str(output)]) == 0
    assert steps == [(4, 20), (4, 20)]  # 4 images and their 5 captions each
    metrics = strict_json((output / "metrics.json").read_text())
    assert set(metrics["test"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    split = "seeded 18/3/3 split (seed 0) of a one-split source, not comparable with published test scores"
    assert (metrics["eval"]["split_method"], metrics["eval"]["split_description"]) == ("seeded", split)
    assert json.loads((output / "best" / "training_config.json").read_text())["split_method"] == "seeded"
    # as the dataset wrote them ("Two dogs runs on the beach ."), not cleaned ("two dogs runs on the beach")
    assert references and all(ref[0].isupper() and ref.endswith(" .") for refs in references for ref in refs)
    assert f"Data split: {split}." in str(build_model_card(output / "best", "alice/small"))


def test_eval_only_prints_metrics_of_a_checkpoint(tmp_path, capsys):
    output = run(tmp_path, "run", "--epochs", "1")
    capsys.readouterr()
    assert train.main(TINY + ["--eval-only", "--model", str(output / "best"), "--split", "validation"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{"):])
    assert printed["split"] == "validation" and 0.0 <= printed["object_f1"] <= 1.0


def test_metrics_json_writes_null_for_non_finite_numbers():
    text = to_json({"test": {"object_f1": 0.5, "pointing_accuracy": float("nan")}, "scores": [float("-inf"), 1.0]})
    assert strict_json(text) == {"test": {"object_f1": 0.5, "pointing_accuracy": None}, "scores": [None, 1.0]}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_folders_get_the_usual_modes(tmp_path, umask):
    def write(temp: Path) -> None:
        (temp / "config.json").write_text("{}")
        (temp / "sub").mkdir()

    previous = os.umask(umask)
    try:
        for _ in range(2):  # a new folder, then a replaced one
            folder = write_folder_atomically(tmp_path / "best", write)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # tempfile.mkdtemp would give 0700
    assert stat.S_IMODE((folder / "sub").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((folder / "config.json").stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temp or .old folder left


# ------------------------------------------------------------------------------------------ your own images


@pytest.fixture(autouse=True)
def own_datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches what it loads from local folders under tmp_path, not in the user's HF cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def write_shapes_imagefolder(folder: Path, count: int, metadata: str) -> None:
    """`count` shapes images + metadata.csv (`caption`) or metadata.jsonl (`short`, `long`, `other`)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    rows = []
    for index in range(count):
        example = generate_shapes_example(rng)
        example.image.save(folder / f"photo_{index:02d}.png")
        rows.append({"file_name": f"photo_{index:02d}.png", "caption": example.captions[0],
                     "short": example.captions[1], "long": example.captions[2], "other": "not a caption"})
    if metadata == "csv":
        lines = ["file_name,caption"] + [f"{r['file_name']},{r['caption']}" for r in rows]
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    else:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_imagefolder_with_metadata_csv_trains_and_the_card_names_no_local_path(tmp_path):
    folder = tmp_path / "my_photos"
    write_shapes_imagefolder(folder, 16, "csv")
    output = run(tmp_path, "run", "--source", str(folder), "--epochs", "1")  # seeded split: 12/2/2
    recorded = json.loads((output / "best" / "training_config.json").read_text())
    assert (recorded["source_kind"], recorded["num_train_images"]) == ("imagefolder", 12)
    eval_section = strict_json((output / "metrics.json").read_text())["eval"]
    assert (eval_section["source_kind"], eval_section["num_train_images"]) == ("imagefolder", 12)
    assert "Bleu_4" in strict_json((output / "metrics.json").read_text())["test"]
    text = str(build_model_card(output / "best", "alice/my-captioner"))
    assert "local imagefolder, 12 images" in text
    assert str(tmp_path) not in text and "my_photos" not in text and "jxie/flickr8k" not in text


def test_imagefolder_with_metadata_jsonl_and_several_caption_columns_trains(tmp_path):
    folder = tmp_path / "photos"
    write_shapes_imagefolder(folder, 16, "jsonl")
    args = ["--source", str(folder), "--caption-columns", "short,long"]
    cfg, _ = train.parse_args(TINY + args)
    assert cfg.caption_columns == ["short", "long"]
    data = load_training_data(cfg)
    assert {len(c) for split in data.values() for c in split["captions"]} == {2}  # `other` is not read
    output = run(tmp_path, "run", *args, "--max-steps", "2")
    assert [r["step"] for r in read_log(output) if "loss" in r] == [1, 2]
    assert ImageCaptioner.from_pretrained(str(output / "best")).caption(folder / "photo_00.png", num_beams=1).words


def test_too_few_images_for_three_splits_is_a_clear_error(tmp_path):
    write_shapes_imagefolder(tmp_path / "two", 2, "csv")
    cfg, _ = train.parse_args(TINY + ["--source", str(tmp_path / "two")])
    with pytest.raises(ValueError, match=r"expected images in every split, got \{'train': 2, 'validation': 0, "
                                         r"'test': 0\}; a source with one split needs at least 3"):
        load_training_data(cfg)


def test_parquet_with_custom_columns_from_the_command_line(tmp_path):
    from datasets import Dataset, Features, Image, List, Value

    rng = np.random.default_rng(2)
    examples = [generate_shapes_example(rng) for _ in range(8)]
    Dataset.from_dict({"jpg": [e.image for e in examples], "txt": [e.captions[:3] for e in examples]},
                      features=Features(jpg=Image(), txt=List(Value("string")))).to_parquet(str(tmp_path / "d.parquet"))
    cfg, _ = train.parse_args(TINY + ["--source", str(tmp_path / "d.parquet"), "--image-column", "jpg",
                                      "--caption-columns", "txt"])
    data = load_training_data(cfg)
    assert sum(len(split) for split in data.values()) == 8 and len(data["test"][0]["captions"]) == 3
    bad, _ = train.parse_args(TINY + ["--source", str(tmp_path / "d.parquet"), "--image-column", "jpg",
                                      "--caption-columns", "txt,caption"])
    with pytest.raises(ValueError, match=r"expected columns \['caption'\] in the data, got columns \['jpg', 'txt'\]"):
        load_training_data(bad)


def test_calibrated_frozen_batchnorm_normalises_the_images_it_saw():
    """A random encoder's frozen BatchNorms take the statistics of the calibration images (training does this
    before it starts); the trainable stages keep theirs, and every BatchNorm goes back to eval mode."""
    model = build_tiny_captioner().eval()  # frozen: stem, layer1; trainable: layer2
    encoder = model.encoder
    pixels = model.preprocess(shapes_images(32, seed=5))  # (32, 3, 64, 64)
    with torch.no_grad():
        default_stem = encoder.stem.bn1(encoder.stem.conv1(pixels))
    assert default_stem.var(dim=(0, 2, 3)).mean() < 0.5  # default statistics: the stem's outputs are mis-scaled

    assert calibrate_frozen_batchnorm(encoder, [pixels[:16], pixels[16:]]) == 32

    with torch.no_grad():
        stem = encoder.stem.bn1(encoder.stem.conv1(pixels))  # (32, 64, 32, 32)
    live = encoder.stem.bn1.running_var > 1e-3  # channels the random filters do not leave constant
    assert live.sum() > 32
    assert stem.mean(dim=(0, 2, 3))[live].abs().max() < 0.05
    assert (stem.var(dim=(0, 2, 3))[live] - 1).abs().median() < 0.1
    trainable = encoder.layer2[0].bn1
    assert torch.all(trainable.running_mean == 0) and torch.all(trainable.running_var == 1)
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 for m in norms) and not any(m.training for m in norms[:5])

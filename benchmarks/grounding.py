"""Do the per-word heatmaps land on the object their word names? Issue 12's grounding targets on fresh shapes images.

    python benchmarks/grounding.py checkpoints/shapes/best                  # 500 images, greedy + beam 3
    python benchmarks/grounding.py checkpoints/shapes/best --images 100 --beams 1 --threads 1
    python benchmarks/grounding.py checkpoints/shapes/best --map raw        # another reading of the same model

Images come from `shapes.generate_shapes_example` with `np.random.default_rng(--seed)`, default 20261122. Training
never draws from that stream: `data.load_shapes_dataset` seeds each split with `default_rng([seed, split index])`
(training seed 0 by default), and the other benchmarks use seed 12345. The maps are judged as the overlay draws
them (`shapes_scores` with the model's `config.image_size`: the brightest pixel of `heatmap.upsample(map, (W, H))`
inside the object's box grown by half a cell). Targets (issue 12), per decoding mode: object F1 >= 0.98, pointing
>= 0.95, colour-word and shape-word hits each >= 0.93, mean signed offset of each word kind within +-0.25 cell in x
and y. Pass (exit 0) when every target holds in every mode. Prints the CPU, a table per mode and one JSON line.

--map picks the per-word map (a reading of the same decoded captions; the captions themselves never change):
  model      what the model serves (its config: grounded_heatmaps, heatmap_reading and heatmap_offsets)
  word       the evidence-weighted attention of each word alone (heatmap_reading "word")
  phrase     each word's evidence-weighted map times its neighbours' maps, counted by their peakedness
             (heatmap.phrase_maps, heatmap_reading "phrase"; the shapes preset serves it)
  raw        the additive attention alpha_t, computed before the word was chosen
  evidence   the context-only head's score of the word from each cell alone, softmax over cells
  posterior  alpha_t(p) * p(word | cell p alone), the normalised posterior of "the word came from cell p"
Every map but "model" is judged as read, without the model's per-word offsets (heatmap.recentre).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from caption_model import ImageCaptioner  # noqa: E402
from caption_model.cpu.features import describe_cpu  # noqa: E402
from caption_model.training.metrics import shapes_scores  # noqa: E402
from shapes_cli import shapes_checkpoint_parser, shapes_test_set  # noqa: E402  (benchmarks/, beside this script)

DEFAULT_SEED = 20261122  # a stream training never draws from (module docstring)
KINDS = ("colour", "shape")
TARGETS = {"object_f1": 0.98, "pointing_accuracy": 0.95, "pointing_colour": 0.93, "pointing_shape": 0.93}
MAX_OFFSET = 0.25  # cells, |mean signed offset| per word kind and axis


def _word_evidence(model, visual: torch.Tensor, token_ids: torch.Tensor, normalised: bool) -> torch.Tensor:
    """(B, T, P) score of each chosen word (B, T) from each cell of visual (B, P, D) alone: the context-only head's
    logit (normalised=False, the output bias cancels over cells) or its log-probability (normalised=True)."""
    decoder = model.decoder
    if normalised:
        cell_logp = decoder.cell_word_logprobs(visual)  # (B, P, V)
        P = cell_logp.shape[1]
        return cell_logp.gather(2, token_ids[:, None, :].expand(-1, P, -1)).transpose(1, 2)  # (B, T, P)
    cells = decoder.head.context_proj(visual)  # (B, P, D)
    return decoder.bert.embeddings.word_embeddings(token_ids) @ cells.transpose(1, 2)  # (B, T, D) @ (B, D, P)


MAPS = {  # name -> (model, alpha (B, T, P), visual (B, P, D), token_ids (B, T)) -> maps (B, T, P) summing to 1
    "raw": lambda model, alpha, visual, ids: alpha,
    "evidence": lambda model, alpha, visual, ids: _word_evidence(model, visual, ids, False).softmax(dim=-1),
    "posterior": lambda model, alpha, visual, ids: (
        alpha.clamp_min(1e-30).log() + _word_evidence(model, visual, ids, True)).softmax(dim=-1),
}
READINGS = ("word", "phrase")  # heatmap_reading values, over the model's own evidence-weighted maps


def use_map(model, name: str) -> None:
    """Make `model` draw its per-word maps as `name` (module docstring); "model" leaves it as it is."""
    if name == "model":
        return
    model.config.heatmap_offsets = {}  # measured for the served reading only
    model.config.grounded_heatmaps = True  # generate() then calls decoder.ground_attention(alpha, visual, ids)
    model.config.heatmap_reading = name if name in READINGS else "word"  # how to_caption() reads the word maps
    if name in MAPS:
        model.decoder.ground_attention = lambda alpha, visual, ids: MAPS[name](model, alpha, visual, ids)


def check(scores: dict) -> dict[str, bool]:
    """Issue 12's targets -> {target: met}."""
    met = {name: bool(scores[name] >= floor) for name, floor in TARGETS.items()}
    for kind in KINDS:
        for axis in "xy":
            met[f"offset_{kind}_{axis}"] = bool(abs(scores[f"offset_{kind}_{axis}"]) <= MAX_OFFSET)
    return met


def print_mode(name: str, scores: dict, met: dict[str, bool], seconds: float, images: int) -> None:
    def mark(key: str) -> str:
        return "ok" if met[key] else "FAIL"

    print(f"\n## {name}: {seconds:.1f} s ({1000 * seconds / images:.0f} ms/image), "
          f"{scores['pointed_words']} pointed words")
    print(f"{'measure':22s} {'value':>14s} {'target':>12s}")
    print(f"{'object F1':22s} {scores['object_f1']:14.4f} {'>= 0.98':>12s} {mark('object_f1')}")
    print(f"{'pointing':22s} {scores['pointing_accuracy']:14.4f} {'>= 0.95':>12s} {mark('pointing_accuracy')}")
    for kind in KINDS:
        print(f"{kind + '-word hits':22s} {scores[f'pointing_{kind}']:14.4f} {'>= 0.93':>12s} "
              f"{mark(f'pointing_{kind}')}")
    for kind in KINDS:
        dx, dy = scores[f"offset_{kind}_x"], scores[f"offset_{kind}_y"]
        ok = met[f"offset_{kind}_x"] and met[f"offset_{kind}_y"]
        print(f"{kind + ' offset (x, y)':22s} {f'({dx:+.2f}, {dy:+.2f})':>14s} {'|.| <= 0.25':>12s} "
              f"{'ok' if ok else 'FAIL'}")


def main() -> int:
    parser = shapes_checkpoint_parser(__doc__, batch_size=25, batch_help="images per caption_batch call")
    parser.set_defaults(seed=DEFAULT_SEED)
    parser.add_argument("--map", choices=["model", *READINGS, *MAPS], default="model",
                        help="which per-word map to judge")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = ImageCaptioner.from_pretrained(args.checkpoint)
    use_map(model, args.map)
    cpu = describe_cpu()
    print(f"# CPU: {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# {args.checkpoint}: map {args.map}, input {model.config.image_size} px, grid {model.config.grid_size}; "
          f"{args.images} images, seed {args.seed}")
    images, objects, sizes = shapes_test_set(args.images, args.seed)

    result = {"checkpoint": str(args.checkpoint), "map": args.map, "images": args.images, "seed": args.seed,
              "cpu": cpu, "modes": {}}
    ok = True
    for beams in [int(b) for b in args.beams.split(",") if b]:
        captions, start = [], time.perf_counter()
        for i in range(0, len(images), args.batch_size):
            captions += model.caption_batch(images[i:i + args.batch_size], num_beams=beams,
                                            max_length=args.max_length)
        seconds = time.perf_counter() - start
        scores = shapes_scores(captions, objects, sizes, model.config.image_size)
        met = check(scores)
        ok &= all(met.values())
        name = "greedy" if beams == 1 else f"beam {beams}"
        print_mode(name, scores, met, seconds, args.images)
        result["modes"][name] = {**{k: float(v) for k, v in scores.items()}, "seconds": seconds, "targets_met": met, "ok": all(met.values())}
    result["ok"] = ok
    print(f"\npass: every target in every decoding mode -> {'PASS' if ok else 'FAIL'}")
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""CPU latency of captioning, measured side by side in one run.

    python benchmarks/latency.py                 # full run: >= 10 interleaved timed runs per figure, both presets
    python benchmarks/latency.py --quick         # 3 runs, smoke check of the script
    python benchmarks/latency.py --threads 1     # pin every contender to one thread (a busy shared machine)

Contenders, each asked for one image at a time (per-image latency) with exactly 16 new tokens:
  1  ours, the default path of the app: `ImageCaptioner.caption()` (preprocess, ResNet-50, KV-cached decoding,
     heatmaps, words) in the fast CPU mode, `from_pretrained(path, quantize="int8")`: int8 decoder, fp32 ResNet
     (`--encoder-bf16` times `quantize_int8(encoder_bf16=True)` instead: bf16 ResNet)
  1f ours, the same path with the fp32 weights as trained (`app.py --precision fp32`, plain `from_pretrained`)
  2  ours without KV cache (`caption(..., use_cache=False)`: the whole prefix recomputed every step), fp32
  3  transformers VisionEncoderDecoderModel, ViT-B/16 + GPT-2 (the architecture of the most used captioning
     checkpoint), ViTImageProcessor + `generate()`; it does not detokenise, ours does (counted against us).
  4  the same with its Linear layers dynamically quantised to int8, what a user tries first:
     `torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)` (ViT's Linears and the LM
     head; GPT-2's blocks are transformers `Conv1D`, not `nn.Linear`, so that call leaves them fp32).
Then the cost of a large input on every path (benchmarks/large_inputs.py): a 12 MP phone JPEG vs a 500 x 375
one through the Python API, the app's handler, /predict's service call and the batch CLI's loading.
All models have random weights (no network). Same caption length everywhere: ours never emits the end token
because its output bias is set to -1e9 (one logit out of V; the vocabulary projection still runs in full), and
HF gets min_new_tokens = max_new_tokens = 16. Every run checks that 16 tokens came out.

The CPU's model and the flags that matter are printed first; the fast mode is the one the app picks on this CPU
(int8-vnni / int8-avx2; AVX2 emulated on an AVX-512 CPU with FBGEMM_ENABLE_INSTRUCTIONS=AVX2
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, which the printed flags then reflect).

Timing: after warm-up, the contenders are run in a shuffled order in every repetition (the machine is shared and
noisy), and each figure is the median over the repetitions. Ratios are taken within this one run.
Peak RSS: each contender in its own subprocess, the peak resident set (VmHWM) while captioning, model loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from caption_model.cpu.features import describe_cpu  # noqa: E402
from caption_model.cpu.threads import available_cpus  # noqa: E402
from large_inputs import large_input_overhead  # noqa: E402  (benchmarks/, beside this script)
from timing import interleaved  # noqa: E402

NEW_TOKENS = 16
BATCH = 8
# Decoder shapes: bert-base (the `flickr8k` preset) and MiniLM-L6 (the `flickr8k-small` preset); both with the
# bert-base-uncased vocabulary and the ResNet-50 layer4 encoder at 224 px (7x7 grid).
PRESETS = {
    "full": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "flickr8k-small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
CONTENDERS = {
    "ours_int8": "1  ours, app default: int8 decoder",
    "ours": "1f ours fp32: caption(), KV cache",
    "ours_nocache": "2  ours without KV cache, fp32",
    "hf": "3  HF ViT-B/16 + GPT-2 generate(), fp32",
    "hf_int8": "4  HF, Linear layers dynamic int8",
}
HF_CONTENDERS = ("hf", "hf_int8")


# ---------------------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------------------
def bert_like_tokenizer(vocab_size: int):
    """A BertTokenizerFast with bert-base-uncased's special ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102) and
    `vocab_size` entries; enough to turn ids into words offline."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    assert len(tokenizer) == vocab_size and tokenizer.sep_token_id == 102, (len(tokenizer), tokenizer.sep_token_id)
    return tokenizer


def build_ours(preset: str, int8: bool = False, seed: int = 0):
    """Random-weight ImageCaptioner of `preset`, its end token suppressed so that every caption is 16 tokens."""
    from caption_model import CaptionerConfig, ImageCaptioner

    torch.manual_seed(seed)
    config = CaptionerConfig(decoder_name=None, encoder_weights=None, **PRESETS[preset])
    model = ImageCaptioner(config).eval()
    model.tokenizer = bert_like_tokenizer(config.vocab_size)
    with torch.no_grad():
        model.decoder.output_bias[config.eos_token_id] = -1e9  # never ends: fixed caption length
    if int8:  # --encoder-bf16 reaches the peak-RSS subprocesses through the environment
        model.quantize_int8(encoder_bf16=os.environ.get("LATENCY_ENCODER_BF16") == "1")
    return model


def build_hf(int8: bool = False):
    """VisionEncoderDecoderModel with ViT-B/16 + GPT-2 (small) configs, random weights, and its image processor;
    int8: its nn.Linear layers dynamically quantised, as a user would do it."""
    from transformers import (GPT2Config, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    torch.manual_seed(0)
    gpt2 = GPT2Config(add_cross_attention=True, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), gpt2)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = 50256
    model = VisionEncoderDecoderModel(config=config).eval()
    if int8:
        from torch.ao.quantization import quantize_dynamic

        model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model, ViTImageProcessor()


def ours_call(model, images, beams: int, use_cache: bool = True) -> Callable[[], None]:
    def run():
        if len(images) == 1:
            captions = [model.caption(images[0], num_beams=beams, max_length=NEW_TOKENS, use_cache=use_cache)]
        else:
            captions = model.caption_batch(images, num_beams=beams, max_length=NEW_TOKENS, use_cache=use_cache)
        for caption in captions:
            assert len(caption.token_ids) == NEW_TOKENS, f"expected {NEW_TOKENS} tokens, got {len(caption.token_ids)}"
            assert caption.attention.shape[1:] == model.grid_size
    return run


def hf_call(model, processor, images, beams: int) -> Callable[[], None]:
    def run():
        with torch.inference_mode():
            pixel_values = processor(images=list(images), return_tensors="pt").pixel_values
            out = model.generate(pixel_values=pixel_values, num_beams=beams, do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        assert out.shape == (len(images), 1 + NEW_TOKENS), f"expected {1 + NEW_TOKENS} tokens, got {out.shape}"
    return run


def make_call(name: str, models: dict, images, beams: int) -> Callable[[], None]:
    preset, contender = name.split(":")
    if contender in HF_CONTENDERS:
        return hf_call(*models[contender], images, beams)
    model = models[f"{preset}:ours_int8" if contender == "ours_int8" else f"{preset}:ours"]
    return ours_call(model, images, beams, use_cache=contender != "ours_nocache")


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------


def peak_rss_mb(name: str, threads: int) -> float | None:
    """Run one contender in a fresh process; its peak RSS (MB) while captioning (greedy + beam 3)."""
    cmd = [sys.executable, __file__, "--rss-of", name, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith("PEAK_RSS_MB "):
            return float(line.split()[1])
    print(f"[rss] {name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
    return None


def _rss_child(name: str) -> None:
    preset, contender = name.split(":")
    images = test_images(1)
    models = {}
    if contender in HF_CONTENDERS:
        models[contender] = build_hf(int8=contender == "hf_int8")
    else:
        models[f"{preset}:ours_int8" if contender == "ours_int8" else f"{preset}:ours"] = build_ours(
            preset, int8=contender == "ours_int8")
    import gc

    gc.collect()
    try:  # reset VmHWM so that the peak covers captioning with the model loaded, not its construction
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    for beams in (1, 3):
        make_call(name, models, images, beams)()
    status = Path("/proc/self/status").read_text()
    peak_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    print(f"PEAK_RSS_MB {peak_kb / 1024:.0f}")


def test_images(n: int):
    from caption_model.training.shapes import generate_shapes_example

    rng = np.random.default_rng(0)
    return [generate_shapes_example(rng).image for _ in range(n)]


def memory_bandwidth_gbs() -> float:
    """Memory bandwidth from a single-threaded copy of a 256 MB numpy array: (read + written bytes) / s, best of 5."""
    a = np.ones(32 * 2**20, dtype=np.float64)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.nbytes / best / 1e9


def decoder_bytes_per_token(model) -> int:
    """Weight bytes read to generate one token (one row): every decoder Linear the one-token step runs (the int8
    mode's fused q/k/v reads the same bytes as the three layers it stands for), the output projection, the fusion
    MLP and the attention query; not what runs once per image or caption (cross-attention keys/values, attention
    keys, the context-only head of the heatmaps)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from caption_model.cpu.int8 import Fp16Linear

    once = ("crossattention.self.key", "crossattention.self.value", "head.attention.key", "head.context_proj")
    total = 0
    for name, module in model.decoder.named_modules():
        if any(part in name for part in once):
            continue
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, DynamicInt8Linear):  # int8 weights + fp32 bias
            weight, bias = module._weight_bias()
            total += weight.numel() + (bias.numel() * 4 if bias is not None else 0)
        elif isinstance(module, Fp16Linear):  # fp16 weights + fp32 bias
            total += module.in_features * module.out_features * 2 + module.out_features * 4
    V, D = model.decoder.bert.embeddings.word_embeddings.weight.shape
    fast_vocab = getattr(model, "step_kernels", None) is not None and model.step_kernels.vocab_logits is not None
    total += V * D + V * 4 if fast_vocab else V * D * 4  # the tied output projection (int8 + fp32 bias when fast)
    return total


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="timed repetitions per figure (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-runs", type=int, default=None, help="repetitions for batch-8 throughput")
    parser.add_argument("--quick", action="store_true", help="3 runs, 1 warm-up, no peak-RSS subprocesses")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: what app.py uses, caption_model.cpu.threads.available_cpus())")
    parser.add_argument("--presets", default="full,flickr8k-small")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--no-large-inputs", action="store_true", help="skip the 12 MP JPEG section")
    parser.add_argument("--encoder-bf16", action="store_true",
                        help="time contender 1 with quantize_int8(encoder_bf16=True): bf16 ResNet (AMX/AVX512-BF16)")
    parser.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--rss-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.encoder_bf16:
        os.environ["LATENCY_ENCODER_BF16"] = "1"
    threads = args.threads or available_cpus()
    torch.set_num_threads(threads)
    import transformers

    transformers.logging.set_verbosity_error()  # generate()'s attention-mask advice for a pad == eos model
    if args.rss_of:
        _rss_child(args.rss_of)
        return
    if args.quick:
        args.runs, args.warmup, args.no_rss = 3, 1, True
    batch_runs = args.batch_runs or max(3, args.runs // 2)
    presets = [p for p in args.presets.split(",") if p]
    for preset in presets:
        if preset not in PRESETS:
            parser.error(f"unknown preset {preset!r}; expected some of {sorted(PRESETS)}")

    print(f"# CPU: {describe_cpu()}", flush=True)
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {threads}, load average {os.getloadavg()[0]:.1f}, {NEW_TOKENS} new tokens, "
          f"median of {args.runs} interleaved runs after {args.warmup} warm-up", flush=True)
    build_start = time.perf_counter()
    models: dict = {"hf": build_hf(), "hf_int8": build_hf(int8=True)}
    for preset in presets:
        models[f"{preset}:ours"] = build_ours(preset)
        models[f"{preset}:ours_int8"] = build_ours(preset, int8=True)
    fast = models[f"{presets[0]}:ours_int8"]
    encoder_dtype = str(fast.encoder.dtype).removeprefix("torch.")
    print(f"# models built in {time.perf_counter() - build_start:.0f} s; fast mode {fast.fast_mode} "
          f"({fast.fast_mode_reason}), ResNet in {encoder_dtype}", flush=True)

    names = [f"{p}:{c}" for p in presets for c in ("ours", "ours_int8", "ours_nocache")] + ["all:hf", "all:hf_int8"]
    one = test_images(1)
    batch = test_images(BATCH)
    # Greedy and beam-3 jobs of every contender share one interleaved loop, so a load change on the shared machine
    # hits all figures alike.
    seconds = interleaved({(name, beams): make_call(name, models, one, beams) for beams in (1, 3) for name in names},
                          args.runs, args.warmup, seed=1)
    latency = {beams: {name: seconds[name, beams] for name in names} for beams in (1, 3)}
    print("# per-image latency: done", flush=True)
    batch_names = [f"{p}:{c}" for p in presets for c in ("ours", "ours_int8")] + ["all:hf", "all:hf_int8"]
    seconds = interleaved({(name, beams): make_call(name, models, batch, beams) for beams in (1, 3)
                           for name in batch_names}, batch_runs, 1, seed=2)
    throughput = {beams: {name: BATCH / seconds[name, beams] for name in batch_names} for beams in (1, 3)}
    print(f"# throughput at batch {BATCH}: done", flush=True)
    rss = {}
    if not args.no_rss:
        for name in [n for n in names if not n.endswith("nocache")]:
            rss[name] = peak_rss_mb(name, threads)

    bandwidth = memory_bandwidth_gbs()
    result = {"threads": threads, "new_tokens": NEW_TOKENS, "runs": args.runs, "batch": BATCH,
              "load_average": round(os.getloadavg()[0], 2), "copy_bandwidth_gbs": round(bandwidth, 2),
              "cpu": describe_cpu(), "fast_mode": fast.fast_mode, "fast_mode_encoder_dtype": encoder_dtype,
              "presets": {}}
    for preset in presets:
        rows = {}
        hf_greedy, hf_beam = latency[1]["all:hf"], latency[3]["all:hf"]
        q_greedy, q_beam = latency[1]["all:hf_int8"], latency[3]["all:hf_int8"]
        for contender in ("ours_int8", "ours", "ours_nocache") + HF_CONTENDERS:
            name = f"all:{contender}" if contender in HF_CONTENDERS else f"{preset}:{contender}"
            row = {
                "greedy_ms": 1000 * latency[1][name], "beam3_ms": 1000 * latency[3][name],
                "greedy_speedup_vs_hf": hf_greedy / latency[1][name], "beam3_speedup_vs_hf": hf_beam / latency[3][name],
                "greedy_speedup_vs_hf_int8": q_greedy / latency[1][name],
                "beam3_speedup_vs_hf_int8": q_beam / latency[3][name],
            }
            if name in throughput[1]:
                row["batch8_greedy_img_s"] = throughput[1][name]
                row["batch8_beam3_img_s"] = throughput[3][name]
            if name in rss:
                row["peak_rss_mb"] = rss[name]
            rows[contender] = row
        for contender in ("ours", "ours_int8"):
            rows[contender]["greedy_speedup_vs_nocache"] = latency[1][f"{preset}:ours_nocache"] / latency[1][f"{preset}:{contender}"]
            rows[contender]["beam3_speedup_vs_nocache"] = latency[3][f"{preset}:ours_nocache"] / latency[3][f"{preset}:{contender}"]
        fp32_bytes = decoder_bytes_per_token(models[f"{preset}:ours"])
        int8_bytes = decoder_bytes_per_token(models[f"{preset}:ours_int8"])
        result["presets"][preset] = {
            "contenders": rows,
            "decoder_weight_mb_per_token": {"fp32": fp32_bytes / 1e6, "int8": int8_bytes / 1e6},
            "bandwidth_bound_ms_per_token": {"fp32": 1000 * fp32_bytes / (bandwidth * 1e9),
                                             "int8": 1000 * int8_bytes / (bandwidth * 1e9)},
        }
        print_table(preset, rows, result["presets"][preset], bandwidth)
    if not args.no_large_inputs:
        print(f"\n## large inputs: {presets[0]} fast mode, greedy, {args.runs} interleaved runs", flush=True)
        result["large_inputs"] = large_input_overhead(fast, runs=args.runs)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps(_rounded(result)))


def print_table(preset: str, rows: dict, info: dict, bandwidth: float) -> None:
    shape = PRESETS[preset]
    print(f"\n## {preset}: ResNet-50 layer4 @224 + BERT decoder {shape['num_hidden_layers']}x{shape['hidden_size']} "
          f"(ffn {shape['intermediate_size']}), vocab 30522; contender 3 is the same in both tables")
    header = (f"{'contender':44s} {'greedy ms':>10s} {'beam3 ms':>10s} {'greedy x3':>9s} {'beam3 x3':>9s} "
              f"{'greedy x4':>9s} {'vs no-cache':>11s} {'b8 greedy/s':>11s} {'b8 beam3/s':>10s} {'peak RSS MB':>11s}")
    print(header)
    print("-" * len(header))
    for contender, row in rows.items():
        nocache = (f"{row['greedy_speedup_vs_nocache']:.2f}/{row['beam3_speedup_vs_nocache']:.2f}"
                   if "greedy_speedup_vs_nocache" in row else "")
        print(f"{CONTENDERS[contender]:44s} {row['greedy_ms']:10.0f} {row['beam3_ms']:10.0f} "
              f"{row['greedy_speedup_vs_hf']:9.2f} {row['beam3_speedup_vs_hf']:9.2f} "
              f"{row['greedy_speedup_vs_hf_int8']:9.2f} {nocache:>11s} "
              f"{_fmt(row.get('batch8_greedy_img_s'), 11, 2)} {_fmt(row.get('batch8_beam3_img_s'), 10, 2)} "
              f"{_fmt(row.get('peak_rss_mb'), 11, 0)}")
    mb = info["decoder_weight_mb_per_token"]
    bound = info["bandwidth_bound_ms_per_token"]
    print(f"x3 = contender 3 time / this time; x4 = contender 4 time / this time; vs no-cache = contender 2 time / this time (greedy/beam3). "
          f"Decoder weights read per token: fp32 {mb['fp32']:.0f} MB, fast mode (int8 + fp16) {mb['int8']:.0f} MB; at the measured "
          f"{bandwidth:.1f} GB/s (numpy copy, bytes read + written per s) that is >= {bound['fp32']:.1f} ms "
          f"(fp32) / {bound['int8']:.1f} ms (int8) per token, x{NEW_TOKENS} = {NEW_TOKENS * bound['fp32']:.0f} / "
          f"{NEW_TOKENS * bound['int8']:.0f} ms per greedy caption.")


def _fmt(value, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else " " * (width - 1) + "-"


def _rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    main()

"""Fast CPU inference: the cached fast path equals the reference decoding, and the int8 decoder keeps the captions.

No timings here (speed is benchmarks/latency.py's job); these tests fail when the fast path computes something else.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from caption_model import ImageCaptioner
from caption_model.cpu.encoder_graph import FusedEncoder
from caption_model.cpu.features import has_native_bf16, usable_flags
from caption_model.generation import DecoderState, beam_search, greedy_search
from caption_model.modeling import ImageEncoder
from caption_model.training.shapes import generate_shapes_example
from conftest import shapes_images

MAX_LEN = 20


@pytest.fixture(scope="module")
def images():
    return shapes_images(40, seed=606)


@pytest.fixture(scope="module")
def int8_captioner(tiny_trained_captioner):
    """The int8 decoder alone (fp32 ResNet): what the caption-agreement tests compare with fp32."""
    return copy.deepcopy(tiny_trained_captioner).quantize_int8(encoder_bf16=False)


# --- the fast (cached) path computes what the reference (whole prefix every step) computes ----------------------
@pytest.mark.parametrize("num_beams", [1, 3])
def test_fast_path_gives_the_reference_tokens(tiny_trained_captioner, images, num_beams):
    model = tiny_trained_captioner
    with torch.inference_mode():
        visual = model.encode(model.preprocess(images[:12]))
        if num_beams == 1:
            fast, reference = greedy_search(model, visual, MAX_LEN, True), greedy_search(model, visual, MAX_LEN, False)
        else:
            fast = beam_search(model, visual, num_beams, MAX_LEN, 1.0, True)
            reference = beam_search(model, visual, num_beams, MAX_LEN, 1.0, False)
    assert torch.equal(fast[0], reference[0])  # token ids
    assert torch.equal(fast[3], reference[3])  # lengths
    torch.testing.assert_close(fast[1], reference[1], atol=1e-5, rtol=0)  # attention per step
    torch.testing.assert_close(fast[2], reference[2], atol=1e-4, rtol=0)  # summed log-probs


def test_fast_step_log_probs_equal_the_reference_at_every_step():
    """A random model, forced along the same prefix by both paths, 24 steps, 2 images x 2 beams with reorders."""
    from conftest import build_tiny_captioner

    model = build_tiny_captioner(seed=5).eval()
    rng = np.random.default_rng(1)
    pixels = model.preprocess([generate_shapes_example(rng).image for _ in range(2)])
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        visual = model.encode(pixels)
        fast, reference = DecoderState(model, visual, True, num_beams=2), DecoderState(model, visual, False, num_beams=2)
        for _ in range(24):
            (lp_fast, a_fast), (lp_ref, a_ref) = fast.step(), reference.step()
            torch.testing.assert_close(lp_fast, lp_ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(a_fast, a_ref, atol=1e-5, rtol=0)
            rows = torch.tensor([1, 0, 3, 2]) if torch.rand((), generator=generator) < 0.5 else torch.tensor([0, 0, 2, 3])
            tokens = torch.randint(5, model.config.vocab_size, (4,), generator=generator)
            for state in (fast, reference):
                state.reorder(rows)
                state.append(tokens)


def test_cross_attention_keys_and_values_are_projected_once_per_image(tiny_trained_captioner, images):
    """The visual tokens go through each layer's cross-attention key/value projections once, for the images (not
    for every beam, not at every step)."""
    model = tiny_trained_captioner
    calls = []
    hooks = []
    for layer in model.decoder.bert.encoder.layer:
        for linear in (layer.crossattention.self.key, layer.crossattention.self.value):
            hooks.append(linear.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0])))
    try:
        captions = model.caption_batch(images[:4], num_beams=3, max_length=MAX_LEN)
    finally:
        for hook in hooks:
            hook.remove()
    assert max(len(c.token_ids) for c in captions) > 1  # several decoding steps happened
    assert calls == [4] * (2 * model.config.num_hidden_layers)  # one call per projection, on the 4 image rows


# --- int8 -----------------------------------------------------------------------------------------------------
def int8_logit_error_bound(x: torch.Tensor, weight: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """The most a dynamic int8 linear's output x.w can differ from fp32's, per row of x (N, D) and row of weight
    (V, D) -> (N, V), from how the two are rounded: activations to 255 steps of their whole range (s_x; an element
    moves by up to one step where the zero point's rounding meets the clamp), weights symmetric per row to
    2^bits - 1 steps (s_w, half a step). |(x + e).(w + f) - x.w| <= s_x |w|_1 + s_w/2 |x|_1 + D s_x s_w / 2; the
    integer sums are exact, the last term's float rounding is covered by a relative 1e-5."""
    span = x.max().clamp_min(0) - x.min().clamp_max(0)
    s_x = span / 255  # one scale for the whole input (per-tensor dynamic quantisation)
    s_w = weight.abs().amax(dim=1) / (2 ** weight_bits - 1) * 2  # (V,): max |w| maps to the last level
    D = x.shape[1]
    bound = (s_x * weight.abs().sum(dim=1)[None, :] + s_w[None, :] / 2 * x.abs().sum(dim=1)[:, None]
             + D * s_x * s_w[None, :] / 2)  # (N, V)
    return bound + 1e-5 * (x.abs() @ weight.abs().T)


def test_quantize_int8_quantizes_the_per_token_weights(tiny_trained_captioner, int8_captioner):
    decoder = int8_captioner.decoder
    assert int8_captioner.quantized and int8_captioner.fast_mode in ("int8-vnni", "int8-avx2")
    linears = [m for m in decoder.bert.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == []  # every BERT layer Linear is int8
    int8 = [m for m in decoder.bert.encoder.modules() if isinstance(m, DynamicInt8Linear)]
    fp32_linears = [m for m in tiny_trained_captioner.decoder.bert.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert len(int8) == len(fp32_linears) > 0
    # the fusion MLP, which picks between close words, keeps fp16 weights
    assert [type(m).__name__ for m in decoder.head.fuse] == ["Fp16Linear", "GELU", "LayerNorm"]
    # the step's kernels: the tied output projection (int8, refined) and one fused int8 q/k/v per layer
    kernels, fp32 = int8_captioner.step_kernels, tiny_trained_captioner.decoder
    x = torch.randn(5, 1, fp32.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = fp32.vocab_logits(x)[:, 0]  # (5, V)
        logits = kernels.vocab_logits(x[:, 0])  # (5, V): int8, the best candidates recomputed in fp32
        approximate = kernels.vocab_logits.approximate(x[:, 0])  # (5, V): int8 alone
        refined = approximate.topk(kernels.vocab_logits.k, dim=-1).indices  # (5, k): int8's best candidates
        # the candidates score as in fp32 (the einsum sums in another order than the reference's GEMM) ...
        torch.testing.assert_close(logits.gather(-1, refined), reference.gather(-1, refined), atol=1e-5, rtol=1e-5)
        # ... every other word keeps its int8 logit, which is within int8's error of the fp32 one
        others = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, refined, False)
        assert torch.equal(logits[others], approximate[others])
        bits = 8 if int8_captioner.fast_mode == "int8-vnni" else 7
        bound = int8_logit_error_bound(x[:, 0], fp32.bert.get_input_embeddings().weight, bits)  # (5, V)
        error = (approximate - reference).abs()
        assert (error <= bound).all(), f"worst: {(error - bound).max():.2e} over the bound"
        assert (error > 0).any()  # it did run in int8
        assert len(kernels.qkv) == fp32.config.num_hidden_layers
        a = fp32.bert.encoder.layer[1].attention.self
        reference = torch.cat([a.query(x), a.key(x), a.value(x)], dim=-1)  # (5, 1, 3D)
        assert (kernels.qkv[1](x) - reference).norm() / reference.norm() < 0.05


def test_the_deprecated_quantisation_api_is_still_there():
    """torch announced torch.ao.quantization and fbgemm's fp16 ops for removal: this fails first, naming the one
    function to port."""
    from caption_model.cpu.int8 import _torch_low_precision_ops

    try:
        ops = _torch_low_precision_ops()
    except (ImportError, AttributeError) as error:
        pytest.fail(f"torch's int8 / fp16 linear API is gone ({error}): port caption_model/cpu/int8.py's "
                    "_torch_low_precision_ops to torchao or torch's own low-precision kernels")
    assert callable(ops["quantize_dynamic"]) and issubclass(ops["DynamicLinear"], torch.nn.Module)
    assert callable(ops["pack_fp16"]) and callable(ops["linear_fp16"])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_int8_captions_equal_fp32_captions(tiny_trained_captioner, int8_captioner, images, num_beams):
    """On the briefly trained tiny model >= 95% identical greedy captions (>= 90% with beams) over 40 images.
    Not 100%: this model is small (D=64) and undertrained, so some steps have near-tied logits (repeated objects
    such as "a red triangle a red triangle") that int8 rounding can flip; benchmarks/int8_quality.py checks the
    trained shapes checkpoint on 200 images (>= 95% identical, object F1 within 0.01)."""
    fp32 = tiny_trained_captioner.caption_batch(images, num_beams=num_beams, max_length=MAX_LEN)
    int8 = int8_captioner.caption_batch(images, num_beams=num_beams, max_length=MAX_LEN)
    same = [a.text == b.text for a, b in zip(fp32, int8)]
    assert np.mean(same) >= (0.95 if num_beams == 1 else 0.90), [(a.text, b.text) for a, b in zip(fp32, int8)
                                                                 if a.text != b.text]
    for a, b, equal in zip(fp32, int8, same):
        if equal:  # the same words, nearly the same scores and heatmaps
            assert b.score == pytest.approx(a.score, abs=0.05)
            assert np.abs(a.attention - b.attention).max() < 0.05
    assert len({c.text for c in int8}) > 3  # real, varied captions, not one string for everything


def test_bf16_encoder_keeps_the_grid(tiny_trained_captioner, images):
    """quantize_int8(encoder_bf16=True): the ResNet in bf16 (channels-last, for oneDNN's AMX / AVX512-BF16
    kernels) gives the fp32 grid to bf16 precision, as fp32, from the same fp32 pixels, and still captions."""
    fast = copy.deepcopy(tiny_trained_captioner).quantize_int8(encoder_bf16=True)
    assert isinstance(fast.encoder, FusedEncoder) and fast.encoder.dtype == torch.bfloat16
    pixels = tiny_trained_captioner.preprocess(images[:8])
    with torch.inference_mode():
        reference = tiny_trained_captioner.encoder(pixels)  # (8, C, gh, gw)
        grid = fast.encoder(pixels)
    assert grid.dtype == torch.float32 and grid.shape == reference.shape
    error = ((grid - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.03  # bf16 (8-bit mantissa) rounding, nothing worse
    captions = fast.caption_batch(images[:8], num_beams=1, max_length=MAX_LEN)
    assert all(c.text and c.attention.shape[0] == len(c.words) for c in captions)


def test_quantize_int8_keeps_the_fp32_encoder_unless_asked(tiny_trained_captioner):
    default = copy.deepcopy(tiny_trained_captioner).quantize_int8()
    assert default.encoder.dtype == torch.float32
    auto = copy.deepcopy(tiny_trained_captioner).quantize_int8(encoder_bf16=None)
    expected = torch.bfloat16 if has_native_bf16(usable_flags()) else torch.float32  # as torch may use the CPU
    assert auto.encoder.dtype == expected


def test_from_pretrained_int8(tiny_checkpoint, tiny_trained_captioner, images):
    model = ImageCaptioner.from_pretrained(tiny_checkpoint, quantize="int8")
    assert model.quantized
    loaded = model.caption_batch(images[:8], num_beams=1, max_length=MAX_LEN)
    direct = copy.deepcopy(tiny_trained_captioner).quantize_int8().caption_batch(images[:8], num_beams=1,
                                                                                   max_length=MAX_LEN)
    assert [c.text for c in loaded] == [c.text for c in direct]
    with pytest.raises(ValueError, match="quantize"):
        ImageCaptioner.from_pretrained(tiny_checkpoint, quantize="int4")


def test_a_quantized_model_is_not_saved(int8_captioner, tmp_path):
    with pytest.raises(ValueError, match="quantized"):
        int8_captioner.save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8" / "model.safetensors").exists()


def test_quantizing_leaves_the_fp32_model_alone(tiny_trained_captioner, int8_captioner):
    assert not tiny_trained_captioner.quantized
    assert tiny_trained_captioner.step_kernels is None and isinstance(tiny_trained_captioner.encoder, ImageEncoder)
    assert any(isinstance(m, torch.nn.Linear) for m in tiny_trained_captioner.decoder.bert.encoder.modules())


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_cached_step_equals_transformers_cached_forward(precision):
    """The functional one-token step (`CachedBertDecoder`) against BertModel.forward with transformers' own KV
    cache, token by token: the same hidden states for fp32 and for the int8 layers (each linear sees the same
    one-token input, so int8 activation scales agree too)."""
    from conftest import build_tiny_captioner
    from caption_model.bert_parts import forward_with_cache
    from caption_model.cached_step import CachedBertDecoder

    model = build_tiny_captioner(seed=7).eval()
    if precision == "int8":
        model.quantize_int8()
    qkv = model.step_kernels.qkv if model.step_kernels else None  # int8: the fused q/k/v projection too
    rng = np.random.default_rng(3)
    pixels = model.preprocess([generate_shapes_example(rng).image for _ in range(2)])
    tokens = torch.randint(5, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        visual = model.encode(pixels)
        ours, past = CachedBertDecoder(model.decoder.bert, visual, qkv=qkv), None
        for t in range(tokens.shape[1]):
            theirs, past = forward_with_cache(model.decoder.bert, tokens[:, t:t + 1], visual, past)
            torch.testing.assert_close(ours(tokens[:, t:t + 1]), theirs, atol=1e-5, rtol=1e-5)
    assert ours.length == tokens.shape[1] and ours.cache[0][0].shape[2] == tokens.shape[1]


def test_fast_mode_runs_the_encoder_as_one_fused_graph_with_the_eager_grid(tiny_trained_captioner, images):
    """quantize_int8 traces the ResNet trunk into a frozen TorchScript graph (oneDNN Graph fuses its kernels):
    the grid is the eager one to float rounding, for the traced batch size and for others; the graph is not a
    submodule (no state_dict keys)."""
    fast = copy.deepcopy(tiny_trained_captioner).quantize_int8()
    assert isinstance(fast.encoder.graph, torch.jit.ScriptModule)
    assert not any(key.startswith("encoder.") for key in fast.state_dict())  # weights frozen into the graph
    assert isinstance(tiny_trained_captioner.encoder, ImageEncoder)  # the fp32 model runs eagerly
    with torch.inference_mode():
        for batch in (images[:1], images[:3], images[:1]):
            pixels = tiny_trained_captioner.preprocess(batch)
            torch.testing.assert_close(fast.encoder(pixels), tiny_trained_captioner.encoder(pixels),
                                       atol=1e-4, rtol=1e-4)
    assert not torch.jit.onednn_fusion_enabled()  # the global switch is only on while the graph runs


def test_the_fused_encoder_gives_the_same_grid_on_the_first_call_of_a_batch_size_as_on_later_ones(
        tiny_trained_captioner, images):
    """TorchScript runs a new input shape unoptimised on its first calls: FusedEncoder warms each shape on zeros,
    so features (and int8 captions) do not depend on how many batches of that size came before (caption-images
    on several processes writes the file one process writes)."""
    fast = copy.deepcopy(tiny_trained_captioner).quantize_int8()
    pixels = tiny_trained_captioner.preprocess(images[:5])
    with torch.inference_mode():
        first = fast.encoder(pixels)  # batch size 5: never seen by the graph
        for _ in range(3):
            assert torch.equal(fast.encoder(pixels), first)
    assert (5, 3, 64, 64) in fast.encoder.warmed


def test_concurrent_encoders_leave_the_fusion_switch_as_it_was(tiny_trained_captioner, images):
    """oneDNN fusion is a process-global TorchScript switch: two fast models encoding at once from 4 threads must
    not leave it on (or turn it off for the other while it runs)."""
    from concurrent.futures import ThreadPoolExecutor

    models = [copy.deepcopy(tiny_trained_captioner).quantize_int8() for _ in range(2)]
    pixels = tiny_trained_captioner.preprocess(images[:2])
    with torch.inference_mode():
        expected = tiny_trained_captioner.encoder(pixels)

        def encode(i):
            return models[i % 2].encoder(pixels)

        with ThreadPoolExecutor(4) as pool:
            grids = list(pool.map(encode, range(24)))
    for grid in grids:
        torch.testing.assert_close(grid, expected, atol=1e-4, rtol=1e-4)
    assert not torch.jit.onednn_fusion_enabled()

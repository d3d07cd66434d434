"""caption_model.cpu: the CPU's flags decide the int8 kernels; forced flags give every branch on any machine."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from caption_model.cpu.fast_mode import apply_fast_mode, choose_fast_mode
from caption_model.cpu.features import cpu_flags, describe_cpu, has_native_bf16, has_vnni, is_x86, usable_flags
from conftest import shapes_images

EPYC_ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma bmi2\n"
ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
ALDER_LAKE = "processor\t: 0\nflags\t\t: avx2 fma avx_vnni\n"
SKYLAKE_SP = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512vl\n"
XEON_AMX = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp\n"


@pytest.mark.parametrize("text, vnni, bf16", [(EPYC_ZEN3, False, False), (XEON_AMX, True, True),
                                              (GRAVITON, False, False)])
def test_flags_are_read_from_cpuinfo(tmp_path, text, vnni, bf16):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    flags = cpu_flags(path)
    assert flags and has_vnni(flags) is vnni and has_native_bf16(flags) is bf16


def test_an_unreadable_cpuinfo_means_no_flags(tmp_path):
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_arm_is_not_x86():
    assert is_x86("x86_64") and is_x86("AMD64") and not is_x86("aarch64") and not is_x86("arm64")


def _flags(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return cpu_flags(path)


@pytest.mark.parametrize("text, machine, mode", [
    (XEON_AMX, "x86_64", "int8-vnni"), (ZEN4, "x86_64", "int8-vnni"),
    (EPYC_ZEN3, "x86_64", "int8-avx2"), (SKYLAKE_SP, "x86_64", "int8-avx2"),
    (ALDER_LAKE, "x86_64", "int8-avx2"),  # AVX-VNNI only: fbgemm runs its AVX2 kernels there
    (GRAVITON, "aarch64", "fp32"), ("", "arm64", "fp32"),
], ids=["xeon-amx", "zen4", "zen3-avx2", "skylake-no-vnni", "alder-lake", "graviton", "apple"])
def test_the_fast_mode_chosen_for_each_cpu(tmp_path, monkeypatch, text, machine, mode):
    for name in ("FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    choice = choose_fast_mode("auto", flags=_flags(tmp_path, text), machine=machine)
    assert choice.mode == mode and choice.reason
    assert (choice.warning is not None) == (mode == "fp32")  # only the missing int8 engine warns


def test_the_fast_mode_can_be_overridden(tmp_path):
    avx2, vnni = _flags(tmp_path, EPYC_ZEN3), _flags(tmp_path, XEON_AMX)
    assert choose_fast_mode("fp32", flags=vnni, machine="x86_64").mode == "fp32"
    assert choose_fast_mode("int8-avx2", flags=vnni, machine="x86_64") .mode == "int8-avx2"
    forced = choose_fast_mode("int8-vnni", flags=avx2, machine="x86_64")
    assert forced.mode == "int8-vnni" and "saturate" in forced.warning  # allowed, but said
    assert choose_fast_mode("int8-vnni", flags=vnni, machine="aarch64").mode == "fp32"  # no engine: no choice
    with pytest.raises(ValueError, match="auto, int8-vnni, int8-avx2, fp32"):
        choose_fast_mode("int4", flags=vnni, machine="x86_64")


def test_an_avx2_cap_in_the_environment_hides_avx512_as_it_does_from_torch(tmp_path):
    """FBGEMM_ENABLE_INSTRUCTIONS=AVX2 / ATEN_CPU_CAPABILITY=avx2 (how an AVX2-only CPU is emulated) make the
    fast mode choose as it would there."""
    flags = _flags(tmp_path, XEON_AMX)
    assert usable_flags(flags, environ={}) == flags
    for environ in ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        capped = usable_flags(flags, environ=environ)
        assert "avx2" in capped and not has_vnni(capped) and not has_native_bf16(capped)


def test_describe_cpu_names_the_model_and_the_flags_that_matter(tmp_path, monkeypatch):
    for name in ("FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY"):  # an AVX2-capped run would hide avx512_vnni
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN4)
    text = describe_cpu(cpu_flags(path), cpuinfo=path)
    assert text.startswith("AMD EPYC 9R14 [") and "avx512_vnni" in text and "fpu" not in text


@pytest.mark.parametrize("mode", ["int8-vnni", "int8-avx2"])
def test_int8_captions_agree_with_fp32_in_either_mode(tiny_trained_captioner, mode):
    """Both kernels' numbers (8-bit weights for VNNI, 7-bit elsewhere) keep the tiny model's captions where the
    product serves them: 7-bit weights cannot saturate anywhere; 8-bit ones are exact with VNNI, while fbgemm's AVX2
    kernels saturate their int16 sums with them (which is why an AVX2 CPU gets int8-avx2, and a forced int8-vnni
    warns; benchmarks/int8_quality.py measures that case on an AVX2-capped process)."""
    model = copy.deepcopy(tiny_trained_captioner)
    model.encoder, model.step_kernels = apply_fast_mode(model, mode, encoder_bf16=False)
    model.fast_mode = mode
    layer = model.decoder.bert.encoder.layer[0].intermediate.dense
    largest = int(layer.weight().int_repr().int().abs().max())
    assert largest <= (128 if mode == "int8-vnni" else 64)
    assert largest > (64 if mode == "int8-vnni" else 32)  # the range is used, not wasted
    if mode == "int8-vnni" and not has_vnni(usable_flags()):
        pytest.skip("8-bit weights are exact only with AVX512-VNNI, which torch may not use on this CPU (an AVX2 "
                    "CPU is served int8-avx2: test_the_fast_mode_chosen_for_each_cpu)")
    images = shapes_images(24, seed=4242)
    for beams in (1, 3):
        fp32 = tiny_trained_captioner.caption_batch(images, num_beams=beams, max_length=20)
        fast = model.caption_batch(images, num_beams=beams, max_length=20)
        assert np.mean([a.text == b.text for a, b in zip(fp32, fast)]) >= 0.9
        assert all(a.words == b.words for a, b in zip(fp32, fast) if a.text == b.text)


def test_on_arm_the_fast_mode_stays_fp32_with_one_warning(tiny_trained_captioner, monkeypatch):
    import platform
    import warnings

    from caption_model.cpu.fast_mode import int8_available

    assert int8_available("x86_64") and not int8_available("aarch64") and not int8_available("arm64")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    model = copy.deepcopy(tiny_trained_captioner)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model.quantize_int8() is model
    assert [str(w.message) for w in caught if "int8" in str(w.message)] == [
        "int8 fast mode unavailable on this CPU (aarch64: no fbgemm); serving fp32"]
    assert not model.quantized and model.step_kernels is None  # nothing half-converted
    image = shapes_images(1, seed=5)[0]
    assert model.caption(image, num_beams=1).text == tiny_trained_captioner.caption(image, num_beams=1).text


AVX2_ONLY = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
AGREEMENT_SCRIPT = """
import json, sys
import numpy as np
from caption_model import ImageCaptioner
from caption_model.training.shapes import generate_shapes_example
rng = np.random.default_rng(4242)
images = [generate_shapes_example(rng).image for _ in range(24)]
fp32 = ImageCaptioner.from_pretrained(sys.argv[1]).eval()
fast = ImageCaptioner.from_pretrained(sys.argv[1]).quantize_int8()
same = [a.text == b.text for a, b in zip(fp32.caption_batch(images, num_beams=1, max_length=20),
                                         fast.caption_batch(images, num_beams=1, max_length=20))]
print(json.dumps({"mode": fast.fast_mode, "identical": float(np.mean(same))}))
"""


@pytest.mark.skipif(not is_x86() or "avx2" not in cpu_flags(),
                    reason="needs an x86-64 CPU with AVX2 (fbgemm's AVX2 kernels)")
def test_on_fbgemms_real_avx2_kernels_auto_picks_int8_avx2_and_keeps_the_captions(tiny_checkpoint):
    """A process capped at AVX2 (as an AVX2-only EPYC runs; fbgemm really switches kernels) chooses int8-avx2 by
    itself and its captions agree with fp32: the 7-bit weights do not saturate AVX2's 16-bit pair sums."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", AGREEMENT_SCRIPT, tiny_checkpoint], capture_output=True, text=True,
                          env={**os.environ, **AVX2_ONLY, "HF_HUB_OFFLINE": "1"}, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "int8-avx2" and result["identical"] >= 0.9

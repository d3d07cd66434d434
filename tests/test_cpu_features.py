"""caption_model.cpu: the CPU's flags decide the int8 kernels; forced flags give every branch on any machine."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from caption_model.cpu.fast_mode import apply_int8
from caption_model.cpu.features import cpu_flags, has_native_bf16, has_vnni, is_x86
from caption_model.cpu.int8 import int8_linear_class
from conftest import shapes_images

EPYC_ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma bmi2\n"
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


def test_vnni_gets_full_range_activations_others_seven_bits():
    assert int8_linear_class(True).__name__ == "Int8Linear"
    assert int8_linear_class(False).__name__ == "Int8LinearReducedRange"
    assert int8_linear_class(True) is int8_linear_class(True)  # one class per kind


@pytest.mark.parametrize("flags", [frozenset({"avx2", "avx512_vnni"}), frozenset({"avx2"})], ids=["vnni", "no-vnni"])
def test_int8_captions_agree_with_fp32_on_either_path(tiny_trained_captioner, flags):
    """The forced VNNI (8-bit activations) and non-VNNI (7-bit) kernels both keep the tiny model's captions."""
    model = copy.deepcopy(tiny_trained_captioner)
    model.encoder, model.step_kernels = apply_int8(model, encoder_bf16=False, flags=flags)
    model.fast_mode = "int8"
    layer = model.decoder.bert.encoder.layer[0].intermediate.dense
    assert type(layer) is int8_linear_class(has_vnni(flags))
    images = shapes_images(24, seed=4242)
    fp32 = tiny_trained_captioner.caption_batch(images, num_beams=1, max_length=20)
    int8 = model.caption_batch(images, num_beams=1, max_length=20)
    assert np.mean([a.text == b.text for a, b in zip(fp32, int8)]) >= 0.9


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

"""What this CPU can do, read from the kernel's CPU flags. Every decision takes the flags as a parameter, so tests
can force each branch (an AVX2-only EPYC, an AMX Xeon, an ARM laptop) on any machine."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The flags shown with benchmark figures: what decides the fast mode's kernels and the encoder's speed
REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                  "amx_int8", "asimd", "asimddp")


def cpu_flags(cpuinfo: str | Path = CPUINFO) -> frozenset[str]:
    """The instruction-set flags of the first CPU listed in `cpuinfo` (x86 `flags`, ARM `Features`); empty when
    the file is unreadable (macOS, Windows)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def usable_flags(flags: frozenset[str] | None = None, environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The flags torch's kernels may use: `flags` (default: this CPU's) less AVX-512 and AMX where the process caps
    torch at AVX2 (FBGEMM_ENABLE_INSTRUCTIONS=AVX2 or ATEN_CPU_CAPABILITY=avx2/default), so an AVX2-only CPU can
    be emulated on an AVX-512 one and the fast mode chooses as it would there. `environ` defaults to os.environ as
    it is at the call (looked up then: datasets' multi-process map rebinds os.environ to a copy)."""
    flags = cpu_flags() if flags is None else flags
    environ = os.environ if environ is None else environ
    capped = (environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper() == "AVX2"
              or environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default"))
    if not capped:
        return flags
    return frozenset(f for f in flags if not f.startswith(("avx512", "amx")))


def describe_cpu(flags: frozenset[str] | None = None, cpuinfo: str | Path = CPUINFO) -> str:
    """"<model name> [flags that matter here]" for benchmark output and /health."""
    flags = usable_flags(flags)
    model = platform.processor() or platform.machine()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
                break
    except OSError:
        pass
    return f"{model} [{' '.join(f for f in REPORTED_FLAGS if f in flags) or 'no SIMD flags read'}]"


def has_vnni(flags: frozenset[str]) -> bool:
    """AVX512-VNNI: fbgemm's int8 products accumulate straight into int32, so 8-bit weights x 8-bit activations
    cannot saturate. (AVX-VNNI without AVX-512 does not count: fbgemm runs its AVX2 kernels there.)"""
    return "avx512_vnni" in flags


def has_native_bf16(flags: frozenset[str]) -> bool:
    """bf16 convolutions in hardware (AMX or AVX512-BF16); elsewhere oneDNN emulates them, slower than fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def is_x86(machine: str | None = None) -> bool:
    """fbgemm (torch's x86 int8 engine) exists only on x86-64."""
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i386", "i686")

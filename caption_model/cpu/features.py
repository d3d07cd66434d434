"""What this CPU can do, read from the kernel's CPU flags. Every decision takes the flags as a parameter, so tests
can force each branch (an AVX2-only EPYC, an AMX Xeon, an ARM laptop) on any machine."""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


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


def has_vnni(flags: frozenset[str]) -> bool:
    """int8 dot products that accumulate in int32 (AVX512-VNNI or AVX-VNNI): 8-bit activations cannot saturate."""
    return bool({"avx512_vnni", "avx_vnni"} & flags)


def has_native_bf16(flags: frozenset[str]) -> bool:
    """bf16 convolutions in hardware (AMX or AVX512-BF16); elsewhere oneDNN emulates them, slower than fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def is_x86(machine: str | None = None) -> bool:
    """fbgemm (torch's x86 int8 engine) exists only on x86-64."""
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i386", "i686")

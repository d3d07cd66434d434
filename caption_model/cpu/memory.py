"""How the process's memory allocator treats the large blocks torch frees: kept for reuse while training, handed
back to the operating system after the fast mode drops the fp32 weights."""

from __future__ import annotations

import ctypes
import gc

# glibc's mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
REUSE_BLOCKS_UP_TO = 32 << 20  # bytes: glibc's largest heap-served block (DEFAULT_MMAP_THRESHOLD_MAX on 64 bits)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, Windows, musl)
        return None


def return_freed_memory_to_the_os() -> None:
    """glibc keeps large freed blocks in the process heap; malloc_trim hands them back (a no-op elsewhere)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_freed_memory_for_reuse(block_bytes: int = REUSE_BLOCKS_UP_TO) -> bool:
    """Serve blocks up to `block_bytes` from the heap and keep what is freed there, instead of glibc's default of
    mapping each large block afresh and unmapping it on free. A CPU training step frees and reallocates the same
    activations every step; by default each reallocation page-faults its memory in again (~15,000 minor faults,
    ~60 MB zeroed by the kernel per step of the shapes preset, ~7 % of the step's time). Costs ~100 MB of resident
    memory held for reuse. Returns False where the C library is not glibc (nothing changed)."""
    libc = _glibc()
    if libc is None:
        return False
    settings = ((M_MMAP_THRESHOLD, block_bytes), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 << 20))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)

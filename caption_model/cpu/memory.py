"""Give freed weight memory back to the operating system."""

from __future__ import annotations

import ctypes
import gc


def return_freed_memory_to_the_os() -> None:
    """glibc keeps large freed blocks in the process heap; malloc_trim hands them back (a no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        pass

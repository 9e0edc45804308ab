"""Giving memory back to the operating system (the WebUI process must not stay at a run's peak).

glibc keeps freed heap pages for reuse: after a run, or after a file written tensor by tensor,
the process would stay as big as its peak until it is restarted. ``malloc_trim`` hands free pages
back (on Linux with glibc; elsewhere there is nothing to do: Windows' heap and macOS' allocator
release large blocks themselves).
"""
from __future__ import annotations

import gc
import sys


def trim_heap() -> None:
    """Return the heap's free pages to the operating system (glibc only; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim
        pass


def give_memory_back() -> None:
    """After a job: collect what it dropped, empty the CUDA cache, trim the heap."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


class TrimEvery:
    """Call :func:`trim_heap` once ``bytes_between`` bytes have gone through :meth:`add` (for loops
    that allocate and free one tensor after another)."""

    def __init__(self, bytes_between: int = 64 << 20):
        self.bytes_between, self._pending = bytes_between, 0

    def add(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._pending >= self.bytes_between:
            self._pending = 0
            trim_heap()

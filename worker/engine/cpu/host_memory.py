"""Host allocator settings for engine processes (glibc malloc).

A packed prefill step allocates activation tensors of tens of megabytes ([4096, 1408] fp32 is 23 MB).
glibc serves blocks above its mmap threshold with fresh `mmap` calls and returns freed heap tops to the
OS, so every step page-faults its activations in again: measured on the 2-core CI machine, a
`silu` of that size took 31 ms inside a prefill step against 1.3 ms on reused memory, and the first
W1 prefill step 2.0 s against 1.3 s with the settings below. Raising the mmap threshold to glibc's
maximum (32 MiB) and never trimming keeps freed activations in the heap for the next step; the heap
then stays at its high-water mark, which is what a serving process wants anyway.

CUDA tensors are unaffected (the caching allocator already reuses memory). Off glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper bound on 64-bit (4 * 1024 * 1024 * sizeof(long))
_done = False


def keep_freed_memory() -> bool:
    """Tune glibc malloc once per process as above; True if the settings took effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if ok:
        _done = True
        log.debug("malloc: mmap threshold %d bytes, no heap trimming", _MMAP_THRESHOLD_MAX)
    return ok

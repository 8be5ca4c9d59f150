"""Host allocator settings for engine processes (glibc malloc).

A packed prefill step allocates activation tensors of tens of megabytes ([4096, 1408] fp32 is 23 MB).
glibc serves blocks above its mmap threshold with fresh `mmap` calls and returns freed heap tops to the
OS, so every step page-faults its activations in again: measured on the 2-core CI machine, a
`silu` of that size took 31 ms inside a prefill step against 1.3 ms on reused memory, and the first
W1 prefill step 2.0 s against 1.3 s with the settings below. Raising the mmap threshold to glibc's
maximum (32 MiB) and never trimming keeps freed activations in the heap for the next step; the heap
then stays at its high-water mark, which is what a serving process wants anyway.

Above that 32 MiB every block is mmap'd however the threshold is set, and page-faulted in 4 KiB at a time
on first touch: a beam step's logits ([256, 58101] fp32, 60 MB) and the temporaries of its size, every step
-- W4 beam 4 (int8, 128 sentences) took ~2 million minor faults and 5-7 s of system time in a 20-25 s run.
Turning mmap off keeps them in the heap, but torch's 64-byte-aligned blocks then strand freed holes that
the next block of the same size does not fit (the heap grew 58 MB per step in a loop of one size): not
done. Instead torch's CPU allocator is asked for transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`: blocks
of 2 MiB and more aligned to 2 MiB and `madvise(MADV_HUGEPAGE)`, as the kernel's default "madvise" mode
wants), one fault per 2 MiB: that run fell to ~50-90 thousand faults and ~2 s of system time, 1.1-1.2x the
tokens per second. torch reads the variable once, at its first allocation, so the worker package sets it
when it is imported, before torch (`huge_pages_for_large_tensors`); an explicit value in the environment
wins (`THP_MEM_ALLOC_ENABLE=0` turns it off).

CUDA tensors are unaffected (the caching allocator already reuses memory). Off glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper bound on 64-bit (4 * 1024 * 1024 * sizeof(long))
_done = False
THP_ENV = "THP_MEM_ALLOC_ENABLE"


def huge_pages_for_large_tensors() -> bool:
    """Ask torch's CPU allocator for transparent huge pages (module docstring), unless the environment says
    otherwise; True if this process's torch will use them. Only takes effect before torch is imported."""
    if "torch" not in sys.modules:
        os.environ.setdefault(THP_ENV, "1")
    return os.environ.get(THP_ENV) == "1" and sys.platform.startswith("linux")


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

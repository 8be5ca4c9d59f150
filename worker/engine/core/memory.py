"""How much memory a KV pool may take: free bytes on the engine's device."""

from __future__ import annotations

import os

import torch

FALLBACK_FREE_MEMORY = 1 << 30  # when the platform cannot tell (no SC_AVPHYS_PAGES)


def free_device_memory(device: torch.device) -> int:
    """Free bytes on `device`: CUDA's own count, else the host's available physical memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return FALLBACK_FREE_MEMORY

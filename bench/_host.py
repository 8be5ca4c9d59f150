"""Imported by each benchmark before torch: the worker's host settings (torch's CPU allocator asked for
transparent huge pages, `worker/engine/cpu/host_memory.py`), so in-process engine rows run as the worker's do."""

from pagedq.worker.engine.cpu.host_memory import huge_pages_for_large_tensors

huge_pages_for_large_tensors()

"""pagedq worker: Celery tasks, model registry loading and the inference engine."""

from pagedq.worker.engine.cpu.host_memory import huge_pages_for_large_tensors

huge_pages_for_large_tensors()  # before anything imports torch (engine/cpu/host_memory.py)

"""The engine: one thread micro-batching every request through its model's executor (see service.py)."""

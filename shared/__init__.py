"""pagedq contracts: request/result models, settings, errors, Celery configuration.

Imported by both the producer (client, HTTP API, CLI) and the worker. Never imports torch.
"""

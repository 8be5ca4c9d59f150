"""pagedq producer: what apps use to enqueue NLP tasks and fetch their results.

- `pagedq.producer.client`: `Client` (straight onto Redis) and `HTTPClient` (over the HTTP API);
- `pagedq.producer.api`: the FastAPI app (`uvicorn pagedq.producer.api:app`, needs the `api` extra);
- `pagedq.producer.cli`: the `pagedq` command.

Nothing here imports torch or transformers: a client-only install has neither.
"""

from pagedq.producer.client import Client, HTTPClient, TaskHandle
from pagedq.producer.errors import APIError, TaskAlreadyFinished, TaskFailed

__all__ = ["APIError", "Client", "HTTPClient", "TaskAlreadyFinished", "TaskFailed", "TaskHandle"]

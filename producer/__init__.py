"""pagedq producer: what apps use to enqueue NLP tasks and fetch their results.

- `producer.client`: `Client` (straight onto Redis) and `HTTPClient` (over the HTTP API);
- `producer.api`: the FastAPI app (`uvicorn producer.api:app`, needs the `api` extra);
- `producer.cli`: the `pagedq` command.

Nothing here imports torch or transformers: a client-only install has neither.
"""

from producer.client import Client, HTTPClient, TaskHandle
from producer.errors import APIError, TaskAlreadyFinished, TaskFailed

__all__ = ["APIError", "Client", "HTTPClient", "TaskAlreadyFinished", "TaskFailed", "TaskHandle"]

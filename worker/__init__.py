"""pagedq worker: Celery tasks, model registry loading and the inference engine."""

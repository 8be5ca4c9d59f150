"""`python -m producer ...` is the `pagedq` command."""

from producer.cli import app

app()

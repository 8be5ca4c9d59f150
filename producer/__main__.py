"""`python -m producer ...` is the `pagedq` command."""

from pagedq.producer.cli import app

app()

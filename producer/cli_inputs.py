"""Where the CLI's inputs come from: arguments, a file of lines, stdin, or JSON lines (bulk QA).

Each input keeps a label (`argument 2`, `line 7 of texts.txt`) so a validation error can point at it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STDIN = "-"


class InputError(ValueError):
    """Input the CLI cannot even read (no input, unreadable file, a line that is not JSON)."""


@dataclass
class Inputs:
    """Request fields of each input, in order, with a label per input."""

    items: list[dict[str, Any]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def add(self, item: dict[str, Any], label: str) -> None:
        self.items.append(item)
        self.labels.append(label)


def text_inputs(texts: list[str] | None, file: str | None) -> Inputs:
    """`{"text": ...}` per TEXT argument, or per non-blank line of `file` (`-` or a lone TEXT `-`: stdin)."""
    texts = texts or []
    if texts == [STDIN] and file is None:
        texts, file = [], STDIN
    if texts and file is not None:
        raise InputError("give TEXT arguments or --file, not both")
    inputs = Inputs()
    if file is not None:
        for label, line in _lines(file):
            inputs.add({"text": line}, label)
    for number, text in enumerate(texts, start=1):
        inputs.add({"text": text}, f"argument {number}")
    if not inputs.items:
        raise InputError("no input: give TEXT arguments, --file FILE, or - to read lines from stdin")
    return inputs


def jsonl_inputs(file: str) -> Inputs:
    """One JSON object of request fields per non-blank line of `file` (`-`: stdin)."""
    inputs = Inputs()
    for label, line in _lines(file):
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{label}: not valid JSON: {exc}") from None
        if not isinstance(item, dict):
            raise InputError(f"{label}: expected a JSON object of request fields")
        inputs.add(item, label)
    if not inputs.items:
        raise InputError(f"no input: {_name(file)} has no JSON lines")
    return inputs


def _lines(file: str) -> list[tuple[str, str]]:
    """Non-blank lines with their labels; the line numbers count blank lines too."""
    try:
        content = sys.stdin.read() if file == STDIN else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {_name(file)}: {exc}") from None
    name = _name(file)
    return [(f"line {n} of {name}", line) for n, line in enumerate(content.splitlines(), start=1) if line.strip()]


def _name(file: str) -> str:
    return "stdin" if file == STDIN else file

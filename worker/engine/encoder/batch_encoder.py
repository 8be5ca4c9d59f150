"""Tokenization that any thread may run: `tokenizer(texts, truncation=False)`, exactly, without its Python.

A transformers fast tokenizer is not safe to share between threads: every call writes its truncation and
padding settings into the Rust tokenizer it wraps (`set_truncation_and_padding`), so two threads with different
settings race (and the Rust side raises "Already borrowed"). `BatchEncoder` owns a private copy of that Rust
tokenizer, configured once (no truncation, no padding) and never changed again, so `encode` may run in any
number of threads at once -- the Celery task threads tokenize a message's texts before handing them to the
engine thread (`ModelExecutor.prepare`), and the Rust encoder releases the GIL while it works.

It also skips what `__call__` spends in Python around the Rust call (argument checks, `BatchEncoding`, a dict
per text): the model inputs are read straight off each `Encoding`. And it asks the Rust side for no character
offsets (`encode_batch_fast`, tokenizers >= 0.21: the same ids, type ids and masks; the offsets are what a
classifier never reads): measured on the demo classifier's tokenizer, 7 texts of ~31 tokens, one thread,
0.27 against 0.52 ms.

Exactness: used only where it provably computes what `tokenizer(texts, truncation=False)` computes -- a
`TokenizersBackend` whose class overrides neither `__call__`, `_encode_plus` nor `_convert_encoding`, has no
input/target mode switch, and whose model inputs are among `input_ids`, `token_type_ids` and
`attention_mask` -- and then only if a load-time self-check over `PROBES` gives the same ids as the tokenizer.
Anything else gets None and keeps the transformers path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

#: model input name -> the `tokenizers.Encoding` attribute holding it
_ATTRIBUTES = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}

#: texts the self-check tokenizes both ways: cases, accents, CJK, emoji, digits, punctuation, runs of spaces,
#: a special token's text, an empty string and a long text
PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "  Leading and   repeated   spaces\tand a tab\nand a newline  ",
    "Ça coûte 3,50 € -- naïve café, Straße, ÅNGSTRÖM!",
    "東京は日本の首都です。 北京 欢迎你",
    "emoji 😀🚀 and symbols #$%^&*()_+{}|:\"<>?",
    "[CLS] <s> </s> [SEP] <pad> [MASK] <unk>",
    "",
    "word " * 300,
)


class BatchEncoder:
    """Thread-safe `tokenizer(texts, truncation=False)` for one tokenizer (see the module docstring)."""

    def __init__(self, backend: Any, input_names: Sequence[str]) -> None:
        self._backend = backend
        self._columns = [(name, _ATTRIBUTES[name]) for name in input_names]
        # without offsets where this tokenizers has it (the self-check compares what it returns)
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, input_names: Sequence[str]) -> BatchEncoder | None:
        """A `BatchEncoder` computing exactly what `tokenizer(texts, truncation=False)` computes for
        `input_names`, or None where that cannot be shown (the caller keeps calling the tokenizer)."""
        reason = _unsupported_reason(tokenizer, input_names)
        if reason is None:
            try:
                encoder = cls(_private_copy(tokenizer), input_names)
                reason = encoder._self_check(tokenizer)
            except Exception as exc:  # noqa: BLE001 - any surprise keeps the transformers path
                reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            log.info("tokenizing through transformers' %s call: %s", type(tokenizer).__name__, reason)
            return None
        return encoder

    def encode(self, texts: Sequence[str]) -> list[dict[str, list[int]]]:
        """The model inputs of each text, unpadded and untruncated, in `input_names` order."""
        encodings = self._encode_batch(list(texts), add_special_tokens=True)
        columns = self._columns
        return [{name: getattr(enc, attribute) for name, attribute in columns} for enc in encodings]

    def _self_check(self, tokenizer: Any) -> str | None:
        expected = tokenizer(list(PROBES), truncation=False, verbose=False)
        for row, got in enumerate(self.encode(PROBES)):
            for name, _ in self._columns:
                if got[name] != expected[name][row]:
                    return f"the self-check gave other {name} for {PROBES[row][:40]!r}"
        return None


def _unsupported_reason(tokenizer: Any, input_names: Sequence[str]) -> str | None:
    try:
        from tokenizers import Tokenizer
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError as exc:  # another transformers layout: keep its own path
        return f"no TokenizersBackend in this transformers ({exc})"
    kind = type(tokenizer)
    if not isinstance(tokenizer, TokenizersBackend):
        return "not a fast tokenizer"
    if not isinstance(getattr(tokenizer, "_tokenizer", None), Tokenizer):
        return "no Rust tokenizer inside"
    overridden = [name for name, base in (("__call__", PreTrainedTokenizerBase), ("_encode_plus", TokenizersBackend),
                                          ("_convert_encoding", TokenizersBackend))
                  if getattr(kind, name) is not getattr(base, name)]
    if overridden:
        return f"{kind.__name__} overrides {', '.join(overridden)}"
    if hasattr(tokenizer, "_switch_to_input_mode"):
        return f"{kind.__name__} switches between input and target modes"
    others = sorted(set(input_names) - set(_ATTRIBUTES))
    if others:
        return f"model inputs {others} are not read off an Encoding"
    return None


def _private_copy(tokenizer: Any) -> Any:
    """The Rust tokenizer, copied, with the settings `tokenizer(texts, truncation=False)` would write."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer._tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(tokenizer.split_special_tokens)
    return backend

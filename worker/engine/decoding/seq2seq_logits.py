"""generate's logits processors for a seq2seq step's rows, where every row has its own length and settings.

The processors themselves are shared with the causal-LM path (`logits_processors`); this module maps a
request's `DecodeSettings` onto them. An encoder-decoder row's prefix is its decoder start token, so
`cur_len` counts decoder tokens including it (generate's `input_ids.shape[-1]`) and `max_length` =
`max_new_tokens + 1`. `DecodeSettings` carries no_repeat_ngram_size, bad_words_ids, min_length /
min_new_tokens and forced BOS/EOS; the other processors send a request to the `generate` fallback
(`seq2seq_options.UNSUPPORTED_WHEN_SET`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from pagedq.worker.engine.decoding.logits_processors import (
    ProcessorSettings,
    Row,
    _early_bans,
    _forced_token,
    _late_bans,
    process_rows,
)
from pagedq.worker.engine.decoding.seq2seq_options import DECODER_START_TOKENS, DecodeSettings


def process_scores(scores: torch.Tensor, rows: Sequence[tuple[DecodeSettings, Sequence[int]]]) -> torch.Tensor:
    """Apply each row's processors in place to `scores` [N, vocab]; `rows[i]` = (settings, decoder tokens)."""
    return process_rows(
        scores, [Row(_processors(s), tokens, DECODER_START_TOKENS, s.max_new_tokens) for s, tokens in rows]
    )


def bans_and_forced(settings: DecodeSettings, tokens: Sequence[int]) -> tuple[list[int], int | None]:
    """What the processors do to one row: the tokens they ban, and the token they force (or None).

    A row with no forced token is its scores with the banned ones at -inf (`process_scores` does nothing
    else: the seq2seq settings carry no repetition penalty); a forced row is -inf but the forced token."""
    row = Row(_processors(settings), tokens, DECODER_START_TOKENS, settings.max_new_tokens)
    return _early_bans(row) + _late_bans(row), _forced_token(row)


@lru_cache(maxsize=1024)
def _processors(settings: DecodeSettings) -> ProcessorSettings:
    return ProcessorSettings(
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        bad_words_ids=settings.bad_words_ids,
        eos_token_ids=settings.eos_token_ids,
        min_length=settings.min_length,
        min_new_tokens=settings.min_new_tokens,
        forced_bos_token_id=settings.forced_bos_token_id,
        forced_eos_token_id=settings.forced_eos_token_id,
    )

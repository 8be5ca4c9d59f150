"""generate's logits processors for the rows of a continuous batch, each row with its own settings and length.

transformers' processors assume one `cur_len` and one set of options per `generate` call; in a continuous batch
every row differs, so the processors the engines honour are re-implemented here, vectorised over rows, with
generate's results and in generate's order (`GenerationMixin._get_logits_processor`):

    1. repetition_penalty     tokens already in the row: score * p where negative, score / p otherwise
    2. no_repeat_ngram_size   ban tokens completing an n-gram the row already contains
    3. bad_words_ids          ban single tokens always; a longer word's last token after its prefix
    4. min_length / min_new_tokens   ban EOS while the row is too short
    5. forced_bos_token_id    the token at cur_len == 1
    6. forced_eos_token_id    the last token `max_new_tokens` allows
    7. suppress_tokens        banned always
    8. begin_suppress_tokens  banned for the first generated token

A row's `tokens` are what generate's `input_ids` would hold for that sequence alone: its prefix (a causal LM's
prompt, an encoder-decoder's decoder start token) then the generated tokens; `cur_len = len(tokens)` and lengths
are in that unit, as in generate. Bans are -inf; forcing leaves 0 on the forced token and -inf elsewhere. They
apply to raw logits for greedy and sampling (before temperature and the warpers) and to log-softmaxed scores
for beam search, as in generate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class ProcessorSettings:
    """One request's processors, resolved once (request option over generation_config); defaults are "off"."""

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # EOS-only words dropped, as generate does
    eos_token_ids: tuple[int, ...] = ()  # banned while the row is shorter than the minimum
    min_length: int = 0  # generate's unit: cur_len, prefix included
    min_new_tokens: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def masks_only(self) -> bool:
        """Whether the processors only ban or force tokens (exact in any dtype: -inf and 0 are)."""
        return self.repetition_penalty == 1.0

    @property
    def active(self) -> bool:
        """Whether any processor can change a score (EOS ids alone do nothing)."""
        return (
            self.repetition_penalty != 1.0
            or self.no_repeat_ngram_size > 0
            or bool(self.bad_words_ids or self.suppress_tokens or self.begin_suppress_tokens)
            or (bool(self.eos_token_ids) and (self.min_length > 0 or self.min_new_tokens > 0))
            or self.forced_bos_token_id is not None
            or self.forced_eos_token_id is not None
        )


NO_PROCESSORS = ProcessorSettings()


class Row(NamedTuple):
    """One scores row's state: `tokens` = prefix + generated (generate's `input_ids` for it alone)."""

    settings: ProcessorSettings
    tokens: Sequence[int]
    num_prefix: int  # tokens that were not generated: the prompt, or the decoder start token
    max_new_tokens: int


def process_rows(scores: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Apply each row's processors in place to `scores` [len(rows), vocab], in generate's order."""
    _repetition_penalty(scores, rows)
    _ban(scores, [_early_bans(row) for row in rows])
    for i, row in enumerate(rows):
        token = _forced_token(row)
        if token is not None:
            scores[i] = NEG_INF
            scores[i, token] = 0.0
    _ban(scores, [_late_bans(row) for row in rows])
    return scores


def bans_and_forced(row: Row) -> tuple[list[int], int | None]:
    """What the processors do to one row without a repetition penalty: the tokens they ban, and the token they
    force (or None). Such a row's processed scores are its scores with the banned ones at -inf; a forced row
    is -inf but the forced token (0)."""
    assert row.settings.repetition_penalty == 1.0, "a repetition penalty changes scores, not only masks them"
    return _early_bans(row) + _late_bans(row), _forced_token(row)


def _repetition_penalty(scores: torch.Tensor, rows: Sequence[Row]) -> None:
    """RepetitionPenaltyLogitsProcessor over each row's tokens (ids past the scores' vocab are skipped, as
    generate does), one gather/scatter per distinct penalty with generate's scalar arithmetic."""
    vocab = scores.shape[-1]
    groups: dict[float, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for i, row in enumerate(rows):
        penalty = row.settings.repetition_penalty
        if penalty != 1.0:
            seen = [t for t in set(row.tokens) if 0 <= t < vocab]
            groups[penalty][0].extend([i] * len(seen))
            groups[penalty][1].extend(seen)
    for penalty, (row_ids, token_ids) in groups.items():
        idx = torch.tensor(row_ids, device=scores.device), torch.tensor(token_ids, device=scores.device)
        picked = scores[idx]
        scores[idx] = torch.where(picked < 0, picked * penalty, picked / penalty)


def _ban(scores: torch.Tensor, banned: Sequence[list[int]]) -> None:
    rows = [i for i, tokens in enumerate(banned) for _ in tokens]
    if rows:
        tokens = [t for ts in banned for t in ts]
        idx = torch.tensor(rows, device=scores.device), torch.tensor(tokens, device=scores.device)
        scores.index_put_(idx, torch.tensor(NEG_INF, dtype=scores.dtype, device=scores.device))


def _early_bans(row: Row) -> list[int]:
    """no_repeat_ngram_size, bad_words_ids, min_length / min_new_tokens (generate's steps 2-4)."""
    s, tokens = row.settings, row.tokens
    cur_len = len(tokens)
    banned: list[int] = []
    n = s.no_repeat_ngram_size
    if n and cur_len >= n:
        prefix = list(tokens[cur_len + 1 - n :]) if n > 1 else []
        banned.extend(tokens[i + n - 1] for i in range(cur_len - n + 1) if list(tokens[i : i + n - 1]) == prefix)
    for word in s.bad_words_ids:
        if len(word) == 1:
            banned.append(word[0])
        elif len(word) - 1 <= cur_len and tuple(tokens[cur_len - len(word) + 1 :]) == word[:-1]:
            banned.append(word[-1])
    too_short = cur_len < s.min_length or cur_len - row.num_prefix < s.min_new_tokens
    if too_short:
        banned.extend(s.eos_token_ids)
    return banned


def _forced_token(row: Row) -> int | None:
    s, cur_len = row.settings, len(row.tokens)
    token = None
    if s.forced_bos_token_id is not None and cur_len == 1:
        token = s.forced_bos_token_id
    if s.forced_eos_token_id is not None and cur_len - row.num_prefix == row.max_new_tokens - 1:
        token = s.forced_eos_token_id
    return token


def _late_bans(row: Row) -> list[int]:
    """suppress_tokens always; begin_suppress_tokens at generate's `begin_index` (the first generated token,
    one later when a one-token prefix is followed by a forced BOS)."""
    s = row.settings
    banned = list(s.suppress_tokens)
    if s.begin_suppress_tokens:
        begin = row.num_prefix + (1 if row.num_prefix == 1 and s.forced_bos_token_id is not None else 0)
        if len(row.tokens) == begin:
            banned.extend(s.begin_suppress_tokens)
    return banned

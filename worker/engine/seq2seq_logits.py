"""generate's logits processors for a step's rows, where every row has its own length and settings.

transformers' processors assume one `cur_len` per batch; in a continuous batch rows differ, so the
ones `DecodeSettings` carries are re-implemented here, vectorised over rows, with the same results
(-inf bans and "all -inf but one 0" forcing, in generate's order):

    1. no_repeat_ngram_size   ban tokens completing an n-gram the row already contains
    2. bad_words_ids          ban single tokens always; a longer word's last token after its prefix
    3. min_length / min_new_tokens   ban EOS while the row is too short
    4. forced_bos_token_id    the first generated token (cur_len == 1)
    5. forced_eos_token_id    the last one (cur_len == max_length - 1)

They apply to raw logits for greedy and sampling and to log-softmaxed scores for beam search, as in
generate. `cur_len` counts decoder tokens including the start token (generate's `input_ids.shape[-1]`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.engine._generation import DecodeSettings

NEG_INF = float("-inf")


def process_scores(scores: torch.Tensor, rows: Sequence[tuple[DecodeSettings, Sequence[int]]]) -> torch.Tensor:
    """Apply each row's processors in place to `scores` [N, vocab]; `rows[i]` = (settings, decoder tokens)."""
    bans_r: list[int] = []
    bans_t: list[int] = []
    forced: list[tuple[int, int]] = []
    for i, (settings, tokens) in enumerate(rows):
        banned = _banned_tokens(settings, tokens)
        bans_r.extend([i] * len(banned))
        bans_t.extend(banned)
        token = _forced_token(settings, len(tokens))
        if token is not None:
            forced.append((i, token))
    if bans_r:
        idx = torch.tensor(bans_r, device=scores.device), torch.tensor(bans_t, device=scores.device)
        scores.index_put_(idx, torch.tensor(NEG_INF, dtype=scores.dtype, device=scores.device))
    for i, token in forced:
        scores[i] = NEG_INF
        scores[i, token] = 0.0
    return scores


def _banned_tokens(settings: DecodeSettings, tokens: Sequence[int]) -> list[int]:
    cur_len = len(tokens)
    banned: list[int] = []
    n = settings.no_repeat_ngram_size
    if n and cur_len >= n:
        prefix = list(tokens[cur_len + 1 - n :]) if n > 1 else []
        banned.extend(tokens[i + n - 1] for i in range(cur_len - n + 1) if list(tokens[i : i + n - 1]) == prefix)
    for word in settings.bad_words_ids:
        if len(word) == 1:
            banned.append(word[0])
        elif len(word) - 1 <= cur_len and tuple(tokens[cur_len - len(word) + 1 :]) == word[:-1]:
            banned.append(word[-1])
    too_short = cur_len < settings.min_length or cur_len - 1 < settings.min_new_tokens
    if too_short and settings.eos_token_ids:
        banned.extend(settings.eos_token_ids)
    return banned


def _forced_token(settings: DecodeSettings, cur_len: int) -> int | None:
    token = None
    if settings.forced_bos_token_id is not None and cur_len == 1:
        token = settings.forced_bos_token_id
    if settings.forced_eos_token_id is not None and cur_len == settings.max_length - 1:
        token = settings.forced_eos_token_id
    return token

"""Beam search for many requests at once, step by step, reproducing transformers 5.24 `_beam_search` exactly.

generate keeps, per batch item, `num_beams` running beams and `num_beams` finished hypotheses; each step
(`generation/utils.py`: `_get_top_k_continuations`, `_get_running_beams_for_next_iteration`,
`_update_finished_beams`, `_check_early_stop_heuristic`, `_beam_search_has_unfinished_sequences`):

    scores[b, v] = log_probs[b, v] + running_score[b]            (processed log-softmax of beam b)
    top K = max(2, 1 + #eos) * num_beams candidates over all (b, v)
    a candidate "hits" if v is EOS or its length reaches max_length
    running <- best num_beams candidates that do not hit (hits get -1e9)
    finished <- best num_beams of (finished, the top num_beams candidates that hit, scored
                score / new_len ** length_penalty), unless the item is already settled
    done when no running beam can beat the worst finished one (the heuristic depends on
    early_stopping), all beams are finished and early_stopping is True, or every candidate hits

Every item of a batch evolves independently there, so one request here equals its row in any generate
batch. `step_beams` steps every request of an engine step together, one tensor op for all of them where
generate does one for its batch:

- the top K of a request's num_beams x vocab scores are among the top K of each beam's own row (adding a
  beam's running score shifts its row uniformly), so the caller passes each beam row's best K (one pass
  over all beam rows: `beam_topk.top_k_rows`), and the request's top K are picked from its num_beams x K
  survivors (the same fp32 sums generate forms; an exact fp32 tie between two candidates may be ordered
  differently than generate's `topk` over the whole row would order it, as two of its own kernels could);
- the rest is generate's fp32 arithmetic on [requests, ...] tensors with each request's own length
  penalty, lengths and early stopping (`x / float` and `x / tensor` of the same fp32 value are equal);
- between steps a request's state is plain Python (fp32 values held exactly as floats).

Beams start as generate starts them: `num_beams` copies of the prompt (a causal LM's prompt, an encoder-decoder's
decoder start token), the first with score 0 and the others with -1e9. Causal LMs and encoder-decoder models
share it through `decoding.step`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagedq.worker.engine.decoding.seq2seq_options import DecodeSettings

PENALTY = -1.0e9


class BeamSearch:
    """The beam state of one request between steps (`step_beams` advances it)."""

    def __init__(
        self,
        num_beams: int,
        length_penalty: float,
        early_stopping: bool | str,
        eos_token_ids: Sequence[int],
        max_length: int,
        prompt: Sequence[int],
    ) -> None:
        """`max_length` and `prompt` in generate's unit: the decoder-side tokens (a causal LM's prompt, an
        encoder-decoder's start token) plus the generated ones."""
        nb = self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_length = max_length
        self.prompt_len = self.cur_len = len(prompt)
        self.eos = tuple(eos_token_ids)
        self.num_candidates = max(2, 1 + len(self.eos)) * nb
        self.running_scores: list[float] = [0.0] + [PENALTY] * (nb - 1)
        self.finished_scores: list[float] = [PENALTY] * nb
        self.finished_tokens: list[list[int]] = [list(prompt) for _ in range(nb)]
        self.is_sent_finished: list[bool] = [False] * nb
        self.improvement_possible = True
        self.done = False

    @classmethod
    def for_settings(cls, settings: DecodeSettings, prompt: Sequence[int]) -> BeamSearch:
        """An encoder-decoder request's search (`prompt`: its decoder start token)."""
        return cls(settings.num_beams, settings.length_penalty, settings.early_stopping, settings.eos_token_ids,
                   settings.max_length, prompt)  # fmt: skip

    @property
    def group(self) -> tuple[int, int, tuple[int, ...]]:
        """Searches stepped together in one set of tensors share these."""
        return (self.num_beams, self.num_candidates, self.eos)

    def step(self, log_probs: torch.Tensor, beam_tokens: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """One step of this search alone: `log_probs` [num_beams, vocab], the processed log-softmax of each
        running beam (`step_beams` of one, with torch's `topk` of each row)."""
        values, tokens = torch.topk(log_probs.float(), k=min(self.num_candidates, log_probs.shape[-1]))
        return step_beams([self], values, tokens, [beam_tokens])[0]

    def best(self) -> list[int]:
        """The best finished hypothesis (its prompt included), as generate returns it."""
        return self.finished_tokens[0]

    def best_output(self) -> list[int]:
        """The generated tokens of the best finished hypothesis."""
        return self.finished_tokens[0][self.prompt_len :]


def step_beams(
    searches: Sequence[BeamSearch],
    row_scores: torch.Tensor,
    row_tokens: torch.Tensor,
    beam_tokens: Sequence[Sequence[Sequence[int]]],
) -> list[list[tuple[int, int]]]:
    """Advance `searches` (all of one `group`) by one step.

    `row_scores` [len(searches) * num_beams, k] fp32: the best k (at least min(num_candidates, vocab)) processed
    log-probabilities of every running beam, search after search, best first; `row_tokens` their token ids;
    `beam_tokens[i][b]`: the tokens of search i's beam b. Returns, per search, its next running beams as
    (parent beam, token), best first (empty once `done`)."""
    first = searches[0]
    nb, num_k = first.num_beams, first.num_candidates
    assert all(s.group == first.group for s in searches), "one group per call"
    n, per_row = len(searches), row_scores.shape[-1]
    dev = row_scores.device
    f32 = torch.float32

    # top K of each request over num_beams x vocab, from the best of each beam's row
    running = torch.tensor([s.running_scores for s in searches], dtype=f32, device=dev)
    accumulated = (row_scores.view(n, nb, per_row) + running[:, :, None]).view(n, nb * per_row)
    top_scores, top_at = torch.topk(accumulated, k=num_k)
    parents = top_at // per_row
    tokens = row_tokens.view(n, nb * per_row).gather(1, top_at)

    cur_len = [s.cur_len for s in searches]
    at_limit = torch.tensor([[c + 1 >= s.max_length] for c, s in zip(cur_len, searches, strict=True)], device=dev)
    hits = torch.isin(tokens, torch.tensor(first.eos, dtype=torch.long, device=dev)) | at_limit

    # running beams for the next step
    running_k = top_scores + hits.to(f32) * PENALTY
    next_at = torch.topk(running_k, k=nb)[1]
    next_running = torch.take_along_dim(running_k, next_at, dim=1)

    # finished hypotheses
    top_mask = torch.arange(num_k, device=dev) < nb
    just_finished = hits & top_mask[None, :]
    length = [[(c + 1 - s.prompt_len) ** s.length_penalty] for c, s in zip(cur_len, searches, strict=True)]
    scores = top_scores / torch.tensor(length, dtype=f32, device=dev)
    early_true = torch.tensor([[s.early_stopping is True] for s in searches], device=dev)
    is_finished = torch.tensor([s.is_sent_finished for s in searches], dtype=torch.bool, device=dev)
    improvable = torch.tensor([[s.improvement_possible] for s in searches], dtype=torch.bool, device=dev)
    full = torch.all(is_finished, dim=-1, keepdim=True) & early_true
    scores += full.to(f32) * PENALTY
    scores += (~improvable).to(f32) * PENALTY
    scores += (~just_finished) * PENALTY
    merged_scores = torch.cat((torch.tensor([s.finished_scores for s in searches], dtype=f32, device=dev), scores), 1)
    merged_finished = torch.cat((is_finished, just_finished), dim=1)
    keep = torch.topk(merged_scores, k=nb)[1]
    finished_scores = torch.take_along_dim(merged_scores, keep, dim=1)
    is_finished = torch.take_along_dim(merged_finished, keep, dim=1)

    # the early-stop heuristic, at the new length
    best_length = [
        [(s.max_length if s.early_stopping == "never" and s.length_penalty > 0.0 else c + 1) - s.prompt_len]
        for c, s in zip(cur_len, searches, strict=True)
    ]
    denominators = [[b**s.length_penalty] for (b,), s in zip(best_length, searches, strict=True)]
    best_running = next_running[:, :1] / torch.tensor(denominators, dtype=f32, device=dev)
    worst_finished = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], PENALTY)
    improvable = improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
    still_running = improvable[:, 0] & ~(torch.all(is_finished, dim=-1) & early_true[:, 0])
    done = ~(still_running & ~torch.all(hits, dim=-1))

    # back to Python, one transfer per tensor
    parents_l, tokens_l, next_l = parents.tolist(), tokens.tolist(), next_at.tolist()
    keep_l, done_l = keep.tolist(), done.tolist()
    running_l, finished_l, is_finished_l = next_running.tolist(), finished_scores.tolist(), is_finished.tolist()
    improvable_l = improvable[:, 0].tolist()
    out: list[list[tuple[int, int]]] = []
    for i, s in enumerate(searches):
        s.running_scores, s.finished_scores, s.is_sent_finished = running_l[i], finished_l[i], is_finished_l[i]
        s.improvement_possible = bool(improvable_l[i])
        parents_i, tokens_i = parents_l[i], tokens_l[i]
        s.finished_tokens = [
            s.finished_tokens[k] if k < nb else [*beam_tokens[i][parents_i[k - nb]], tokens_i[k - nb]]
            for k in keep_l[i]
        ]
        s.cur_len += 1
        s.done = bool(done_l[i])
        out.append([] if s.done else [(parents_i[k], tokens_i[k]) for k in next_l[i]])
    return out

"""Beam search for one request, step by step, reproducing transformers 5.24 `_beam_search` exactly.

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
batch. The float32 arithmetic (the -1e9 penalties, the divisions) is done with the same torch ops on
the same shapes ([1, ...]), so ties break the same way. Beams start as generate starts them: `num_beams`
copies of the decoder start, the first with score 0 and the others with -1e9.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagedq.worker.engine._generation import DecodeSettings

PENALTY = -1.0e9


class BeamSearch:
    """The beam state of one request; `step` consumes the running beams' scores and picks the next beams."""

    def __init__(self, settings: DecodeSettings, prompt: Sequence[int], device: torch.device | str = "cpu") -> None:
        nb = self.num_beams = settings.num_beams
        self.length_penalty = settings.length_penalty
        self.early_stopping = settings.early_stopping
        self.max_length = settings.max_length
        self.prompt_len = self.cur_len = len(prompt)
        self.eos = torch.tensor(settings.eos_token_ids, dtype=torch.long, device=device)
        self.num_candidates = max(2, 1 + len(settings.eos_token_ids)) * nb
        self.top_num_beam_mask = torch.cat(
            (torch.ones(nb, dtype=torch.bool), torch.zeros(self.num_candidates - nb, dtype=torch.bool))
        ).to(device)
        self.running_scores = torch.zeros((1, nb), dtype=torch.float, device=device)
        self.running_scores[:, 1:] = PENALTY
        self.finished_scores = torch.full((1, nb), fill_value=PENALTY, dtype=torch.float, device=device)
        self.finished_tokens: list[list[int]] = [list(prompt) for _ in range(nb)]
        self.is_sent_finished = torch.zeros((1, nb), dtype=torch.bool, device=device)
        self.improvement_possible = torch.ones((1, 1), dtype=torch.bool, device=device)
        self.done = False

    def step(self, log_probs: torch.Tensor, beam_tokens: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """`log_probs` [num_beams, vocab] (on the state's device): processed log-softmax of each running beam;
        `beam_tokens[b]`: its tokens. Returns the next running beams as (parent beam, token), best first
        (empty once done)."""
        nb, vocab = self.num_beams, log_probs.shape[-1]
        scores = (log_probs.float().unsqueeze(0) + self.running_scores[:, :, None]).reshape(1, -1)
        top_scores, top_indices = torch.topk(scores, k=self.num_candidates)
        parents, tokens = top_indices // vocab, top_indices % vocab
        hits = torch.isin(tokens, self.eos) | (self.cur_len + 1 >= self.max_length)
        candidates = [[*beam_tokens[p], t] for p, t in zip(parents[0].tolist(), tokens[0].tolist(), strict=True)]

        running = top_scores + hits.to(torch.float32) * PENALTY
        next_idx = torch.topk(running, k=nb)[1]
        self.running_scores = torch.take_along_dim(running, next_idx, dim=1)
        self._update_finished(top_scores, hits, candidates)

        self.cur_len += 1
        self._update_heuristic()
        still_running = self.improvement_possible.any() & ~(self.is_sent_finished.all() & (self.early_stopping is True))
        self.done = not bool(still_running & ~hits.all())
        if self.done:
            return []
        return [(int(parents[0, k]), int(tokens[0, k])) for k in next_idx[0].tolist()]

    def best(self) -> list[int]:
        """The best finished hypothesis (decoder start included), as generate returns it."""
        return self.finished_tokens[0]

    def _update_finished(self, top_scores: torch.Tensor, hits: torch.Tensor, candidates: list[list[int]]) -> None:
        just_finished = hits & self.top_num_beam_mask[None, :]
        scores = top_scores / ((self.cur_len + 1 - self.prompt_len) ** self.length_penalty)
        full = torch.all(self.is_sent_finished, dim=-1, keepdim=True) & (self.early_stopping is True)
        scores += full.to(torch.float32) * PENALTY
        scores += (~self.improvement_possible).to(torch.float32) * PENALTY
        scores += (~just_finished) * PENALTY
        merged_scores = torch.cat((self.finished_scores, scores), dim=1)
        merged_finished = torch.cat((self.is_sent_finished, just_finished), dim=1)
        keep = torch.topk(merged_scores, k=self.num_beams)[1]
        merged_tokens = self.finished_tokens + candidates
        self.finished_tokens = [merged_tokens[k] for k in keep[0].tolist()]
        self.finished_scores = torch.take_along_dim(merged_scores, keep, dim=1)
        self.is_sent_finished = torch.take_along_dim(merged_finished, keep, dim=1)

    def _update_heuristic(self) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_length - self.prompt_len
        else:
            best_length = self.cur_len - self.prompt_len
        best_running = self.running_scores[:, :1] / (best_length**self.length_penalty)
        worst_finished = torch.where(
            self.is_sent_finished, torch.min(self.finished_scores, dim=1, keepdim=True)[0], PENALTY
        )
        self.improvement_possible = self.improvement_possible & torch.any(
            best_running > worst_finished, dim=-1, keepdim=True
        )

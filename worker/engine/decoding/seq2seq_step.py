"""After a decoder pass: each request's next token(s), as generate picks them, and whether it is done.

- greedy and sampling (one sequence per request): generate's logits processors (`seq2seq_logits`) on the raw
  logits of all such rows at once, then `sampling.Sampler` (argmax, or temperature / top-k / top-p with the
  request's own seeded generator); stop on EOS or at the length limit. The rows stay in the model's dtype:
  the processors only ban (-inf) or force (0 and -inf), exact in bf16, and the argmax of bf16 logits is
  that of their exact fp32 upcast, which generate takes; sampling widens its rows to fp32;
- beam search: log-softmax, the processors, then `beam_search.step_beams`, for all beam requests of the
  step at once; the next beams continue their parents' sequences -- a parent picked twice is forked,
  sharing its blocks (copy-on-write when they diverge), a parent not picked frees its blocks.

A decoder sequence is a `TokenSequence` (prompt = the decoder start token) of the request, as a decoder-only
model's is, so that `KVCacheManager` (blocks, fork, copy-on-write) and `Sampler` (per-sequence generators)
work on it unchanged.
"""

from __future__ import annotations

import itertools

import torch

from pagedq.worker.engine.core.request import Request, RequestStatus, TokenSequence
from pagedq.worker.engine.cpu.beam_topk import top_k_rows
from pagedq.worker.engine.decoding.beam_search import step_beams
from pagedq.worker.engine.decoding.sampling import Sampler, SamplingParams
from pagedq.worker.engine.decoding.seq2seq_logits import bans_and_forced, process_scores
from pagedq.worker.engine.decoding.seq2seq_options import DecodeSettings
from pagedq.worker.engine.paged.kv_cache_manager import KVCacheManager

_sequence_ids = itertools.count()


class Decoding:
    """Picks next tokens for the requests of one step and manages their decoder sequences."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.sampler = Sampler()

    def new_sequence(self, request_id: str, s: DecodeSettings, tokens: list[int]) -> TokenSequence:
        params = SamplingParams(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature if s.do_sample else 0.0,
            top_k=s.top_k if s.do_sample else 0,
            top_p=s.top_p if s.do_sample else 1.0,
            seed=s.seed if s.do_sample else None,
        )
        return TokenSequence(f"{request_id}#{next(_sequence_ids)}", tokens[:1], params, output_token_ids=tokens[1:])

    def sample(
        self, sampled: list[tuple[Request, int]], logits: torch.Tensor
    ) -> list[tuple[Request, RequestStatus | None]]:
        """Greedy and sampling rows, all at once: generate's processors, one token each, stop criteria."""
        if not sampled:
            return []
        seqs = [r.sequences[0] for r, _ in sampled]
        if len(sampled) == logits.shape[0]:  # no beams in this step: the rows are all of them, in order
            rows = logits
        else:
            rows = logits[torch.tensor([row for _, row in sampled], device=logits.device)]
        process_scores(rows, [(_settings(r), seq.all_token_ids) for (r, _), seq in zip(sampled, seqs, strict=True)])
        tokens = self.sampler(rows, seqs)
        done = []
        for (request, _), seq, token in zip(sampled, seqs, tokens, strict=True):
            seq.append_output(token)
            s = _settings(request)
            status = None
            if token in s.eos_token_ids:
                status = _finish(request, seq.output_token_ids, RequestStatus.FINISHED_STOPPED)
            elif seq.num_tokens >= s.max_length:
                status = _finish(request, seq.output_token_ids, RequestStatus.FINISHED_LENGTH)
            done.append((request, status))
        return done

    def beams(
        self, items: list[tuple[Request, int]], logits: torch.Tensor
    ) -> list[tuple[Request, RequestStatus | None]]:
        """One beam-search step of every beam request (request, its first logits row), all at once: one
        log-softmax, the processors and `step_beams` per group of equal beam shape; the next beams fork
        their parents' blocks (copy-on-write later)."""
        groups: dict[tuple[int, int, tuple[int, ...]], list[tuple[Request, int]]] = {}
        for request, row in items:
            assert request.beam is not None
            groups.setdefault(request.beam.group, []).append((request, row))
        done = []
        for group in groups.values():
            done.extend(self._beam_group(group, logits))
        return done

    def _beam_group(
        self, group: list[tuple[Request, int]], logits: torch.Tensor
    ) -> list[tuple[Request, RequestStatus | None]]:
        first_beam = group[0][0].beam
        assert first_beam is not None
        nb = first_beam.num_beams
        # generate starts with num_beams copies of the start token: one row computed, the others equal to it
        beam_rows = [[min(b, len(r.sequences) - 1) for b in range(nb)] for r, _ in group]
        rows = [first + b for (_, first), bs in zip(group, beam_rows, strict=True) for b in bs]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            picked = logits[rows[0] : rows[0] + len(rows)]
        else:
            picked = logits.index_select(0, torch.tensor(rows, device=logits.device))
        tokens = [[r.sequences[b].all_token_ids for b in bs] for (r, _), bs in zip(group, beam_rows, strict=True)]
        processed = [(_settings(r), t) for (r, _), ts in zip(group, tokens, strict=True) for t in ts]
        values, ids = _best_per_row(picked, processed, first_beam.num_candidates)
        picks = step_beams([r.beam for r, _ in group], values, ids, tokens)  # type: ignore[misc]
        done: list[tuple[Request, RequestStatus | None]] = []
        for (request, _), bs, request_picks in zip(group, beam_rows, picks, strict=True):
            beam = request.beam
            assert beam is not None
            if beam.done:
                best = beam.best()[1:]
                ended = bool(best) and best[-1] in _settings(request).eos_token_ids
                reason = RequestStatus.FINISHED_STOPPED if ended else RequestStatus.FINISHED_LENGTH
                done.append((request, _finish(request, best, reason)))
            else:
                self._reorder_beams(request, [(bs[parent], token) for parent, token in request_picks])
                done.append((request, None))
        return done

    def _reorder_beams(self, request: Request, picks: list[tuple[int, int]]) -> None:
        """New live sequences = parent sequence + token; a parent picked twice is forked (blocks shared)."""
        old = request.sequences
        children: list[TokenSequence] = []
        used: set[int] = set()
        for parent, _ in picks:
            if parent in used:
                child = self.new_sequence(request.request_id, _settings(request), old[parent].all_token_ids)
                child.num_computed_tokens = old[parent].num_computed_tokens
                self.kv.fork(old[parent], child)
            else:
                child = old[parent]
                used.add(parent)
            children.append(child)
        for seq, (_, token) in zip(children, picks, strict=True):
            seq.append_output(token)
        for i, seq in enumerate(old):
            if i not in used:
                self.kv.free(seq)
        request.sequences = children


def _best_per_row(
    logits: torch.Tensor, rows: list[tuple[DecodeSettings, list[int]]], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each beam row's best `k` processed log-probabilities (fp32) and their tokens, best first.

    fp32 logits: generate's own arithmetic -- torch's log-softmax, the processors, then the top k (a
    selection: the values are torch's, bit for bit). Reduced precision (bf16), where no two programs agree
    bit for bit anyway: one native pass normalizes and selects, leaving each row's banned tokens out (they
    count in its log-sum-exp, as generate bans after the log-softmax); a row with a forced token takes
    the first path."""
    if logits.dtype == torch.float32:
        scores = torch.log_softmax(logits, dim=-1)
        process_scores(scores, rows)
        return top_k_rows(scores, k, normalize=False)
    effects = [bans_and_forced(settings, tokens) for settings, tokens in rows]
    values, ids = top_k_rows(logits, k, normalize=True, bans=[bans for bans, _ in effects])
    forced = [i for i, (_, token) in enumerate(effects) if token is not None]
    if forced:
        at = torch.tensor(forced, device=logits.device)
        scores = torch.log_softmax(logits[at], dim=-1, dtype=torch.float32)
        process_scores(scores, [rows[i] for i in forced])
        values[at], ids[at] = top_k_rows(scores, k, normalize=False)
    return values, ids


def _finish(request: Request, tokens: list[int], status: RequestStatus) -> RequestStatus:
    request.output_token_ids = list(tokens)
    if status is RequestStatus.FINISHED_STOPPED and _settings(request).forced_eos_token_id is not None:
        # an EOS forced at the length limit ends the translation because of the limit
        if len(tokens) >= _settings(request).max_new_tokens:
            status = RequestStatus.FINISHED_LENGTH
    return status


def _settings(request: Request) -> DecodeSettings:
    assert request.settings is not None, "an encoder-decoder request carries its DecodeSettings"
    return request.settings

"""After a forward pass: each request's next token(s), as generate picks them, and whether it is done.

One module for every generative architecture: a request's sequences are `TokenSequence`s whose
`SamplingParams` carry everything that decides their tokens (processors, sampling, beams, stop tokens and
length), resolved once per request (`causal_options.sampling_params`, `DecodeSettings.sampling_params`).

- greedy and sampling (one sequence per request): generate's logits processors on the rows of all such
  requests at once, then `sampling.Sampler` (argmax, or temperature / top-k / top-p with the sequence's own
  seeded generator; `sampling.apply_processors`), then the stop rules (`sampling.StopChecker`: EOS and stop
  tokens, stop strings, the length limit);
- beam search: log-softmax, the processors, then `beam_search.step_beams`, for all beam requests of the
  step at once; the next beams continue their parents' sequences -- a parent picked twice is forked,
  sharing its blocks (copy-on-write when they diverge), a parent not picked frees its blocks. A beam
  request's first step has one computed row (its prompt's last position); generate starts with
  `num_beams` copies of it, which read that row.

Rows: `sample` pairs each request with its row in `logits`; `beams` pairs each beam request with the rows of
its sequences, in `request.sequences` order.
"""

from __future__ import annotations

import itertools

import torch

from pagedq.worker.engine.core.request import Request, RequestStatus, TokenSequence
from pagedq.worker.engine.cpu.beam_topk import top_k_rows
from pagedq.worker.engine.decoding.beam_search import step_beams
from pagedq.worker.engine.decoding.logits_processors import Row, bans_and_forced, process_rows
from pagedq.worker.engine.decoding.sampling import Sampler, SamplingParams, StopChecker, processor_row
from pagedq.worker.engine.paged.kv_cache_manager import KVCacheManager

_sequence_ids = itertools.count()

Finished = list[tuple[Request, RequestStatus | None]]


class Decoding:
    """Picks next tokens for the requests of one step and manages their sequences (beams)."""

    def __init__(
        self, kv: KVCacheManager, stop_checker: StopChecker | None = None, exact_log_softmax: bool = True
    ) -> None:
        """`exact_log_softmax` False (an int8 model: its logits are not its fp32 model's anyway): beam rows of
        fp32 logits are normalized and selected by the native pass, as bf16 rows are (`_best_per_row`)."""
        self.kv = kv
        self.exact_log_softmax = exact_log_softmax
        self.sampler = Sampler()
        self.stop_checker = stop_checker or StopChecker()

    @staticmethod
    def new_sequence(request_id: str, params: SamplingParams, prompt: list[int], tokens: list[int]) -> TokenSequence:
        """A sequence of `request_id` whose tokens are `prompt` then the generated `tokens[len(prompt):]`."""
        seq_id = f"{request_id}#{next(_sequence_ids)}"
        return TokenSequence(seq_id, list(prompt), params, output_token_ids=list(tokens[len(prompt) :]))

    def sample(self, sampled: list[tuple[Request, int]], logits: torch.Tensor) -> Finished:
        """Greedy and sampling rows, all at once: generate's processors, one token each, the stop rules."""
        if not sampled:
            return []
        seqs = [r.sequence for r, _ in sampled]
        if len(sampled) == logits.shape[0] and all(row == i for i, (_, row) in enumerate(sampled)):
            rows = logits  # the rows are all of them, in order
        else:
            rows = logits[torch.tensor([row for _, row in sampled], device=logits.device)]
        done: Finished = []
        for (request, _), seq, token in zip(sampled, seqs, self.sampler(rows, seqs), strict=True):
            seq.append_output(token)
            status = self.stop_checker.check(seq)
            if status is not None:
                request.output_token_ids = list(seq.output_token_ids)
            done.append((request, status))
        return done

    def beams(self, items: list[tuple[Request, list[int]]], logits: torch.Tensor) -> Finished:
        """One beam-search step of every beam request (request, its sequences' logits rows), all at once: one
        log-softmax, the processors and `step_beams` per group of equal beam shape; the next beams fork
        their parents' blocks (copy-on-write later)."""
        groups: dict[tuple[int, int, tuple[int, ...]], list[tuple[Request, list[int]]]] = {}
        for request, row in items:
            assert request.beam is not None
            groups.setdefault(request.beam.group, []).append((request, row))
        done: Finished = []
        for group in groups.values():
            done.extend(self._beam_group(group, logits))
        return done

    def _beam_group(self, group: list[tuple[Request, list[int]]], logits: torch.Tensor) -> Finished:
        first_beam = group[0][0].beam
        assert first_beam is not None
        nb = first_beam.num_beams
        # generate starts with num_beams copies of the prompt: one row computed, the others equal to it
        beam_rows = [[min(b, len(r.sequences) - 1) for b in range(nb)] for r, _ in group]
        tokens = [[r.sequences[b].all_token_ids for b in bs] for (r, _), bs in zip(group, beam_rows, strict=True)]
        # Each logits row is normalized and processed once (a first step's copies share their row and their
        # tokens) and read in place where the rows are adjacent: gathering [beams, vocab] rows cost a third of
        # the beam search of a step in which new requests joined running ones.
        rows: dict[int, int] = {}  # logits row -> its place among the rows processed
        processed: list[Row] = []
        beam_at = []  # each beam's place among them
        for (request, seq_rows), ts, bs in zip(group, tokens, beam_rows, strict=True):
            for t, b in zip(ts, bs, strict=True):
                if seq_rows[b] not in rows:
                    rows[seq_rows[b]] = len(processed)
                    processed.append(processor_row(request.sequence, t))
                beam_at.append(rows[seq_rows[b]])
        order = list(rows)
        first = order[0]
        if order == list(range(first, first + len(order))):
            picked = logits[first : first + len(order)]
        else:
            picked = logits.index_select(0, torch.tensor(order, device=logits.device))
        values, ids = _best_per_row(picked, processed, first_beam.num_candidates, self.exact_log_softmax)
        if len(beam_at) != len(order):
            expand = torch.tensor(beam_at, device=values.device)
            values, ids = values.index_select(0, expand), ids.index_select(0, expand)
        picks = step_beams([r.beam for r, _ in group], values, ids, tokens)  # type: ignore[misc]
        done: Finished = []
        for (request, _), bs, request_picks in zip(group, beam_rows, picks, strict=True):
            beam = request.beam
            assert beam is not None
            if beam.done:
                request.output_token_ids = best = beam.best_output()
                done.append((request, self._beam_status(request, best)))
            else:
                self._reorder_beams(request, [(bs[parent], token) for parent, token in request_picks])
                done.append((request, None))
        return done

    @staticmethod
    def _beam_status(request: Request, best: list[int]) -> RequestStatus:
        """Why the best hypothesis ended: EOS, else the length limit (an EOS forced at the limit included)."""
        params = request.sequence.sampling_params
        assert request.beam is not None
        if best and best[-1] in request.beam.eos:
            forced = params.processors.forced_eos_token_id
            if forced is None or len(best) < params.max_new_tokens:
                return RequestStatus.FINISHED_STOPPED
        return RequestStatus.FINISHED_LENGTH

    def _reorder_beams(self, request: Request, picks: list[tuple[int, int]]) -> None:
        """New live sequences = parent sequence + token; a parent picked twice is forked (blocks shared)."""
        old = request.sequences
        children: list[TokenSequence] = []
        used: set[int] = set()
        for parent, _ in picks:
            if parent in used:
                seq = old[parent]
                child = self.new_sequence(request.request_id, seq.sampling_params, seq.prompt_token_ids,
                                          seq.all_token_ids)  # fmt: skip
                child.num_computed_tokens = seq.num_computed_tokens
                self.kv.fork(seq, child)
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
    logits: torch.Tensor, rows: list[Row], k: int, exact: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each beam row's best `k` processed log-probabilities (fp32) and their tokens, best first.

    fp32 logits (`exact`): generate's own arithmetic -- torch's log-softmax, the processors, then the top k
    (a selection: the values are torch's, bit for bit). Reduced precision (bf16, or the fp32 logits of an
    int8 model: not `exact`), where no two programs agree bit for bit anyway: one native pass normalizes
    and selects, leaving each row's banned tokens out (they count in its log-sum-exp, as generate bans
    after the log-softmax); a row with a forced token or a repetition penalty takes the first path."""
    if (exact and logits.dtype == torch.float32) or not all(row.settings.masks_only for row in rows):
        scores = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        process_rows(scores, rows)
        return top_k_rows(scores, k, normalize=False)
    effects = [bans_and_forced(row) for row in rows]
    values, ids = top_k_rows(logits, k, normalize=True, bans=[bans for bans, _ in effects])
    forced = [i for i, (_, token) in enumerate(effects) if token is not None]
    if forced:
        at = torch.tensor(forced, device=logits.device)
        scores = torch.log_softmax(logits[at], dim=-1, dtype=torch.float32)
        process_rows(scores, [rows[i] for i in forced])
        values[at], ids[at] = top_k_rows(scores, k, normalize=False)
    return values, ids

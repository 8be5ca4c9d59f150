"""Beam search over many requests in one step (`beam_search.step_beams`) against `generate`, request by request.

The engine steps every beam request of a step together: one log-softmax and one top-k over all beam rows,
then each request's own arithmetic on [requests, ...] tensors. Requests with different beam widths, length
penalties, early stopping and lengths share those steps with greedy requests; each must still equal its own
`generate` (sharp attention, so that a row reading another request's state would show).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from seq2seq_support import build_pair, random_inputs

from pagedq.shared.models import GenerationOptions
from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.cpu.beam_topk import top_k_rows
from pagedq.worker.engine.decoding import step as decoding_step
from pagedq.worker.engine.decoding.beam_search import BeamSearch, step_beams
from pagedq.worker.engine.decoding.seq2seq_options import decode_settings
from pagedq.worker.engine.seq2seq.engine import Seq2SeqEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: per request (cycled): num_beams, length_penalty, early_stopping, max_new_tokens
MIXES = [(4, 1.0, False, 12), (4, 0.6, True, 9), (2, 1.5, "never", 12), (1, 1.0, False, 10), (3, -0.5, False, 7)]


@pytest.mark.parametrize("arch", ["marian", "t5"])
def test_many_beam_requests_in_one_step_match_generate(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pair = build_pair(arch, sharp=True)
    inputs = random_inputs(20, lengths=(3, 30), seed=11)
    base = decode_settings(pair.model, GenerationOptions())
    wanted: list[dict[str, Any]] = []
    engine = Seq2SeqEngine(
        pair.model, EngineConfig(max_batch_tokens=2048, max_running_requests=128, block_size=4), num_blocks=1024
    )
    for i, ids in enumerate(inputs):
        beams, penalty, early, new = MIXES[i % len(MIXES)]
        kwargs = dict(num_beams=beams, length_penalty=penalty, early_stopping=early, max_new_tokens=new)
        wanted.append(kwargs)
        settings = dataclasses.replace(base, **kwargs)
        engine.add_request(f"r{i}", ids, settings)
    groups: list[int] = []

    def recording(searches: list[BeamSearch], *args: Any) -> Any:
        groups.append(len(searches))
        return step_beams(searches, *args)

    monkeypatch.setattr(decoding_step, "step_beams", recording)
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step())
    assert max(groups) >= 8, "the beam requests of one shape stepped together"
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks
    for i, ids in enumerate(inputs):
        assert done[f"r{i}"].output_token_ids == pair.generate(ids, **wanted[i]), f"request {i}: {wanted[i]}"


def test_step_beams_of_many_equals_each_alone() -> None:
    """Stepping searches together gives each exactly what stepping it alone gives (random scores; together:
    each row's best through `top_k_rows`, alone: through torch's `topk` of the whole row)."""
    gen = torch.Generator().manual_seed(0)
    settings = decode_settings(build_pair("marian").model, GenerationOptions(num_beams=4, max_new_tokens=6))
    penalties = (1.0, 0.5, 2.0, -1.0)
    together = [BeamSearch.for_settings(dataclasses.replace(settings, length_penalty=p), [2]) for p in penalties]
    alone = [BeamSearch.for_settings(dataclasses.replace(settings, length_penalty=p), [2]) for p in penalties]
    tokens = [[[2]] * 4 for _ in penalties]
    steps = 0
    while active := [i for i, s in enumerate(together) if not s.done]:
        scores = torch.log_softmax(torch.randn(4 * len(active), 50, generator=gen) * 3, dim=-1)
        scores[:, 1] += 1.0  # EOS (id 1) often among the candidates: hypotheses finish at varied steps
        values, ids = top_k_rows(scores, together[0].num_candidates, normalize=False)  # the native selection
        picks = step_beams([together[i] for i in active], values, ids, [tokens[i] for i in active])
        for k, i in enumerate(active):
            assert alone[i].step(scores[4 * k : 4 * k + 4], tokens[i]) == picks[k]
            assert vars(alone[i]) == vars(together[i])
            tokens[i] = [[*tokens[i][parent], token] for parent, token in picks[k]]
        steps += 1
    assert steps >= 2

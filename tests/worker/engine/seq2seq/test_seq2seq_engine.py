"""The paged seq2seq engine against `model.generate` on the same random-weight models, token for token.

Requests join while others decode; tiny block pools force preemption; every test ends with all blocks
free. Models: Marian, BART, mBART, T5, M2M100 (2+2 layers, d_model 64; see `seq2seq_support`).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from seq2seq_support import EOS, MAX_NEW_TOKENS, PAD, build_pair, random_inputs

from pagedq.shared.models import GenerationOptions
from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.core.request import RequestOutput
from pagedq.worker.engine.cpu.native import paged_decode_available
from pagedq.worker.engine.decoding.seq2seq_options import DecodeSettings, decode_settings
from pagedq.worker.engine.seq2seq.engine import Seq2SeqEngine

BLOCK_SIZE = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_engine(model: Any, num_blocks: int = 512, native_decode: bool | None = None, **config: Any) -> Seq2SeqEngine:
    options = {"max_batch_tokens": 256, "max_running_requests": 16, "block_size": BLOCK_SIZE, **config}
    return Seq2SeqEngine(model, EngineConfig(**options), num_blocks=num_blocks, native_decode=native_decode)


def run(
    engine: Seq2SeqEngine, inputs: list[list[int]], settings: DecodeSettings, join_after: int = 3
) -> list[RequestOutput]:
    """Half the requests first; the rest join after `join_after` steps, while the first half decodes."""
    half = len(inputs) // 2
    for i, ids in enumerate(inputs[:half]):
        engine.add_request(f"r{i}", ids, settings)
    done: dict[str, RequestOutput] = {}
    steps = 0
    while engine.has_unfinished_requests() or steps <= join_after:
        if steps == join_after:
            for i, ids in enumerate(inputs[half:], start=half):
                engine.add_request(f"r{i}", ids, settings)
        done.update((o.request_id, o) for o in engine.step())
        steps += 1
        assert steps < 500, "no progress"
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks, "blocks leaked"
    return [done[f"r{i}"] for i in range(len(inputs))]


def assert_matches_generate(pair: Any, inputs: list[list[int]], outputs: list[RequestOutput], **kwargs: Any) -> None:
    for ids, out in zip(inputs, outputs, strict=True):
        assert out.output_token_ids == pair.generate(ids, **kwargs), f"input of {len(ids)} tokens"


NATIVE = pytest.mark.parametrize("native", [None, False], ids=["auto", "portable"])


@NATIVE
@pytest.mark.parametrize("arch", ["marian", "bart", "mbart", "t5", "m2m100"])
def test_greedy_matches_generate_with_requests_joining(arch: str, native: bool | None) -> None:
    """Through the native kernel where it is built (`auto`, fp32 on CPU) and through gather + SDPA."""
    pair = build_pair(arch)
    inputs = random_inputs(10)
    engine = make_engine(pair.model, native_decode=native)
    assert engine.runner.native == (native is None and paged_decode_available())
    outputs = run(engine, inputs, decode_settings(pair.model, GenerationOptions()))
    assert_matches_generate(pair, inputs, outputs)
    reasons = {o.finish_reason for o in outputs}
    assert reasons == {"stop", "length"}, "the models are biased to end at varied lengths"
    for out in outputs:
        ends_on_eos = out.output_token_ids[-1] == EOS
        assert out.finish_reason == ("stop" if ends_on_eos else "length")
        assert len(out.output_token_ids) == MAX_NEW_TOKENS or ends_on_eos


@NATIVE
def test_attention_narrower_than_d_model(native: bool | None) -> None:
    """mT5-style heads * d_kv < d_model: encoder pages hold d_model-wide rows; greedy and beam equal generate."""
    for beams in (1, 3):
        pair = build_pair("t5_narrow", num_beams=beams)
        inputs = random_inputs(6, seed=9)
        engine = make_engine(pair.model, native_decode=native)
        outputs = run(engine, inputs, decode_settings(pair.model, GenerationOptions()))
        assert_matches_generate(pair, inputs, outputs)


@pytest.mark.parametrize(
    ("arch", "beams", "generation"),
    [
        ("marian", 2, {}),
        ("marian", 4, {"length_penalty": 0.6}),
        ("bart", 4, {"length_penalty": 2.0, "early_stopping": True}),
        ("t5", 2, {"length_penalty": 0.6, "early_stopping": "never"}),
        ("t5", 4, {"length_penalty": 1.5}),
        ("m2m100", 4, {"length_penalty": 0.8}),
    ],
)
@NATIVE
def test_beam_search_matches_generate(arch: str, beams: int, generation: dict[str, Any], native: bool | None) -> None:
    pair = build_pair(arch, num_beams=beams, **generation)
    inputs = random_inputs(8, seed=2)
    engine = make_engine(pair.model, native_decode=native)
    outputs = run(engine, inputs, decode_settings(pair.model, GenerationOptions()))
    assert_matches_generate(pair, inputs, outputs)


def test_beams_share_blocks_and_copy_on_write() -> None:
    """After the first step the beams hold their parent's blocks (forks), and diverge by copying."""
    pair = build_pair("marian", num_beams=4)
    engine = make_engine(pair.model)
    inputs = random_inputs(1, lengths=(30, 30))
    engine.add_request("r", inputs[0], decode_settings(pair.model, GenerationOptions(max_new_tokens=12)))
    engine.step()
    request = engine.scheduler.requests["r"]
    tables = [engine.kv.block_ids(seq.seq_id) for seq in request.sequences]
    assert len(tables) == 4 and all(t == tables[0] for t in tables), "one computed row, four beams sharing it"
    assert engine.kv.pool.blocks[tables[0][0]].ref_cnt == 4
    copies: list[list[tuple[int, int]]] = []
    execute = engine.runner.execute
    engine.runner.execute = lambda items, cow=(): copies.append(list(cow)) or execute(items, cow)  # type: ignore[method-assign]
    engine.step()  # each beam writes its second token into the shared partial block: copy-on-write
    assert len(copies[0]) == 3, "three beams copy the shared block; the last holder writes in place"
    assert {src for src, _ in copies[0]} == {tables[0][0]}
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks


@pytest.mark.parametrize(("arch", "beams", "num_blocks"), [("marian", 1, 28), ("t5", 1, 20), ("bart", 2, 36)])
def test_preemption_under_a_tiny_pool(arch: str, beams: int, num_blocks: int) -> None:
    pair = build_pair(arch, num_beams=beams)
    inputs = random_inputs(8, lengths=(10, 40), seed=3)
    engine = make_engine(pair.model, num_blocks=num_blocks)  # one or two requests' worth (T5 stops early)
    outputs = run(engine, inputs, decode_settings(pair.model, GenerationOptions()))
    assert engine.stats().num_preemptions > 0
    assert_matches_generate(pair, inputs, outputs)


def test_cross_pages_hold_the_real_encoder_length() -> None:
    """Each request's cross-attention K/V (every decoder layer's, made once when its encoder runs) take
    ceil(len / block_size) pages of its own: its real length, not the batch's longest."""
    pair = build_pair("marian")
    engine = make_engine(pair.model)
    rows = engine.pool.block_size
    inputs = random_inputs(6, lengths=(3, 60), seed=4)
    settings = decode_settings(pair.model, GenerationOptions(max_new_tokens=8))
    for i, ids in enumerate(inputs):
        engine.add_request(f"r{i}", ids, settings)
    engine.step()  # everyone admitted: one encoder pass, one decoder row each
    held = 0
    for i, ids in enumerate(inputs):
        request = engine.scheduler.requests[f"r{i}"]
        assert len(request.encoder_blocks) == math.ceil(len(ids) / rows)  # not the batch maximum
        held += len(request.encoder_blocks) + len(engine.kv.block_ids(request.sequences[0].seq_id))
    assert engine.kv.pool.num_blocks - engine.kv.pool.num_free_blocks == held
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks


def test_abort_frees_blocks_at_once() -> None:
    """Aborts (a cancel, or the engine loop's deadline) free a running and a waiting request's blocks at once."""
    pair = build_pair("marian")
    engine = make_engine(pair.model, max_running_requests=2)
    settings = decode_settings(pair.model, GenerationOptions(max_new_tokens=MAX_NEW_TOKENS))
    inputs = random_inputs(4, lengths=(20, 30))
    engine.add_request("running", inputs[0], settings)
    engine.add_request("expiring", inputs[1], settings)
    engine.add_request("waiting", inputs[2], settings)
    engine.add_request("kept", inputs[3], settings, priority=-1)
    engine.step()
    assert set(engine.scheduler.requests) == {"running", "expiring", "waiting", "kept"}
    assert engine.abort_request("running") and engine.abort_request("waiting") and engine.abort_request("expiring")
    assert not engine.abort_request("unknown")
    reasons = {o.request_id: o.finish_reason for o in engine.step()}
    assert reasons == {"running": "abort", "waiting": "abort", "expiring": "abort"}
    used = engine.kv.pool.num_blocks - engine.kv.pool.num_free_blocks
    kept = engine.scheduler.requests["kept"]
    assert used == len(kept.encoder_blocks) + len(engine.kv.block_ids(kept.sequences[0].seq_id))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks


def test_seeded_sampling_matches_generate_and_ignores_batch_mates() -> None:
    pair = build_pair("marian")
    options = GenerationOptions(do_sample=True, seed=7, temperature=1.5, top_k=20, top_p=0.9, max_new_tokens=12)
    settings = decode_settings(pair.model, options)
    inputs = random_inputs(5, seed=5)
    outputs = run(make_engine(pair.model), inputs, settings, join_after=2)
    for ids, out in zip(inputs, outputs, strict=True):
        torch.manual_seed(7)
        want = pair.generate(ids, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, max_new_tokens=12)
        assert out.output_token_ids == want


def test_processors_bad_words_min_length_no_repeat_ngram_forced_bos() -> None:
    generation = {
        "bad_words_ids": [[PAD], [7, 8]],
        "min_length": 6,
        "no_repeat_ngram_size": 2,
        "forced_bos_token_id": 9,
    }
    for beams in (1, 3):
        pair = build_pair("bart", num_beams=beams, **generation)
        inputs = random_inputs(6, seed=6)
        outputs = run(make_engine(pair.model), inputs, decode_settings(pair.model, GenerationOptions()))
        assert_matches_generate(pair, inputs, outputs)
        assert all(o.output_token_ids[0] == 9 and PAD not in o.output_token_ids for o in outputs)


def test_forced_eos_at_the_limit_is_a_length_finish() -> None:
    pair = build_pair("marian", forced_eos_token_id=EOS, max_length=7)
    inputs = random_inputs(6, seed=7)
    outputs = run(make_engine(pair.model), inputs, decode_settings(pair.model, GenerationOptions()))
    assert_matches_generate(pair, inputs, outputs)
    assert all(o.output_token_ids[-1] == EOS for o in outputs)
    assert any(len(o.output_token_ids) == 6 and o.finish_reason == "length" for o in outputs)


@pytest.mark.parametrize("arch", ["marian", "t5"])
def test_cross_k_v_are_projected_once_per_request_when_its_encoder_runs(arch: str) -> None:
    """Each layer's cross-attention K/V projections run on a request's encoder output once, in the step its
    encoder runs, never in a decode step (they are read from its pages after), and beams share them."""
    pair = build_pair(arch, num_beams=2)
    layer = pair.model.get_decoder().block[0].layer[1].EncDecAttention if arch == "t5" else None
    cross = layer if layer is not None else pair.model.get_decoder().layers[0].encoder_attn
    projected: list[int] = []
    hook = (cross.k if arch == "t5" else cross.k_proj).register_forward_hook(
        lambda _m, args, _out: projected.append(args[0].shape[1])
    )
    engine = make_engine(pair.model)
    settings = decode_settings(pair.model, GenerationOptions(max_new_tokens=6, num_beams=2))
    first, later = random_inputs(3, lengths=(5, 30), seed=6), random_inputs(2, lengths=(5, 30), seed=7)
    try:
        for i, ids in enumerate(first):
            engine.add_request(f"a{i}", ids, settings)
        outputs = list(engine.step())
        assert projected == [sum(len(ids) for ids in first)], "one projection of the three encoder outputs"
        outputs += engine.step() + engine.step()
        assert len(projected) == 1, "decode steps read cross K/V from the pages"
        for i, ids in enumerate(later):
            engine.add_request(f"b{i}", ids, settings)
        outputs += engine.step()
        assert projected[1:] == [sum(len(ids) for ids in later)], "only the joining requests are projected"
        while engine.has_unfinished_requests():
            outputs += engine.step()
    finally:
        hook.remove()
    assert len(projected) == 2 and engine.stats().num_preemptions == 0
    done = {o.request_id: o.output_token_ids for o in outputs if o.finished}
    for name, ids in [*((f"a{i}", x) for i, x in enumerate(first)), *((f"b{i}", x) for i, x in enumerate(later))]:
        assert done[name] == pair.generate(ids, max_new_tokens=6, num_beams=2), name


def test_requests_that_can_never_fit_are_rejected() -> None:
    pair = build_pair("marian")
    engine = make_engine(pair.model, num_blocks=8)
    with pytest.raises(ValueError, match="would not fit"):
        engine.add_request("big", list(range(4, 60)), decode_settings(pair.model, GenerationOptions()))
    with pytest.raises(ValueError, match="no input tokens"):
        engine.add_request("empty", [], decode_settings(pair.model, GenerationOptions()))


def test_a_waiting_higher_priority_request_preempts_a_lower_one() -> None:
    pair = build_pair("marian")
    settings = decode_settings(pair.model, GenerationOptions())
    inputs = random_inputs(3, lengths=(30, 40), seed=8)
    rows = BLOCK_SIZE
    first_step = [math.ceil(len(ids) / rows) + 1 for ids in inputs]  # encoder pages + one decoder block
    engine = make_engine(pair.model, num_blocks=sum(first_step) - 1)  # room for two of them, not three
    engine.add_request("low-a", inputs[0], settings, priority=1)
    engine.add_request("low-b", inputs[1], settings, priority=1)
    done = {o.request_id: o for o in engine.step()}
    assert {r.request_id for r in engine.scheduler.running} == {"low-a", "low-b"}
    engine.add_request("urgent", inputs[2], settings, priority=-1)
    done.update((o.request_id, o) for o in engine.step())
    running = {r.request_id for r in engine.scheduler.running}
    assert "urgent" in running and len(running) == 2, "the latest low-priority request made room"
    assert engine.stats().num_preemptions == 1
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step())
    for name, ids in zip(("low-a", "low-b", "urgent"), inputs, strict=True):
        assert done[name].output_token_ids == pair.generate(ids)
    assert done["low-b"].num_preemptions >= 1  # and again later if the two left outgrow the tiny pool

"""Scheduler: one token budget, chunking, preemption victims, priorities, cancellation (deadlines: the loop's)."""

from __future__ import annotations

from pagedq.worker.engine.core.request import MAX_PREEMPTION_BOOST, Request, RequestStatus
from pagedq.worker.engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from pagedq.worker.engine.decoding.sampling import SamplingParams
from pagedq.worker.engine.paged.block_pool import BlockPool
from pagedq.worker.engine.paged.kv_cache_manager import KVCacheManager

BS = 4


def make(num_blocks: int = 64, budget: int = 32, max_seqs: int = 8, threshold: int = 0) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks), BS, namespace="t")
    return Scheduler(SchedulerConfig(budget, max_seqs, threshold), kv)


def req(rid: str, n: int, prio: int = 0, max_new: int = 4, base: int = 0) -> Request:
    tokens = [base + i for i in range(n)]
    return Request.decoder_only(rid, tokens, SamplingParams(max_new_tokens=max_new), priority=prio)


def step(s: Scheduler) -> SchedulerOutput:
    """Schedule, pretend the model ran, sample token 7 for caught-up requests, finish at max_new."""
    out = s.schedule()
    s.update_from_output(out)
    for r in out.requests:
        seq = r.sequence
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_output(7)
            if seq.num_output_tokens >= seq.sampling_params.max_new_tokens:
                s.finish_request(r, RequestStatus.FINISHED_LENGTH)
    return out


def plan(out: SchedulerOutput) -> dict[str, int]:
    return {r.request_id: n for r, n in zip(out.requests, out.num_tokens, strict=True)}


def test_one_budget_shared_by_decode_and_prefill_chunks() -> None:
    s = make(budget=16)
    for rid in "abc":
        s.add_request(req(rid, 10, base=100 * ord(rid)))
    assert plan(step(s)) == {"a": 10, "b": 6}  # b's prompt is chunked
    out = step(s)
    assert plan(out) == {"a": 1, "b": 4, "c": 10}  # a decodes while b and c prefill
    assert out.total_num_tokens == 15
    assert plan(step(s)) == {"a": 1, "b": 1, "c": 1}


def test_long_prefill_threshold_chunks_prompts() -> None:
    s = make(budget=32, threshold=8)
    s.add_request(req("a", 20))
    s.add_request(req("b", 3, base=50))
    assert plan(step(s)) == {"a": 8, "b": 3}
    assert plan(step(s)) == {"a": 8, "b": 1}
    assert plan(step(s)) == {"a": 4, "b": 1}
    assert s.requests["a"].sequence.num_output_tokens == 1


def test_running_cap() -> None:
    s = make(max_seqs=2)
    for rid in "abc":
        s.add_request(req(rid, 4, base=100 * ord(rid)))
    assert plan(step(s)) == {"a": 4, "b": 4}
    assert s.num_waiting == 1 and len(s.running) == 2


def test_preemption_victim_is_lowest_priority_then_latest() -> None:
    # 6 blocks; a, b, c hold 2 full blocks each after prefill (8 tokens): the pool is full.
    s = make(num_blocks=6, budget=64)
    s.add_request(req("a", 8, prio=0, base=0))
    s.add_request(req("b", 8, prio=1, base=100))
    s.add_request(req("c", 8, prio=0, base=200))
    step(s)
    assert s.kv.pool.num_free_blocks == 0
    # Every decode needs a new block: a (first) preempts b (priority 1), not c (later arrival).
    out = step(s)
    assert [r.request_id for r in out.preempted] == ["b"]
    assert plan(out) == {"a": 1, "c": 1}
    assert s.requests["b"].status is RequestStatus.PREEMPTED and s.kv.block_ids("b") == []
    assert s.num_preemptions == 1


def test_request_preempts_itself_when_it_is_the_worst() -> None:
    s = make(num_blocks=4, budget=64)
    s.add_request(req("a", 7, prio=0, base=0))  # 2 blocks, one slot left for its next token
    s.add_request(req("b", 8, prio=1, base=100))  # 2 full blocks: its next token needs a 3rd
    step(s)
    out = step(s)
    assert [r.request_id for r in out.preempted] == ["b"] and plan(out) == {"a": 1}
    assert s.requests["b"].sequence.num_computed_tokens == 0 and s.kv.block_ids("b") == []


def test_no_admission_after_block_pressure_preemption() -> None:
    s = make(num_blocks=4, budget=64)
    s.add_request(req("a", 8, base=0))
    s.add_request(req("b", 8, base=100))
    step(s)
    s.add_request(req("c", 2, base=200))
    out = step(s)  # a preempts b (later arrival) for its decode block
    assert [r.request_id for r in out.preempted] == ["b"] and plan(out) == {"a": 1}
    assert s.kv.pool.num_free_blocks == 1  # c would fit, but is not admitted in this step


def test_high_priority_waiting_preempts_at_running_cap() -> None:
    s = make(max_seqs=2)
    s.add_request(req("low1", 4, prio=5, base=0))
    s.add_request(req("low2", 4, prio=5, base=100))
    step(s)
    s.add_request(req("high", 4, prio=0, base=200))
    out = step(s)
    assert [r.request_id for r in out.preempted] == ["low2"]
    assert plan(out) == {"high": 4, "low1": 1}
    assert [r.request_id for r in out.requests][0] == "high"  # budget goes to priority first


def test_high_priority_waiting_preempts_when_blocks_run_out() -> None:
    s = make(num_blocks=4, budget=64)
    s.add_request(req("low", 12, prio=5, max_new=10))  # 3 blocks, then a 4th at decode
    step(s)
    s.add_request(req("high", 8, prio=0, base=100))  # needs 2 blocks, only 1 free
    out = step(s)
    assert [r.request_id for r in out.preempted] == ["low"]
    assert plan(out) == {"high": 8}


def test_equal_priority_never_preempts_for_admission() -> None:
    s = make(max_seqs=1)
    s.add_request(req("a", 4, max_new=3))
    step(s)
    s.add_request(req("b", 4, base=100))
    out = step(s)
    assert out.preempted == [] and plan(out) == {"a": 1}


def test_token_budget_goes_to_higher_priority_first() -> None:
    # A long low-priority prefill must not hold the budget while a high-priority request waits.
    s = make(budget=8)
    s.add_request(req("low", 40, prio=5))
    assert plan(step(s)) == {"low": 8}
    s.add_request(req("high", 6, prio=0, base=100))
    assert plan(step(s)) == {"high": 6, "low": 2}


def test_cancellation_anywhere() -> None:
    s = make(max_seqs=1)
    s.add_request(req("run", 8))
    s.add_request(req("wait", 8, base=100))
    step(s)
    free_before = s.kv.pool.num_free_blocks
    assert s.abort_request("run").status is RequestStatus.FINISHED_ABORTED
    assert s.kv.pool.num_free_blocks == free_before + 2  # freed at once
    assert s.abort_request("wait") is not None and s.abort_request("nope") is None
    out = step(s)
    assert {r.request_id for r in out.finished} == {"run", "wait"} and out.requests == []
    assert s.num_waiting == 0 and not s.has_unfinished_requests()


def test_preempted_request_readmitted_before_newer_equal_priority() -> None:
    s = make(num_blocks=4, budget=64)
    s.add_request(req("a", 8, base=0, max_new=2))
    s.add_request(req("b", 8, base=100))
    step(s)
    out = step(s)  # b is preempted for a's decode block; a finishes
    assert [r.request_id for r in out.preempted] == ["b"] and s.requests.keys() == {"b"}
    s.add_request(req("c", 4, base=200))
    early = req("early", 4, base=300)
    early.arrival = -1  # arrived before everyone, never ran
    s.add_request(early)
    out = step(s)
    # b is boosted ahead of 'early' and resumes with a prefix hit on its surviving first block;
    # 'c' finds no block left.
    assert plan(out) == {"b": 5, "early": 4} and s.requests["b"].sequence.num_cached_tokens == 4


def test_boost_is_bounded() -> None:
    r = req("x", 4)
    r.num_preemptions = 100
    assert r.sort_key == (0, -MAX_PREEMPTION_BOOST, r.arrival)
    assert req("y", 4, prio=-1).sort_key < r.sort_key  # priority still wins over any boost


def test_no_starvation_under_memory_pressure() -> None:
    s = make(num_blocks=6, budget=12, max_seqs=4)
    reqs = [req(f"r{i}", 5 + i, max_new=6, base=100 * i) for i in range(6)]
    for r in reqs:
        s.add_request(r)
    for _ in range(200):
        if not s.has_unfinished_requests():
            break
        step(s)
        # At most one partial block of allocated-but-unused slots per running request.
        assert all(0 <= s.kv.waste_slots(r.sequence) < BS for r in s.running)
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in reqs)
    assert all(r.sequence.num_output_tokens == 6 for r in reqs)
    assert s.num_preemptions > 0 and s.kv.pool.num_free_blocks == 6

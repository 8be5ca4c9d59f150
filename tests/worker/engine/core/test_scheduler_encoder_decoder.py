"""The one scheduler on encoder-decoder requests, without a model: step costs, encoder pages, seats, beams.

Pool of BS-token blocks, encoder pages of ENC rows; the free list hands out the lowest ids first, so every
block id below is exact. A request's sequences start with the decoder start token (one row to compute).
"""

from __future__ import annotations

from pagedq.worker.engine.core.request import Request, RequestStatus, TokenSequence
from pagedq.worker.engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from pagedq.worker.engine.decoding.sampling import SamplingParams
from pagedq.worker.engine.paged.block_pool import BlockPool
from pagedq.worker.engine.paged.kv_cache_manager import KVCacheManager

BS = 4  # decoder tokens per block
ENC = 8  # encoder rows per page
START = 0


def make(num_blocks: int = 32, budget: int = 64, max_seqs: int = 8) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks, enable_caching=False), BS, enable_caching=False, encoder_block_size=ENC)
    return Scheduler(SchedulerConfig(budget, max_seqs), kv)


def req(rid: str, encoder_len: int, prio: int = 0, beams: int = 1) -> Request:
    seq = TokenSequence(f"{rid}#0", [START], SamplingParams())
    return Request(rid, [seq], prio, encoder_ids=list(range(1, encoder_len + 1)), seats=beams)


def step(s: Scheduler) -> SchedulerOutput:
    """Schedule, pretend the model ran, and give every scheduled sequence its next token."""
    out = s.schedule()
    s.update_from_output(out)
    for seq in out.sequences:
        seq.append_output(5)
    return out


def plan(out: SchedulerOutput) -> dict[str, int]:
    return {r.request_id: n for r, n in zip(out.requests, out.num_tokens, strict=True)}


def tables(s: Scheduler, rid: str) -> tuple[list[int], list[list[int]]]:
    """(encoder pages, each sequence's self blocks) of a request, as block ids."""
    r = s.requests[rid]
    return [b.block_id for b in r.encoder_blocks], [s.kv.block_ids(seq.seq_id) for seq in r.sequences]


def test_admission_costs_the_encoder_input_and_takes_its_pages_first() -> None:
    s = make()
    s.add_request(req("a", 10))  # 2 pages of 8 rows
    s.add_request(req("b", 3))  # 1 page
    out = step(s)
    assert plan(out) == {"a": 10 + 1, "b": 3 + 1}
    assert tables(s, "a") == ([0, 1], [[2]]) and tables(s, "b") == ([3], [[4]])
    assert all(r.encoded for r in out.requests)
    assert plan(step(s)) == {"a": 1, "b": 1}  # running: one decoder row each, the encoder never again
    assert tables(s, "a") == ([0, 1], [[2]])
    for _ in range(3):  # a's sequence reaches 5 tokens: a second self block, pages unchanged
        step(s)
    assert tables(s, "a") == ([0, 1], [[2, 5]]) and tables(s, "b") == ([3], [[4, 6]])


def test_rows_are_never_split_a_request_too_big_for_what_is_left_waits() -> None:
    s = make(budget=16)
    s.add_request(req("a", 12))  # 13 tokens
    s.add_request(req("b", 6))  # 7: does not fit the 3 left
    s.add_request(req("big", 40))  # 41 > the whole budget
    assert plan(step(s)) == {"a": 13}
    assert plan(step(s)) == {"a": 1, "b": 7}  # big waits: 41 > 8 left
    out = step(s)
    assert plan(out) == {"a": 1, "b": 1}  # big still does not fit behind the running ones
    s.abort_request("a")
    s.abort_request("b")
    assert plan(step(s)) == {"big": 41}  # alone it is scheduled over the budget: no starvation by size


def test_beam_requests_take_their_seats() -> None:
    s = make(max_seqs=4)
    s.add_request(req("beam", 4, beams=3))
    s.add_request(req("greedy1", 4))
    s.add_request(req("greedy2", 4))
    out = step(s)
    assert plan(out) == {"beam": 5, "greedy1": 5}  # 3 + 1 seats of 4; greedy2 waits
    assert s.num_seats == 4 and s.num_waiting == 1
    s.finish_request(s.requests["greedy1"], RequestStatus.FINISHED_STOPPED)
    assert s.num_seats == 3
    assert plan(step(s)) == {"beam": 1, "greedy2": 5}


def test_forked_beams_share_blocks_and_each_computes_its_row() -> None:
    s = make()
    s.add_request(req("r", 4, beams=2))
    step(s)  # encoder + start token; the first token is appended
    r = s.requests["r"]
    child = TokenSequence("r#1", [START], SamplingParams(), output_token_ids=[6])
    child.num_computed_tokens = r.sequences[0].num_computed_tokens
    s.kv.fork(r.sequences[0], child)
    r.sequences.append(child)
    assert tables(s, "r") == ([0], [[1], [1]])  # one block, two references
    out = step(s)
    assert plan(out) == {"r": 2} and out.rows == [1, 1]
    assert tables(s, "r") == ([0], [[2], [1]])  # the first writer copied the shared partial block
    assert out.copies == [(1, 2)]


def test_preemption_frees_the_encoder_pages_and_the_encoder_runs_again() -> None:
    # 5 blocks: a takes 2 pages + 1 self block; b 1 page + 1 self block; then a's sequence needs a 2nd block.
    s = make(num_blocks=5)
    s.add_request(req("a", 16, prio=0))
    s.add_request(req("b", 8, prio=1))
    step(s)
    assert s.kv.pool.num_free_blocks == 0
    for _ in range(3):
        step(s)
    out = step(s)  # a's 5th token needs a new block: b (lower priority) is preempted, pages and all
    assert [r.request_id for r in out.preempted] == ["b"] and plan(out) == {"a": 1}
    b = s.requests["b"]
    assert b.status is RequestStatus.PREEMPTED and not b.encoded and b.encoder_blocks == []
    assert b.sequence.num_computed_tokens == 0 and s.kv.block_ids("b#0") == []
    s.finish_request(s.requests["a"], RequestStatus.FINISHED_STOPPED)
    prefix = b.sequence.num_tokens
    out = step(s)
    assert plan(out) == {"b": 8 + prefix}  # its encoder and its whole decoder prefix again
    assert b.num_preemptions == 1 and b.encoded


def test_abort_frees_every_block_at_once() -> None:
    s = make(num_blocks=16)
    s.add_request(req("first", 20))
    s.add_request(req("second", 20))
    step(s)
    assert s.kv.pool.num_free_blocks == 16 - 2 * (3 + 1)
    assert s.abort_request("first") is not None and s.kv.pool.num_free_blocks == 16 - 4
    out = step(s)
    assert [r.request_id for r in out.finished] == ["first"] and plan(out) == {"second": 1}
    assert out.finished[0].status is RequestStatus.FINISHED_ABORTED
    assert s.abort_request("second") is not None and s.kv.pool.num_free_blocks == 16

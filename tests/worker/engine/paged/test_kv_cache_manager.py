"""KVCacheManager: block tables, prefix hits (capped), eviction order, namespaces, copy-on-write."""

from __future__ import annotations

from pagedq.worker.engine.core.request import TokenSequence
from pagedq.worker.engine.decoding.sampling import SamplingParams
from pagedq.worker.engine.paged.block_pool import BlockPool
from pagedq.worker.engine.paged.kv_cache_manager import KVCacheManager, hash_block_tokens, root_hash

BS = 4


def make_manager(num_blocks: int = 10, caching: bool = True, namespace: str = "m") -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks), BS, namespace=namespace, enable_caching=caching)


def req(rid: str, tokens: list[int]) -> TokenSequence:
    return TokenSequence(rid, tokens, SamplingParams())


def admit(m: KVCacheManager, r: TokenSequence) -> int:
    """Admission as the scheduler does it: hits, then slots for the rest. Returns hit tokens."""
    hits = m.get_computed_blocks(r)
    assert m.allocate_slots(r, r.num_tokens - len(hits) * BS, hits)
    r.num_computed_tokens = r.num_tokens  # pretend the step ran
    return len(hits) * BS


def free_ids(m: KVCacheManager) -> list[int]:
    return [b.block_id for b in m.pool.free_queue]


def test_allocate_exact_blocks_and_one_partial() -> None:
    m = make_manager()
    r = req("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert m.allocate_slots(r, 10, [])
    assert m.block_ids("a") == [0, 1, 2]
    r.num_computed_tokens = 10
    assert m.waste_slots(r) == 2
    # Decode: token 11 fits in block 2, token 13 needs a new one.
    r.append_output(100)
    assert m.allocate_slots(r, 1)
    assert m.block_ids("a") == [0, 1, 2]
    r.num_computed_tokens = 11
    r.append_output(101)
    r.num_computed_tokens = 12
    r.append_output(102)
    assert m.allocate_slots(r, 1)
    assert m.block_ids("a") == [0, 1, 2, 3]


def test_allocation_failure_changes_nothing() -> None:
    m = make_manager(num_blocks=2)
    r = req("a", list(range(9)))
    assert not m.allocate_slots(r, 9, [])
    assert m.block_ids("a") == [] and free_ids(m) == [0, 1]


def test_prefix_hit_shares_full_blocks() -> None:
    m = make_manager()
    a = req("a", list(range(10)))
    assert admit(m, a) == 0
    b = req("b", list(range(8)) + [50, 51, 52])
    assert admit(m, b) == 8  # blocks 0 and 1 shared
    assert m.block_ids("b")[:2] == [0, 1] and m.block_ids("b")[2] == 3
    assert [m.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert m.prefix_cache_queries == 21 and m.prefix_cache_hits == 8


def test_hit_capped_to_leave_one_token() -> None:
    m = make_manager()
    a = req("a", list(range(8)))  # exactly two full blocks
    admit(m, a)
    m.free(a)
    b = req("b", list(range(8)))
    hits = m.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0]  # not both: at least one token must be computed
    assert m.allocate_slots(b, 4, hits)
    assert m.block_ids("b") == [0, 2]


def test_freed_blocks_keep_hashes_and_evict_tail_first() -> None:
    m = make_manager(num_blocks=6)
    a = req("a", list(range(12)))  # 3 full blocks: ids 0, 1, 2
    admit(m, a)
    m.free(a)
    # Unused blocks first, then a's chain tail first.
    assert free_ids(m) == [3, 4, 5, 2, 1, 0]
    b = req("b", list(range(12)) + [7])
    assert admit(m, b) == 12  # all three revived from the free list
    assert m.block_ids("b") == [0, 1, 2, 3]
    assert free_ids(m) == [4, 5]


def test_eviction_reuses_lru_and_drops_hash() -> None:
    m = make_manager(num_blocks=4)
    a = req("a", list(range(8)) + [9])  # blocks 0,1 full (hashed), 2 partial
    admit(m, a)
    m.free(a)
    assert free_ids(m) == [3, 2, 1, 0]
    c = req("c", [70 + i for i in range(13)])  # needs 4 blocks: evicts everything
    admit(m, c)
    assert m.block_ids("c") == [3, 2, 1, 0]
    assert m.get_computed_blocks(req("a2", list(range(8)) + [9])) == []


def test_namespaces_never_share() -> None:
    pool = BlockPool(8)
    m1 = KVCacheManager(pool, BS, namespace="llama")
    m2 = KVCacheManager(pool, BS, namespace="qwen")
    admit(m1, req("a", list(range(9))))
    assert m2.get_computed_blocks(req("b", list(range(9)))) == []
    assert len(m1.get_computed_blocks(req("c", list(range(9))))) == 2


def test_hash_chain_depends_on_parent_and_extra_keys() -> None:
    root = root_hash("m")
    h1 = hash_block_tokens(root, [1, 2, 3, 4])
    assert hash_block_tokens(root, [1, 2, 3, 4]) == h1
    assert hash_block_tokens(h1, [1, 2, 3, 4]) != h1
    assert hash_block_tokens(root, [1, 2, 3, 4], ("lora",)) != h1
    assert root_hash("other") != root


def test_caching_disabled() -> None:
    m = make_manager(caching=False)
    admit(m, req("a", list(range(9))))
    assert admit(m, req("b", list(range(9)))) == 0
    assert m.block_ids("b") == [3, 4, 5]


def test_decode_blocks_become_cached() -> None:
    m = make_manager()
    a = req("a", [1, 2, 3])
    admit(m, a)
    a.append_output(4)
    assert m.allocate_slots(a, 1)  # computes token 4: block 0 is now full
    a.num_computed_tokens = 4
    assert m.pool.blocks[0].block_hash is not None
    b = req("b", [1, 2, 3, 4, 5])
    assert len(m.get_computed_blocks(b)) == 1


def test_free_unhashes_blocks_whose_step_never_ran() -> None:
    m = make_manager()
    a = req("a", list(range(9)))
    assert m.allocate_slots(a, 9, [])  # publishes blocks 0 and 1 ...
    assert m.pool.blocks[0].block_hash is not None
    m.free(a)  # ... but num_computed_tokens is still 0: they were never written
    assert m.get_computed_blocks(req("b", list(range(9)))) == []


def test_fork_and_copy_on_write() -> None:
    m = make_manager()
    parent = req("p", list(range(6)))  # block 0 full, block 1 holds 2 tokens
    admit(m, parent)
    child = req("c", list(range(6)))
    m.fork(parent, child)
    child.num_computed_tokens = 6
    assert m.block_ids("c") == [0, 1]
    assert [m.pool.blocks[i].ref_cnt for i in (0, 1)] == [2, 2]
    # The child writes token 6 into the shared partial block 1: it gets a private copy.
    child.append_output(60)
    assert m.num_blocks_to_allocate(child, 1) == 1
    assert m.allocate_slots(child, 1)
    assert m.block_ids("c") == [0, 2]
    assert m.take_copies() == [(1, 2)] and m.take_copies() == []
    assert [m.pool.blocks[i].ref_cnt for i in (0, 1, 2)] == [2, 1, 1]
    # The parent is now the only holder of block 1 and writes in place.
    parent.append_output(61)
    assert m.allocate_slots(parent, 1)
    assert m.block_ids("p") == [0, 1] and m.take_copies() == []
    m.free(child)
    m.free(parent)
    assert m.pool.num_free_blocks == 10

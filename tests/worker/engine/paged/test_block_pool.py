"""BlockPool: exact block ids, free-list order, reference counts, lazy eviction."""

from __future__ import annotations

import pytest

from pagedq.worker.engine.paged.block_pool import BlockPool, FreeBlockQueue, KVBlock


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_queue]


def test_allocate_pops_from_head_in_id_order() -> None:
    pool = BlockPool(6)
    assert [b.block_id for b in pool.allocate(3)] == [0, 1, 2]
    assert free_ids(pool) == [3, 4, 5]
    assert all(b.ref_cnt == 1 for b in pool.blocks[:3])
    assert pool.num_free_blocks == 3
    assert pool.usage == pytest.approx(0.5)


def test_allocate_more_than_free_raises_without_change() -> None:
    pool = BlockPool(2)
    with pytest.raises(ValueError):
        pool.allocate(3)
    assert free_ids(pool) == [0, 1]


def test_free_appends_to_tail_in_given_order() -> None:
    pool = BlockPool(5)
    a = pool.allocate(3)
    pool.free(reversed(a))  # a request frees tail first
    assert free_ids(pool) == [3, 4, 2, 1, 0]
    # The next allocation takes the least recently freed blocks first.
    assert [b.block_id for b in pool.allocate(3)] == [3, 4, 2]


def test_shared_block_returns_to_free_list_only_at_zero() -> None:
    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    pool.touch([b])
    assert b.ref_cnt == 2
    pool.free([b])
    assert b.ref_cnt == 1 and free_ids(pool) == [1, 2]
    pool.free([b])
    assert b.ref_cnt == 0 and free_ids(pool) == [1, 2, 0]
    with pytest.raises(AssertionError):
        pool.free([b])


def test_touch_revives_a_free_cached_block_from_the_middle() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    pool.cache_block(blocks[2], b"h2")
    pool.free(blocks)
    assert free_ids(pool) == [0, 1, 2, 3]
    hit = pool.get_cached(b"h2")
    assert hit is blocks[2]
    pool.touch([hit])  # O(1) removal from the middle of the list
    assert free_ids(pool) == [0, 1, 3] and hit.ref_cnt == 1


def test_lazy_eviction_keeps_hash_until_reused() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"ha")
    pool.free([a])
    assert pool.get_cached(b"ha") is a  # still findable while free
    (c,) = pool.allocate(1)  # LRU head is `a`: its hash is dropped now
    assert c is a and c.block_hash is None
    assert pool.get_cached(b"ha") is None


def test_cache_block_first_writer_wins() -> None:
    pool = BlockPool(3)
    a, b, _ = pool.allocate(3)
    pool.cache_block(a, b"h")
    pool.cache_block(b, b"h")
    assert pool.get_cached(b"h") is a and b.block_hash is None


def test_caching_disabled_never_publishes() -> None:
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache_block(a, b"h")
    assert pool.get_cached(b"h") is None and a.block_hash is None


def test_free_queue_remove_middle_and_ends() -> None:
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    q.remove(blocks[0])
    q.remove(blocks[4])
    assert [b.block_id for b in q] == [1, 3] and len(q) == 2
    q.append(blocks[0])
    assert q.popleft() is blocks[1]
    assert [b.block_id for b in q] == [3, 0]


def test_reset_prefix_cache() -> None:
    pool = BlockPool(2)
    a, _ = pool.allocate(2)
    pool.cache_block(a, b"h")
    pool.reset_prefix_cache()
    assert pool.get_cached(b"h") is None and a.block_hash is None

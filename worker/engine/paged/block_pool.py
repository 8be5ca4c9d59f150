"""KV block bookkeeping: reference counts, an LRU free list and the prefix-cache map.

The pool only tracks *which* block ids are in use; the K/V tensors live in `paged.pages.KVPages`
and are indexed by the same ids. Block ids are `0 .. num_blocks-1`.

Free list (least recently used first)::

    head <-> b7 <-> b2 <-> b9 <-> tail        allocate() pops from the head,
                                               free() appends at the tail.

A freed block keeps its hash (lazy eviction): it stays findable in the prefix cache until the free
list hands it out again, and only then is its hash dropped. Callers free a request's blocks in
reverse order so a hash chain's tail is evicted before its head.

Invariants:
- a block is in the free list  <=>  its ref_cnt == 0;
- `cached[h] is b`  <=>  `b.block_hash == h` (one block per hash, one hash per block);
- every operation is O(1) per block (no list scans).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

#: A block's position in a hash chain: digest of (parent hash, token ids, extra keys).
BlockHash = bytes


@dataclass(eq=False)
class KVBlock:
    """One fixed-size slot range of the KV pool."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    # Doubly linked free-list pointers; None while the block is in use.
    prev: KVBlock | None = field(default=None, repr=False)
    next: KVBlock | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hashed={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) popleft, append and remove-from-middle."""

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)  # sentinels: never handed out
        self._tail = KVBlock(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVBlock:
        block = self._head.next
        if block is self._tail or block is None:
            raise ValueError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        assert block.prev is not None and block.next is not None, f"{block} is not in the free list"
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.num_free -= 1

    def append(self, block: KVBlock) -> None:
        assert block.prev is None and block.next is None, f"{block} is already in the free list"
        last = self._tail.prev
        assert last is not None
        last.next, block.prev = block, last
        block.next, self._tail.prev = self._tail, block
        self.num_free += 1

    def __iter__(self) -> Iterator[KVBlock]:
        block = self._head.next
        while block is not None and block is not self._tail:
            yield block
            block = block.next

    def __len__(self) -> int:
        return self.num_free


class BlockPool:
    """Allocates and frees block ids; owns the prefix-cache map `hash -> block`."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that `allocate` can hand out now (free, cached or not)."""
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        """Take `n` blocks from the LRU end of the free list, evicting their cached hashes."""
        if n > self.num_free_blocks:
            raise ValueError(f"cannot allocate {n} blocks, only {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on each block (a prefix-cache hit or a fork)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference per block; blocks reaching zero go to the tail of the free list.

        Pass a request's blocks in reverse order so its chain's tail is evicted first."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def get_cached(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Publish a full block under `block_hash` (first writer wins: a duplicate stays unhashed)."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def uncache_block(self, block: KVBlock) -> None:
        """Withdraw a block's hash (its contents will not be valid)."""
        self._evict(block)

    def reset_prefix_cache(self) -> None:
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

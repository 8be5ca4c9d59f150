"""Block tables, encoder pages and the prefix cache: which blocks each request holds, and which it can reuse.

One pool (`BlockPool`) holds every block of a model. Each decoder sequence has a block table of its
self-attention K/V; an encoder-decoder request also holds exactly ceil(encoder_len / encoder_block_size)
pages of its cross-attention K/V (`Request.encoder_blocks`: every decoder layer's K and V of its encoder
output, made once when its encoder runs, read by every layer's cross-attention) from the step
its encoder runs until it ends or is preempted -- its real length, never a batch maximum. `allocate` is the
scheduler's one call: a request's pages and its sequences' rows, all or nothing.

A sequence's block table maps token positions to pool slots::

    tokens:  t0 .. t15 | t16 .. t31 | t32 t33 t34 _ _ ... _
    blocks:  [  b4    ]  [  b9     ]  [ b2 (partial)      ]
    hashes:  h0=H(root,t0..15)  h1=H(h0,t16..31)   (none: only FULL blocks are hashed)

`H(parent, token_ids, extra_keys)` is SHA-256; the chain's root is derived from the namespace (the
model), so two models on one worker never share blocks.

Invariants:
- a request holds exactly ceil((num_computed + num_scheduled) / block_size) blocks, so at most one
  partial block per request is allocated-but-unused;
- blocks [0, num_computed_tokens // block_size) of a request hold valid K/V; a hashed block beyond
  that was published by an allocation whose step has not run, and is un-hashed if the request is
  freed first (so a failed step cannot leave garbage in the prefix cache);
- a prefix hit never covers the whole request: at least one token is computed (for its logits);
- only a shared (ref_cnt > 1) partial block is ever copied (copy-on-write); full blocks are immutable.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from pagedq.worker.engine.core.request import Request, TokenSequence
from pagedq.worker.engine.paged.block_pool import BlockHash, BlockPool, KVBlock


def root_hash(namespace: str) -> BlockHash:
    """The parent hash of every chain's first block in `namespace`."""
    return hashlib.sha256(b"pagedq-prefix:" + namespace.encode()).digest()


def hash_block_tokens(parent: BlockHash, token_ids: Sequence[int], extra_keys: tuple[object, ...] = ()) -> BlockHash:
    """SHA-256 of (parent hash, block token ids, extra keys): a block's identity in the prefix cache."""
    h = hashlib.sha256(parent)
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates blocks for scheduled tokens, publishes full blocks, and finds prefix hits."""

    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        namespace: str = "",
        enable_caching: bool = True,
        extra_keys: tuple[object, ...] = (),
        encoder_block_size: int = 0,
    ) -> None:
        self.pool = pool
        self.block_size = block_size
        self.encoder_block_size = encoder_block_size  # encoder positions per page (encoder-decoder models)
        self.enable_caching = enable_caching and pool.enable_caching
        self.root = root_hash(namespace)
        self.extra_keys = extra_keys
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self._num_hashed: dict[str, int] = {}  # blocks of each request already offered to the cache
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block ids, copy-on-write
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # tokens found

    # ---- prefix cache -------------------------------------------------------------------------

    def block_hashes(self, seq: TokenSequence, num_blocks: int) -> list[BlockHash]:
        """The hashes of the sequence's first `num_blocks` full blocks (computed once, lazily)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else self.root
            hashes.append(hash_block_tokens(parent, seq.all_token_ids[i * bs : (i + 1) * bs], self.extra_keys))
        return hashes

    def get_computed_blocks(self, seq: TokenSequence) -> list[KVBlock]:
        """Longest cached chain of full blocks that prefixes the sequence, leaving >= 1 token to compute."""
        if not self.enable_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for h in self.block_hashes(seq, max_blocks):
            block = self.pool.get_cached(h)
            if block is None:
                break
            hits.append(block)
        return hits

    # ---- a request: encoder pages and every sequence's rows -------------------------------------

    def num_encoder_blocks(self, request: Request) -> int:
        return cdiv(request.encoder_len, self.encoder_block_size) if request.has_encoder else 0

    def max_blocks(self, request: Request, max_length: int) -> int:
        """Worst case: encoder pages + every seat at `max_length` tokens, plus one copy-on-write block each."""
        return self.num_encoder_blocks(request) + request.seats * (cdiv(max_length, self.block_size) + 1)

    def allocate(self, request: Request, rows: Sequence[int], hits: Sequence[KVBlock] | None = None) -> bool:
        """Blocks for `rows[i]` more tokens of each sequence, and the encoder pages if its encoder runs in this
        step; all or nothing. `hits` (admission of a one-sequence request): its prefix-cache hit."""
        encoder = 0 if request.encoded else self.num_encoder_blocks(request)
        if not encoder and len(request.sequences) == 1:
            return self.allocate_slots(request.sequences[0], rows[0], hits)
        assert not hits, "prefix hits are for one-sequence requests without an encoder"
        need = encoder + sum(self.num_blocks_to_allocate(s, n) for s, n in zip(request.sequences, rows, strict=True))
        if need > self.pool.num_free_blocks:
            return False
        if encoder:
            request.encoder_blocks = self.pool.allocate(encoder)
        for seq, n in zip(request.sequences, rows, strict=True):
            ok = self.allocate_slots(seq, n)
            assert ok, "num_blocks_to_allocate over-estimates; allocation cannot fail here"
        return True

    def free_request(self, request: Request) -> None:
        """Release every sequence's blocks and the encoder pages; the encoder must run again."""
        for seq in request.sequences:
            self.free(seq)
        self.pool.free(reversed(request.encoder_blocks))
        request.encoder_blocks = []
        request.encoded = False

    # ---- allocation of one sequence -------------------------------------------------------------

    def num_blocks_to_allocate(self, seq: TokenSequence, num_new_tokens: int, computed: Sequence[KVBlock] = ()) -> int:
        """Free blocks that `allocate_slots` would consume (new blocks, revived hits, a CoW copy)."""
        held = self.req_blocks.get(seq.seq_id, ())
        num_computed = seq.num_computed_tokens + len(computed) * self.block_size
        required = cdiv(num_computed + num_new_tokens, self.block_size)
        new = max(0, required - len(held) - len(computed))
        revived = sum(1 for b in computed if b.ref_cnt == 0)
        return new + revived + self._needs_cow(held, num_computed, num_new_tokens)

    def allocate_slots(
        self, seq: TokenSequence, num_new_tokens: int, new_computed_blocks: Sequence[KVBlock] | None = None
    ) -> bool:
        """Make room for `num_new_tokens` more tokens; False (and no change) if the pool is short.

        `new_computed_blocks` (admission only, possibly empty) are prefix hits taken over as-is;
        the caller then sets `num_computed_tokens` past them. Full blocks are published at once,
        so a seq admitted later in the same step can hit them (they are written in this step,
        in the same layer pass, before any attention reads them)."""
        computed = list(new_computed_blocks or ())
        if self.num_blocks_to_allocate(seq, num_new_tokens, computed) > self.pool.num_free_blocks:
            return False
        rid = seq.seq_id
        blocks = self.req_blocks.setdefault(rid, [])
        if new_computed_blocks is not None:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += len(computed) * self.block_size
        num_computed = seq.num_computed_tokens + len(computed) * self.block_size
        self.pool.touch(computed)  # first: hits must leave the free list before anything is allocated
        blocks.extend(computed)
        if self._needs_cow(blocks, num_computed, num_new_tokens):
            self._copy_on_write(blocks, num_computed // self.block_size)
        required = cdiv(num_computed + num_new_tokens, self.block_size)
        if required > len(blocks):
            blocks.extend(self.pool.allocate(required - len(blocks)))
        self._cache_full_blocks(seq, blocks, num_computed + num_new_tokens)
        return True

    def free(self, seq: TokenSequence) -> None:
        """Release the seq's blocks, tail first (evicted first); keep valid hashes (lazy eviction)."""
        rid = seq.seq_id
        blocks = self.req_blocks.pop(rid, [])
        self._num_hashed.pop(rid, None)
        for block in blocks[seq.num_computed_tokens // self.block_size :]:
            self.pool.uncache_block(block)  # published by a step that never ran: not valid
        self.pool.free(reversed(blocks))

    def fork(self, parent: TokenSequence, child: TokenSequence) -> None:
        """Share all of `parent`'s blocks with `child` (beam search, parallel samples)."""
        blocks = self.req_blocks.get(parent.seq_id, [])
        self.pool.touch(blocks)
        self.req_blocks[child.seq_id] = list(blocks)
        self._num_hashed[child.seq_id] = self._num_hashed.get(parent.seq_id, 0)
        child.block_hashes = list(parent.block_hashes)

    def take_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write work for the runner, to run before the next forward."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # ---- introspection ------------------------------------------------------------------------

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def waste_slots(self, seq: TokenSequence) -> int:
        """Allocated slots the seq has not filled (< block_size by construction)."""
        return len(self.req_blocks.get(seq.seq_id, ())) * self.block_size - seq.num_computed_tokens

    # ---- internals ----------------------------------------------------------------------------

    def _needs_cow(self, blocks: Sequence[KVBlock], num_computed: int, num_new_tokens: int) -> bool:
        """True when the next write lands in a partially filled block another seq also holds."""
        idx = num_computed // self.block_size
        partial = num_computed % self.block_size != 0
        return num_new_tokens > 0 and partial and idx < len(blocks) and blocks[idx].ref_cnt > 1

    def _copy_on_write(self, blocks: list[KVBlock], idx: int) -> None:
        (fresh,) = self.pool.allocate(1)
        shared = blocks[idx]
        self.pending_copies.append((shared.block_id, fresh.block_id))
        self.pool.free([shared])
        blocks[idx] = fresh

    def _cache_full_blocks(self, seq: TokenSequence, blocks: list[KVBlock], num_tokens: int) -> None:
        if not self.enable_caching:
            return
        rid = seq.seq_id
        start, end = self._num_hashed.get(rid, 0), num_tokens // self.block_size
        if end <= start:
            return
        for block, h in zip(blocks[start:end], self.block_hashes(seq, end)[start:end], strict=True):
            self.pool.cache_block(block, h)
        self._num_hashed[rid] = end

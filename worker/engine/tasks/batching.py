"""Helpers shared by the encoder executors (classify, extractive QA, translate): queueing and batch picking.

These executors run a whole request (or a whole QA window) in one forward, so they need no KV blocks:
only a priority queue of waiting work and a rule that fills a step under the token budget.

Packed batches (`pick_packed`; classify and extractive QA on models that pack, see encoder/packing.py) cost
exactly their real tokens, so items join in queue order, first fit::

    waiting, in priority order:   A(120)  B(300)  C(500)  D(28)      budget 512 tokens, cap 8
    A -> 120;  B -> 420;  C -> 920 over budget, skipped;  D -> 448
    this step: A, B, D (448 tokens, no padding); C is the next step's head

Padded batches (`pick_batch`: translation, and encoders that cannot pack) cost `len(batch) * longest_item`
tokens, so they bucket by length::

    waiting, in priority order:   A(120)  B(30)  C(500)  D(28)  E(33)      budget 512 tokens, cap 8
    head = A (always runs), then the others by closeness in length to 120, same priority first:
    E -> 2 * 120 = 240 ok;  B -> 360 ok;  D -> 480 ok;  C -> 5 * 500 = 2500 over budget, skipped
    this step: A, E, B, D (480 padded tokens); C is the next step's head

Only the first `lookahead(max_items)` waiting items are candidates of a step (and of the per-step check for
finished or expired requests; the whole queue is checked every `FULL_SCAN_S`): a bulk of thousands waiting
then costs each step O(its batch), not O(queue) (a 4,000-text bulk spent a third of the engine thread in
these scans). The queue is sorted, so the window holds the most urgent items.

Invariants:
- the head (lowest priority value, then earliest arrival) is always in the step's batch, even if it alone
  exceeds the budget -- so every step makes progress and nothing waits behind a smaller request forever;
- a lower-priority item joins a batch only after every higher-priority candidate was considered;
- `len(batch) <= max_items` and, beyond the head, the batch's cost (packed: the sum of lengths; padded:
  `len(batch) * max_length`) is at most `max_tokens`. A skipped item waits at most until every item ahead of
  it in the queue has run: then it is the head.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch

from pagedq.shared.errors import InvalidRequest
from pagedq.worker.engine.core.executor import EngineRequest, LoadedModel

T = TypeVar("T")

#: transformers' `model_max_length` when a tokenizer declares no limit (`VERY_LARGE_INTEGER`).
UNSET_MODEL_MAX_LENGTH = int(1e29)

_sequence = itertools.count()  # breaks ties between requests of equal priority and arrival


def order_key(request: EngineRequest) -> tuple[int, float, int]:
    """Priority (lower first), then arrival; unique per call so entries never compare equal."""
    return (request.priority, request.arrival, next(_sequence))


#: The candidates of a step: this many times its request cap, and at least LOOKAHEAD_MIN items.
LOOKAHEAD_FACTOR = 4
LOOKAHEAD_MIN = 256
#: How often `drop_finished` checks the whole queue rather than its head (seconds).
FULL_SCAN_S = 0.1


def lookahead(max_items: int) -> int:
    return max(LOOKAHEAD_MIN, LOOKAHEAD_FACTOR * max_items)


class Arrivals:
    """Requests added and not tokenized yet, most urgent first (`order_key`). A step `take`s at most its
    lookahead of them, so a bulk of thousands never holds the engine thread (and every other model on it) in
    one long tokenizer call; whatever is left ranks after everything taken."""

    def __init__(self) -> None:
        self._heap: list[tuple[tuple[int, float, int], EngineRequest]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, request: EngineRequest) -> None:
        heapq.heappush(self._heap, (order_key(request), request))

    def take(self, count: int) -> list[tuple[EngineRequest, tuple[int, float, int]]]:
        """The `count` most urgent requests (fewer if fewer wait), each with its queue key."""
        taken = [heapq.heappop(self._heap) for _ in range(min(count, len(self._heap)))]
        return [(request, key) for key, request in taken]

    def remove(self, request_id: str) -> list[EngineRequest]:
        """Take the request with this id out (aborted); returns it, or nothing if it is not here."""
        held = [request for _, request in self._heap if request.id == request_id]
        if held:
            self._heap = [(key, request) for key, request in self._heap if request.id != request_id]
            heapq.heapify(self._heap)
        return held


class WaitingQueue(Generic[T]):
    """Items of type T held in `order_key` order, each tagged with the request it belongs to.

    A request may own several items (QA windows). A sorted list: insertion is a bisect plus a C-level list
    insert, the head is a slice, and removing a step's batch (near the head) scans only up to its last item.
    """

    def __init__(self) -> None:
        self._keys: list[tuple[tuple[int, float, int], int]] = []
        self._items: list[tuple[EngineRequest, T]] = []
        self.scanned_at = 0.0  # when `drop_finished` last checked every item

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple[EngineRequest, T]]:
        return iter(list(self._items))

    def push(self, request: EngineRequest, item: T, key: tuple[int, float, int], index: int = 0) -> None:
        """Insert `item` of `request`; `index` orders items of one request (e.g. window number)."""
        pos = bisect.bisect_right(self._keys, (key, index))
        self._keys.insert(pos, (key, index))
        self._items.insert(pos, (request, item))

    def remove_request(self, request_id: str) -> list[T]:
        """Remove every item of a request; returns them (empty if the request holds none)."""
        keep = [i for i, (req, _) in enumerate(self._items) if req.id != request_id]
        removed = [item for req, item in self._items if req.id == request_id]
        self._keys = [self._keys[i] for i in keep]
        self._items = [self._items[i] for i in keep]
        return removed

    def remove_items(self, items: Sequence[T]) -> None:
        """Remove these items (by identity); the scan stops at the last of them."""
        ids = {id(item) for item in items}
        left, end = len(ids), 0
        for end, (_, item) in enumerate(self._items, start=1):  # noqa: B007 - `end` is used after the loop
            if id(item) in ids:
                left -= 1
                if not left:
                    break
        keep = [i for i in range(end) if id(self._items[i][1]) not in ids]
        self._keys = [self._keys[i] for i in keep] + self._keys[end:]
        self._items = [self._items[i] for i in keep] + self._items[end:]

    def head(self, n: int) -> list[tuple[EngineRequest, T]]:
        """The first `n` items, in queue order."""
        return self._items[:n]

    def requests(self, limit: int | None = None) -> list[EngineRequest]:
        """Distinct requests with items waiting (among the first `limit` items), in queue order."""
        items = self._items if limit is None else self._items[:limit]
        return list({req.id: req for req, _ in items}.values())


def drop_finished(queue: WaitingQueue[Any], now: float | None = None, head: int | None = None) -> list[EngineRequest]:
    """Drop requests that were completed elsewhere (a caller cancelled the future): among the first `head` items,
    and in the whole queue when `head` is None or the last full check is `FULL_SCAN_S` old. Deadlines are not
    checked here: the engine loop owns them, and an expired request reaches the executor's `abort` at once."""
    now = time.time() if now is None else now
    if head is not None and now - queue.scanned_at < FULL_SCAN_S:
        requests = queue.requests(head)
    else:
        requests, queue.scanned_at = queue.requests(), now
    dropped = []
    for request in requests:
        if request.future.done():  # cancelled by its caller
            queue.remove_request(request.id)
            dropped.append(request)
    return dropped


def pick_batch(
    candidates: Sequence[tuple[EngineRequest, T]],
    length: Callable[[T], int],
    max_tokens: int,
    max_items: int,
) -> list[tuple[EngineRequest, T]]:
    """Choose this step's padded batch from candidates in queue order (see the module docstring)."""
    if not candidates:
        return []
    head = candidates[0]
    head_len = length(head[1])
    rest = sorted(candidates[1:], key=lambda c: (c[0].priority, abs(length(c[1]) - head_len)))
    batch, longest = [head], head_len
    for cand in rest:
        if len(batch) >= max_items:
            break
        new_longest = max(longest, length(cand[1]))
        if (len(batch) + 1) * new_longest <= max_tokens:
            batch.append(cand)
            longest = new_longest
    return batch


def pick_packed(
    candidates: Sequence[tuple[EngineRequest, T]],
    length: Callable[[T], int],
    max_tokens: int,
    max_items: int,
) -> list[tuple[EngineRequest, T]]:
    """Choose this step's packed batch from candidates in queue order: first fit (see the module docstring)."""
    batch: list[tuple[EngineRequest, T]] = []
    used = 0
    for cand in candidates:
        if len(batch) >= max_items or used >= max_tokens:
            break
        n = length(cand[1])
        if not batch or used + n <= max_tokens:
            batch.append(cand)
            used += n
    return batch


def input_token_limit(loaded: LoadedModel) -> int:
    """Most tokens one input may have: the spec's limit, else the tokenizer's, capped by the positions."""
    limit = loaded.spec.max_input_tokens or loaded.tokenizer.model_max_length
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit is None or limit >= UNSET_MODEL_MAX_LENGTH:
        limit = positions
    if positions is not None:
        limit = min(limit, positions)
    if limit is None:
        raise ValueError(f"model {loaded.spec.name!r} declares no maximum input length")
    return int(limit)


def too_long(num_tokens: int, limit: int, what: str = "input") -> InvalidRequest:
    return InvalidRequest(f"{what} is {num_tokens} tokens; the model's limit is {limit} (send truncate=true to cut it)")


def pad_batch(encodings: Sequence[dict[str, list[int]]], tokenizer: Any, device: Any) -> dict[str, Any]:
    """Pad token-id lists to one rectangular batch on `device`, on the tokenizer's padding side.

    Pad values: `pad_token_id` for input ids (0 if the tokenizer has none: the attention mask hides it), 0 for
    attention masks, `pad_token_type_id` for token types.
    """
    longest = max(len(enc["input_ids"]) for enc in encodings)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pad_values = {"input_ids": pad_id, "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
    left = tokenizer.padding_side == "left"
    batch = {}
    for name in encodings[0]:
        value = pad_values.get(name, 0)
        rows = []
        for enc in encodings:
            padding = [value] * (longest - len(enc[name]))
            rows.append(padding + enc[name] if left else enc[name] + padding)
        batch[name] = torch.tensor(rows, dtype=torch.long, device=device)
    return batch


def unpadded_columns(longest: int, num_tokens: int, tokenizer: Any) -> slice:
    """The columns of a `pad_batch` row that hold its `num_tokens` real tokens."""
    return slice(longest - num_tokens, longest) if tokenizer.padding_side == "left" else slice(0, num_tokens)

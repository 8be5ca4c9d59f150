"""Each row's top k for beam search: one pass of native code over the logits instead of four of torch's.

Beam search needs, per beam row, the best K = 2 * num_beams log-probabilities after generate's processors
(`beam_search.step_beams`). torch does it in four passes over a [rows, vocab] tensor -- widen bf16 to fp32,
log-softmax (max, sum of exponentials, write), then `topk` (which copies every row into (value, index) pairs)
-- about 90 ms for 256 rows of a 58k vocabulary on a busy 2-core CPU. `top_k_rows` reads each row once
(it stays in L2 for its second and third look) and writes k values:

    normalize=False   the top k of the rows as they are (fp32 log-probs, processed already): selection only,
                      so the values are the input's, bit for bit
    normalize=True    the rows are raw logits (fp32 or bf16): log_softmax = (x - max) - log(sum exp(x - max))
                      over the whole row, as torch computes it up to the rounding of the sum (blocks of
                      64 summed in fp32, the blocks in double; exp within 2 ulp); tokens in a row's `bans`
                      are left out of its top k but count in its sum, as generate bans after log-softmax

Ties keep the lower token id first. The kernel is C (`native/beam_topk.c`), compiled on first use by
`native.load_library` as the paged decode kernel is (same compiler, flags and cache; ctypes releases the
GIL; OpenMP threads from torch's team); without a compiler, or with PAGEDQ_NATIVE=0, `top_k_rows` is torch's
log_softmax + index_fill + topk (same values; ties in torch's order).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import torch

from pagedq.worker.engine.cpu.native import load_library

_SOURCE = Path(__file__).with_name("native") / "beam_topk.c"


def _configure(lib: ctypes.CDLL) -> None:
    fn = lib.pagedq_top_k_rows
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, i64, ctypes.c_int, ctypes.c_int, i64, p, p, p, p, ctypes.c_int]
    fn.restype = ctypes.c_int


def _load() -> ctypes.CDLL | None:
    return load_library(_SOURCE, _configure, "native beam top-k", "torch's log_softmax and topk")


def native_available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def top_k_rows(
    x: torch.Tensor, k: int, *, normalize: bool, bans: Sequence[Sequence[int]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's top `k` (module docstring): values fp32 [rows, k] (-inf past a row's last unbanned token)
    and token ids int64 [rows, k], best first. `x` [rows, vocab], fp32 or bf16 (normalize) or fp32 (not).
    `bans[r]`: tokens left out of row r's top k (normalize only: the rows of `normalize=False` are
    processed already)."""
    rows, vocab = x.shape
    k = min(k, vocab)
    lib = _load()
    usable = (
        lib is not None
        and x.device.type == "cpu"
        and x.dtype in ((torch.float32, torch.bfloat16) if normalize else (torch.float32,))
        and x.stride(-1) == 1
        and rows > 0
    )
    if not usable:
        return _torch_top_k_rows(x, k, normalize=normalize, bans=bans)
    assert lib is not None
    vals = torch.empty(rows, k, dtype=torch.float32)
    idx = torch.empty(rows, k, dtype=torch.int64)
    ban_start = ban_ids = None
    if bans is not None and any(bans):
        starts = [0]
        for row in bans:
            starts.append(starts[-1] + len(row))
        ban_start = torch.tensor(starts, dtype=torch.int64)
        ban_ids = torch.tensor([t for row in bans for t in row] or [0], dtype=torch.int64)
    status = lib.pagedq_top_k_rows(
        x.data_ptr(), rows, vocab, x.stride(0), x.dtype == torch.bfloat16, normalize, k,
        None if ban_start is None else ban_start.data_ptr(), None if ban_ids is None else ban_ids.data_ptr(),
        vals.data_ptr(), idx.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"beam top-k kernel failed (status {status})")
    return vals, idx


def _torch_top_k_rows(
    x: torch.Tensor, k: int, *, normalize: bool, bans: Sequence[Sequence[int]] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.log_softmax(x, dim=-1, dtype=torch.float32) if normalize else x
    if bans is not None and any(bans):
        rows = [r for r, row in enumerate(bans) for _ in row]
        tokens = [t for row in bans for t in row]
        scores = scores.clone() if scores is x else scores
        scores[torch.tensor(rows, device=x.device), torch.tensor(tokens, device=x.device)] = float("-inf")
    return torch.topk(scores, k)

"""`beam_topk.top_k_rows`: each row's best k for beam search, native and torch, against torch and float64."""

from __future__ import annotations

import os

import pytest
import torch

from pagedq.worker.engine.cpu import beam_topk
from pagedq.worker.engine.cpu.beam_topk import top_k_rows
from pagedq.worker.engine.cpu.native import c_compiler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 5003  # not a multiple of the kernel's blocks of 64


def _logits(rows: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 4


NATIVE = pytest.mark.skipif(
    c_compiler() is None or os.environ.get("PAGEDQ_NATIVE") == "0", reason="no C compiler, or PAGEDQ_NATIVE=0"
)


@NATIVE
def test_the_kernel_is_built() -> None:
    """Where the decode kernel builds (a C compiler), this one does too: otherwise the tests below would
    only test the torch fallback."""
    assert beam_topk.native_available()


def test_selection_returns_torchs_values_bit_for_bit() -> None:
    scores = torch.log_softmax(_logits(), dim=-1)
    scores[0] = float("-inf")
    scores[0, 7] = 0.0  # a forced row: one finite score
    scores[1, :100] = float("-inf")
    values, ids = top_k_rows(scores, 8, normalize=False)
    want_values, want_ids = torch.topk(scores, 8)
    assert torch.equal(values, want_values)
    assert torch.equal(ids[1:], want_ids[1:])  # no ties among finite random scores
    assert ids[0, 0] == 7 and bool(torch.isinf(values[0, 1:]).all())
    assert torch.equal(torch.gather(scores, 1, ids), values)


@NATIVE
def test_ties_keep_the_lower_token_first() -> None:
    """The kernel's order (the torch fallback keeps torch's `topk` order)."""
    scores = torch.full((1, VOCAB), -5.0)
    scores[0, [900, 30, 4000, 12]] = -1.0
    values, ids = top_k_rows(scores, 6, normalize=False)
    assert ids[0].tolist() == [12, 30, 900, 4000, 0, 1]
    assert values[0].tolist() == [-1.0] * 4 + [-5.0] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalized_rows_are_the_log_softmax_of_the_whole_row(dtype: torch.dtype) -> None:
    logits = _logits(seed=1).to(dtype)
    bans = [[int(logits[r].float().argmax()), 3] if r % 2 else [] for r in range(logits.shape[0])]
    values, ids = top_k_rows(logits, 8, normalize=True, bans=bans)
    exact = torch.log_softmax(logits.double(), dim=-1)  # banned tokens count in the sum
    assert float((values.double() - exact.gather(1, ids)).abs().max()) < 2e-6
    for r, banned in enumerate(bans):
        assert not set(banned) & set(ids[r].tolist())
        allowed = exact[r].clone()
        allowed[banned] = float("-inf")
        assert torch.equal(allowed.gather(0, ids[r]).sort(descending=True).values, allowed.topk(8).values)


def test_rows_are_read_in_place_and_fewer_tokens_than_k() -> None:
    wide = _logits(rows=4, seed=2)
    rows = wide[:, : VOCAB - 3]  # a strided view: each row contiguous, rows VOCAB apart
    values, ids = top_k_rows(rows, 5, normalize=True)
    want = torch.log_softmax(rows, dim=-1).topk(5)
    assert torch.equal(ids, want.indices)
    assert float((values - want.values).abs().max()) < 1e-5
    empty = torch.full((1, 9), float("-inf"))
    assert torch.isinf(top_k_rows(empty, 3, normalize=True)[0]).all()  # not NaN
    few = torch.randn(2, 6)
    values, ids = top_k_rows(few, 5, normalize=True, bans=[[0, 1, 2, 3], []])
    assert torch.isinf(values[0, 2:]).all() and set(ids[0, :2].tolist()) == {4, 5}


def test_the_torch_fallback_gives_the_same_values() -> None:
    logits = _logits(seed=3)
    bans = [[5], [], [6, 7]] * 8
    native = top_k_rows(logits, 8, normalize=True, bans=bans)
    fallback = beam_topk._torch_top_k_rows(logits, 8, normalize=True, bans=bans)
    assert torch.equal(native[1], fallback[1])
    assert float((native[0] - fallback[0]).abs().max()) < 1e-5

"""The seq2seq runner's logits against the model's own forward (teacher forcing), as accurate as it.

Reference: the model's forward in float64. The runner's fp32 logits must be as close to it as
transformers' own fp32 forward is (within a factor of 2, plus 2e-6 of the logits' scale): packed rows,
paged K/V and the native kernel sum in other orders than transformers' padded SDPA, so the runner is not
bit-equal to it; its error is the same size.

Random-weight outputs are repetitive, so equal tokens alone could hide a wrong position or a wrong
cross-attention row; logits cannot. One packed step mixes recomputed prefixes (multi-row segments),
single-row decodes and a request whose encoder runs in the same step.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from seq2seq_support import FIRST_WORD, START, VOCAB, build_pair, random_inputs

from pagedq.worker.engine.core.request import TokenSequence
from pagedq.worker.engine.decoding.sampling import SamplingParams
from pagedq.worker.engine.paged.block_pool import BlockPool
from pagedq.worker.engine.paged.kv_cache_manager import KVCacheManager
from pagedq.worker.engine.seq2seq.model import DecoderShape
from pagedq.worker.engine.seq2seq.runner import Seq2SeqRunner, StepItem

BLOCK_SIZE = 4
ERROR_FACTOR = 2.0  # our error against float64 may be this many times transformers' fp32 error ...
ERROR_FLOOR = 2e-6  # ... plus this much of the largest |logit|


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Harness:
    """A runner over a fresh pool, with hand-made requests (no scheduler)."""

    def __init__(self, model: Any, num_blocks: int = 256, native_decode: bool | None = None) -> None:
        pool = self.pool = DecoderShape.of(model).pool(num_blocks, BLOCK_SIZE, torch.float32, "cpu")
        self.blocks = BlockPool(num_blocks, enable_caching=False)
        self.kv = KVCacheManager(self.blocks, BLOCK_SIZE, enable_caching=False)
        self.runner = Seq2SeqRunner(model, pool, native_decode)

    def encoder_pages(self, encoder_ids: list[int]) -> list[int]:
        return [b.block_id for b in self.blocks.allocate(math.ceil(len(encoder_ids) / BLOCK_SIZE))]

    def item(self, encoder_ids: list[int], seqs: list[TokenSequence], cross: list[int], encode: bool) -> StepItem:
        for seq in seqs:
            assert self.kv.allocate_slots(seq, seq.num_tokens - seq.num_computed_tokens)
        tables = [self.kv.block_ids(s.seq_id) for s in seqs]
        return StepItem(seqs, tables, cross, len(encoder_ids), encoder_ids if encode else None)

    def run(self, items: list[StepItem]) -> torch.Tensor:
        logits = self.runner.execute(items, self.kv.take_copies())
        for item in items:
            for seq in item.sequences:
                seq.num_computed_tokens = seq.num_tokens
        return logits


def sequence(name: str, tokens: list[int]) -> TokenSequence:
    seq = TokenSequence(name, [START], SamplingParams())
    for token in tokens:
        seq.append_output(token)
    return seq


class Reference:
    """The untouched model in fp32 (transformers' own error) and in float64 (the exact logits)."""

    def __init__(self, model: Any) -> None:
        self.fp32, self.fp64 = model, copy.deepcopy(model).double()

    def assert_close(self, got: torch.Tensor, encoder_ids: list[int], decoder_ids: list[int]) -> None:
        exact = self.logits(self.fp64, encoder_ids, decoder_ids)
        scale = float(exact.abs().max())
        theirs = float((self.logits(self.fp32, encoder_ids, decoder_ids) - exact).abs().max())
        ours = float((got.double() - exact).abs().max())
        limit = ERROR_FACTOR * theirs + ERROR_FLOOR * scale
        assert ours <= limit, f"logits off by {ours:.3g} (transformers fp32: {theirs:.3g}, scale {scale:.3g})"

    @staticmethod
    def logits(model: Any, encoder_ids: list[int], decoder_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([encoder_ids]), decoder_input_ids=torch.tensor([decoder_ids]))
        return out.logits[0, -1].double()


@pytest.mark.parametrize("native", [None, False], ids=["auto", "portable"])
@pytest.mark.parametrize("arch", ["marian", "bart", "mbart", "t5", "m2m100", "t5_narrow"])
def test_packed_steps_equal_the_model_forward(arch: str, native: bool | None) -> None:
    """Auto: the native kernel for decode rows and cross-attention where built; portable: SDPA buckets."""
    pair = build_pair(arch)
    reference = Reference(pair.reference)
    harness = Harness(pair.model, native_decode=native)
    gen = torch.Generator().manual_seed(0)
    inputs = random_inputs(5, lengths=(2, 45), seed=11)
    prefixes = [torch.randint(FIRST_WORD, VOCAB, (n,), generator=gen).tolist() for n in (0, 3, 9, 17)]
    crosses = [harness.encoder_pages(x) for x in inputs]
    # request 0..3: one sequence each, prefixes recomputed (segments) or a single start row
    # request 4: two beams with different prefixes, joins in the second step
    seqs = [[sequence(f"r{i}", prefixes[i])] for i in range(4)]
    seqs.append([sequence("r4a", prefixes[2]), sequence("r4b", prefixes[3][:5])])

    first = [harness.item(inputs[i], seqs[i], crosses[i], encode=True) for i in range(4)]
    logits = harness.run(first)
    for row, i in enumerate(range(4)):
        reference.assert_close(logits[row], inputs[i], seqs[i][0].all_token_ids)

    for i in range(4):  # every running sequence decodes one more token; request 4's encoder runs now
        seqs[i][0].append_output(int(torch.randint(FIRST_WORD, VOCAB, (1,), generator=gen)))
    second = [harness.item(inputs[i], seqs[i], crosses[i], encode=i == 4) for i in (3, 4, 0, 1, 2)]
    logits = harness.run(second)
    order = [(3, 0), (4, 0), (4, 1), (0, 0), (1, 0), (2, 0)]
    for row, (i, s) in enumerate(order):
        reference.assert_close(logits[row], inputs[i], seqs[i][s].all_token_ids)


def test_t5_encoder_runs_in_several_passes_when_long() -> None:
    """T5 builds a [heads, T, T] bias per encoder pass, so long admissions are split (same logits)."""
    pair = build_pair("t5")
    reference = Reference(pair.reference)
    harness = Harness(pair.model, num_blocks=512)
    inputs = [list(range(FIRST_WORD, FIRST_WORD + 60)) * 3 for _ in range(4)]  # 720 tokens > one pass
    crosses = [harness.encoder_pages(x) for x in inputs]
    seqs = [[sequence(f"t{i}", [FIRST_WORD + i])] for i in range(4)]
    logits = harness.run([harness.item(x, s, c, encode=True) for x, s, c in zip(inputs, seqs, crosses, strict=True)])
    for row, (x, s) in enumerate(zip(inputs, seqs, strict=True)):
        reference.assert_close(logits[row], x, s[0].all_token_ids)

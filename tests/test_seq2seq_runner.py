"""The seq2seq runner's logits against the model's own forward (teacher forcing), within 2e-5 of their scale.

Random-weight outputs are repetitive, so equal tokens alone could hide a wrong position or a wrong
cross-attention row; logits cannot. One packed step mixes recomputed prefixes (multi-row segments),
single-row decodes and a request whose encoder runs in the same step.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from seq2seq_support import FIRST_WORD, START, VOCAB, build_pair, random_inputs

from worker.engine.block_pool import BlockPool
from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.request import Request
from worker.engine.sampling import SamplingParams
from worker.engine.seq2seq_attention import KVPool
from worker.engine.seq2seq_model import DecoderShape
from worker.engine.seq2seq_runner import Seq2SeqRunner, StepItem

BLOCK_SIZE = 4
#: of the largest |logit|: the wide-init T5 has logits in the hundreds, where transformers' own sdpa and
#: eager paths already differ by 4e-6 of the scale (measured); the others are exact to ~1e-6.
TOLERANCE = 2e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Harness:
    """A runner over a fresh pool, with hand-made requests (no scheduler)."""

    def __init__(self, model: Any, num_blocks: int = 256) -> None:
        shape = DecoderShape.of(model)
        pool = KVPool(shape.num_layers, num_blocks, BLOCK_SIZE, shape.num_heads, shape.head_dim,
                            torch.float32, "cpu")  # fmt: skip
        self.blocks = BlockPool(num_blocks, enable_caching=False)
        self.kv = KVCacheManager(self.blocks, BLOCK_SIZE, enable_caching=False)
        self.runner = Seq2SeqRunner(model, pool)

    def item(self, encoder_ids: list[int], seqs: list[Request], cross: list[int], encode: bool) -> StepItem:
        for seq in seqs:
            assert self.kv.allocate_slots(seq, seq.num_tokens - seq.num_computed_tokens)
        tables = [self.kv.block_ids(s.request_id) for s in seqs]
        return StepItem(seqs, tables, cross, len(encoder_ids), encoder_ids if encode else None)

    def run(self, items: list[StepItem]) -> torch.Tensor:
        logits = self.runner.execute(items, self.kv.take_copies())
        for item in items:
            for seq in item.sequences:
                seq.num_computed_tokens = seq.num_tokens
        return logits


def sequence(name: str, tokens: list[int]) -> Request:
    seq = Request(name, [START], SamplingParams())
    for token in tokens:
        seq.append_output(token)
    return seq


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= TOLERANCE * scale, f"logits differ beyond {TOLERANCE} of {scale}"


def reference_logits(reference: Any, encoder_ids: list[int], decoder_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = reference(input_ids=torch.tensor([encoder_ids]), decoder_input_ids=torch.tensor([decoder_ids]))
    return out.logits[0, -1].float()


@pytest.mark.parametrize("arch", ["marian", "bart", "mbart", "t5", "m2m100"])
def test_packed_steps_equal_the_model_forward(arch: str) -> None:
    pair = build_pair(arch)
    harness = Harness(pair.model)
    gen = torch.Generator().manual_seed(0)
    inputs = random_inputs(5, lengths=(2, 45), seed=11)
    prefixes = [torch.randint(FIRST_WORD, VOCAB, (n,), generator=gen).tolist() for n in (0, 3, 9, 17)]
    crosses = [[b.block_id for b in harness.blocks.allocate(math.ceil(len(x) / BLOCK_SIZE))] for x in inputs]
    # request 0..3: one sequence each, prefixes recomputed (segments) or a single start row
    # request 4: two beams with different prefixes, joins in the second step
    seqs = [[sequence(f"r{i}", prefixes[i])] for i in range(4)]
    seqs.append([sequence("r4a", prefixes[2]), sequence("r4b", prefixes[3][:5])])

    first = [harness.item(inputs[i], seqs[i], crosses[i], encode=True) for i in range(4)]
    logits = harness.run(first)
    for row, i in enumerate(range(4)):
        want = reference_logits(pair.reference, inputs[i], seqs[i][0].all_token_ids)
        assert_close(logits[row], want)

    for i in range(4):  # every running sequence decodes one more token; request 4's encoder runs now
        seqs[i][0].append_output(int(torch.randint(FIRST_WORD, VOCAB, (1,), generator=gen)))
    second = [harness.item(inputs[i], seqs[i], crosses[i], encode=i == 4) for i in (3, 4, 0, 1, 2)]
    logits = harness.run(second)
    order = [(3, 0), (4, 0), (4, 1), (0, 0), (1, 0), (2, 0)]
    for row, (i, s) in enumerate(order):
        want = reference_logits(pair.reference, inputs[i], seqs[i][s].all_token_ids)
        assert_close(logits[row], want)


def test_t5_encoder_runs_in_several_passes_when_long() -> None:
    """T5 builds a [heads, T, T] bias per encoder pass, so long admissions are split (same logits)."""
    pair = build_pair("t5")
    harness = Harness(pair.model, num_blocks=512)
    inputs = [list(range(FIRST_WORD, FIRST_WORD + 60)) * 3 for _ in range(4)]  # 720 tokens > one pass
    crosses = [[b.block_id for b in harness.blocks.allocate(math.ceil(len(x) / BLOCK_SIZE))] for x in inputs]
    seqs = [[sequence(f"t{i}", [FIRST_WORD + i])] for i in range(4)]
    logits = harness.run([harness.item(x, s, c, encode=True) for x, s, c in zip(inputs, seqs, crosses, strict=True)])
    for row, (x, s) in enumerate(zip(inputs, seqs, strict=True)):
        assert_close(logits[row], reference_logits(pair.reference, x, s[0].all_token_ids))

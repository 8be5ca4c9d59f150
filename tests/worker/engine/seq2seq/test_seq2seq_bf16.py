"""bf16: the paged engine against transformers' own bf16 forward and generate, and both against fp32.

Two programs that round every activation to 8 mantissa bits in different orders cannot agree bit for bit,
so bf16 is held to what transformers' own bf16 achieves. On a sharp-attention Marian and T5 (16 sentences,
12 decoder steps teacher-forced on fp32 greedy's tokens; measured 2026-12 on the AVX-512 + AMX machine):

    distance to the fp32 forward   max |logit|   transformers bf16     pagedq bf16 (kernel / SDPA cross / portable)
    Marian                         2.8           0.056 (mean 0.0070)   0.053 / 0.069 / 0.069 (mean 0.0071-0.0072)
    T5 (t5_narrow)                 41.8          2.63  (mean 0.318)    2.57  / 2.63  / 2.63  (mean 0.310-0.315)

    greedy argmax = fp32's at a step (of 192): Marian 191 (transformers), 191 / 192 / 190 (pagedq); T5 all
    free-running greedy = fp32 generate (of 16): Marian 15 (transformers) and 15 (pagedq); T5 16 and 16 (on an
    AVX512-BF16 CPU without AMX: Marian 16 (transformers), 14 on the portable path)
    free-running beam 4 = fp32 generate (of 16): Marian 14 (transformers), 14 / 13 / 14 (pagedq); T5 all 16;
    pagedq bf16 beam 4 = transformers' bf16 beam 4: Marian 16 / 11 / 13, T5 16

On an AMD EPYC with AVX512-BF16 and no AMX (2026-12-02): Marian transformers bf16 max 0.050 (mean 0.0070),
pagedq 0.053 / 0.069 / 0.077 (means 0.0071); T5 2.63 against 2.57 / 2.63 / 2.63; agreement 191 against
191 / 192 / 190. The max of ~200,000 differences is one rounding cascade: 1.23x transformers' on the AMX machine,
1.52x here on the portable path, with the means within 2%. So the mean is held to 1.25x and the max to 2x.

The tests assert the engine stays within those ratios of transformers' bf16 distances and loses at most
`FEWER_AGREEING` agreements. Also: the load-time self-check (the engine against the bf16
forward it replaces, teacher-forced: same greedy token at every step, logits within 6% of max |logit|)
passes, with Marian within 0.1 and T5 within 1.0.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from seq2seq_support import build_pair, random_inputs, teacher_forced_logits

from pagedq.shared.models import GenerationOptions
from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.decoding.seq2seq_options import decode_settings
from pagedq.worker.engine.seq2seq.engine import Seq2SeqEngine
from pagedq.worker.engine.seq2seq.self_check import RELATIVE_TOLERANCE, self_check

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: "t5_narrow" is a T5Config model with T5's default initialisation (the "t5" test model's x4 init puts
#: attention scores in the hundreds, where bf16's spacing alone is several units)
MAX_LOGIT_ERROR = {"marian": 0.1, "t5_narrow": 1.0}
WORSE_THAN_TRANSFORMERS = 2.0  # max distance (one outlier; see the module docstring); the mean within 1.25x
FEWER_AGREEING = 2  # teacher-forced greedy steps, of 192; free-running greedy and beam sentences, of 16
STEPS = 12


#: the engine's attention paths: the native kernel everywhere; gather + SDPA everywhere (other devices)
PATHS = ["kernel", "portable"]


def _engine(model: Any, path: str = "kernel") -> Seq2SeqEngine:
    config = EngineConfig(max_batch_tokens=512, block_size=4)
    return Seq2SeqEngine(model, config, num_blocks=512, native_decode=False if path == "portable" else None)


@pytest.mark.parametrize("arch", sorted(MAX_LOGIT_ERROR))
def test_bf16_agrees_with_transformers_bf16(arch: str) -> None:
    pair = build_pair(arch, sharp=True)
    pair.model.to(torch.bfloat16)
    pair.reference.to(torch.bfloat16)
    engine = _engine(pair.model)
    assert engine.pool.pages.dtype == torch.bfloat16
    verdict = self_check(engine)
    assert verdict.passed, verdict.reason  # greedy tokens equal at every step, logits within 6% of max |logit|
    assert RELATIVE_TOLERANCE[torch.bfloat16] == 6e-2
    assert verdict.max_logit_error <= MAX_LOGIT_ERROR[arch]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ["marian", "t5_narrow"])
def test_bf16_is_as_close_to_fp32_as_transformers_bf16(arch: str, path: str) -> None:
    """Teacher-forced logits and greedy picks, and free-running greedy, against fp32 (module docstring)."""
    pair = build_pair(arch, sharp=True)
    fp32 = pair.reference
    start = fp32.generation_config.decoder_start_token_id
    inputs = random_inputs(16, lengths=(3, 40), seed=3)
    with torch.no_grad():
        teacher = [
            fp32.generate(torch.tensor([ids]), max_new_tokens=STEPS, min_new_tokens=STEPS)[0, 1:].tolist()
            for ids in inputs
        ]
    transformers_bf16 = copy.deepcopy(fp32).to(torch.bfloat16)

    def forward(model: Any) -> list[torch.Tensor]:
        with torch.no_grad():
            decoder = [torch.tensor([[start, *tokens[:-1]]]) for tokens in teacher]
            return [
                model(input_ids=torch.tensor([ids]), decoder_input_ids=d).logits[0].float()
                for ids, d in zip(inputs, decoder, strict=True)
            ]

    reference = forward(fp32)
    theirs = forward(transformers_bf16)
    engine = _engine(pair.model.to(torch.bfloat16), path)
    ours = teacher_forced_logits(engine, inputs, teacher)

    def distances(logits: list[torch.Tensor]) -> tuple[float, float, int]:
        diffs = [(a - b).abs() for a, b in zip(logits, reference, strict=True)]
        agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits, reference, strict=True))
        return max(float(d.max()) for d in diffs), sum(float(d.mean()) for d in diffs) / len(diffs), agree

    (their_max, their_mean, their_agree), (our_max, our_mean, our_agree) = distances(theirs), distances(ours)
    assert our_max <= WORSE_THAN_TRANSFORMERS * their_max, (our_max, their_max)
    assert our_mean <= 1.25 * their_mean, (our_mean, their_mean)
    assert our_agree >= their_agree - FEWER_AGREEING, (our_agree, their_agree)

    with torch.no_grad():
        greedy_fp32 = [fp32.generate(torch.tensor([ids]), max_new_tokens=STEPS)[0, 1:].tolist() for ids in inputs]
        greedy_theirs = [
            transformers_bf16.generate(torch.tensor([ids]), max_new_tokens=STEPS)[0, 1:].tolist() for ids in inputs
        ]
    settings = decode_settings(engine.model, GenerationOptions(max_new_tokens=STEPS))
    greedy_ours = [out.output_token_ids for out in engine.generate(inputs, settings)]
    their_equal = sum(a == b for a, b in zip(greedy_theirs, greedy_fp32, strict=True))
    our_equal = sum(a == b for a, b in zip(greedy_ours, greedy_fp32, strict=True))
    assert our_equal >= their_equal - FEWER_AGREEING, (our_equal, their_equal)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ["marian", "t5_narrow"])
def test_bf16_beam_search_is_as_close_to_fp32_as_transformers_bf16(arch: str, path: str) -> None:
    """Beam 4 in bf16 (each row's log-softmax and top k in one native pass) against fp32 generate, as
    transformers' bf16 generate is (module docstring)."""
    pair = build_pair(arch, sharp=True, num_beams=4)
    fp32 = pair.reference
    inputs = random_inputs(16, lengths=(3, 40), seed=3)
    transformers_bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    with torch.no_grad():
        want = [fp32.generate(torch.tensor([ids]), max_new_tokens=STEPS)[0, 1:].tolist() for ids in inputs]
        theirs = [
            transformers_bf16.generate(torch.tensor([ids]), max_new_tokens=STEPS)[0, 1:].tolist() for ids in inputs
        ]
    engine = _engine(pair.model.to(torch.bfloat16), path)
    ours = engine.generate(inputs, decode_settings(engine.model, GenerationOptions(max_new_tokens=STEPS)))
    their_equal = sum(a == b for a, b in zip(theirs, want, strict=True))
    our_equal = sum(out.output_token_ids == b for out, b in zip(ours, want, strict=True))
    assert our_equal >= their_equal - FEWER_AGREEING, (our_equal, their_equal)

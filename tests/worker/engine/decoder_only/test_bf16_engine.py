"""bf16 end to end through LLMEngine: a bf16 Llama (8 heads on 4 kv heads, head_dim 32, sharp attention) with a
bf16 KV pool, decode rows through the native kernel (bf16 blocks read in place) or the portable path, packed
steps and chunked prefills, greedy picks on the bf16 logits.

Against transformers' own bf16 (`generate` and the forward, same weights):
- greedy tokens equal `generate`'s, except after a near-tie: where a request's tokens first differ, the two
  picks' logits in transformers' own forward are within `TIE` (measured: 13 of 16 requests equal throughout,
  the others part at margins of 0, 0.0039 and 0.0039 -- one bf16 ulp at 1, these logits are O(1));
- every sampled logits row within `BF16_TOL` of transformers' bf16 forward (measured max 0.022).

Against fp32 (the same weights before the cast; teacher-forced on the bf16 engine's own tokens):
- max logit distance within `FP32_TOL` (measured 0.103; transformers' own bf16 forward: 0.101 on the same
  tokens), and no worse than transformers' own bf16 plus `BF16_TOL`;
- greedy picks agree on at least `FP32_AGREE` of the steps (measured 183 of 192 = 95%; transformers' own bf16
  forward: 184 of 192), and where they differ, fp32's own top two are within `FP32_TIE` (measured at most
  0.014: near-ties, these random logits are O(1)).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.cpu.native import paged_decode_available
from pagedq.worker.engine.decoder_only.engine import LLMEngine
from pagedq.worker.engine.decoding.sampling import SamplingParams
from worker.engine.families import sharp_gqa_llama
from worker.engine.helpers import TinyModel, one_torch_thread, random_prompts, recorded_logits, reference_logits

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)
TIE = 0.05
BF16_TOL = 0.05
FP32_TOL = 0.25
FP32_AGREE = 0.85
FP32_TIE = 0.1
NEW_TOKENS = 12
LENGTHS = [3, 17, 40, 64, 90, 33, 8, 120, 5, 70, 25, 49, 100, 12, 60, 31]


@pytest.fixture(scope="module")
def models() -> tuple[LlamaForCausalLM, TinyModel]:
    """The fp32 model (sharpened: scores reach ~30) and its bf16 cast, with a reference copy for `generate`."""
    fp32 = sharp_gqa_llama()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    return fp32, TinyModel("llama-bf16", bf16, copy.deepcopy(bf16))


def _run(tm: TinyModel, native: bool | None) -> tuple[list, dict[str, list[torch.Tensor]], list[list[int]]]:
    config = EngineConfig(block_size=16, max_batch_tokens=48, max_running_requests=8)
    engine = LLMEngine(tm.model, config=config, num_blocks=96, native_decode=native)
    assert engine.cache.key_cache.dtype == torch.bfloat16
    assert engine.runner.native_decode == (native is None and paged_decode_available())
    prompts = random_prompts(LENGTHS, seed=11)
    with recorded_logits(engine) as logits:
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    return outs, logits, prompts


@pytest.mark.parametrize("native", [None, False], ids=["auto", "portable"])
def test_bf16_greedy_equals_generate_but_for_near_ties(native: bool | None, models: tuple) -> None:
    _, tm = models
    outs, logits, prompts = _run(tm, native)
    equal = 0
    for out, prompt in zip(outs, prompts, strict=True):
        got, want = out.output_token_ids, tm.expected(prompt, NEW_TOKENS)
        rows = torch.stack(logits[out.request_id])
        assert rows.dtype == torch.bfloat16  # the model's logits, no fp32 copy
        ref = reference_logits(tm.reference, prompt, got)
        err = (rows.float() - ref).abs().max().item()
        assert err < BF16_TOL, f"prompt of {len(prompt)}: bf16 logits differ from transformers' by {err:.3f}"
        if got == want:
            equal += 1
            continue
        step = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        margin = abs(float(ref[step, want[step]] - ref[step, got[step]]))
        assert margin <= TIE, f"prompt of {len(prompt)}: token {step} differs from generate's by {margin:.3f}"
    assert equal >= len(prompts) // 2, f"only {equal} of {len(prompts)} requests equal generate's throughout"


def test_bf16_agrees_with_fp32(models: tuple) -> None:
    fp32, tm = models
    outs, logits, prompts = _run(tm, None)
    worst = worst_hf = 0.0
    agree = steps = 0
    for out, prompt in zip(outs, prompts, strict=True):
        rows = torch.stack(logits[out.request_id]).float()
        ref32 = reference_logits(fp32, prompt, out.output_token_ids)
        hf16 = reference_logits(tm.reference, prompt, out.output_token_ids)  # transformers' own bf16
        worst = max(worst, (rows - ref32).abs().max().item())
        worst_hf = max(worst_hf, (hf16 - ref32).abs().max().item())
        same = rows.argmax(-1) == ref32.argmax(-1)
        agree, steps = agree + int(same.sum()), steps + same.numel()
        top2 = ref32.topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1])[~same]
        assert (margins <= FP32_TIE).all(), f"bf16 and fp32 part where fp32's top two are {margins.max():.3f} apart"
    assert worst < FP32_TOL, f"bf16 logits are {worst:.3f} from fp32"
    assert worst < worst_hf + BF16_TOL, f"bf16 logits are {worst:.3f} from fp32, transformers' bf16 {worst_hf:.3f}"
    assert agree / steps >= FP32_AGREE, f"greedy picks agree with fp32 on {agree} of {steps} steps"

"""Every causal-LM family users commonly serve is exact on the paged path or refused with a reason.

Exact: greedy output token for token equal to transformers' `generate`, and every sampled logits row within
`LOGIT_TOL` of transformers' own forward on that request alone -- with sharp attention (scores ~30, see
families.py), packed steps, chunked prefills, shared-prefix (cascade) decode rows, and decode rows through
the native kernel (`auto`, where built) or the portable gather + SDPA path.
"""

from __future__ import annotations

import pytest
import torch

from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.cpu.native import paged_decode_available
from pagedq.worker.engine.decoder_only import runner as model_runner
from pagedq.worker.engine.decoder_only.engine import LLMEngine
from pagedq.worker.engine.decoder_only.self_check import UnsupportedModel
from pagedq.worker.engine.decoding.sampling import SamplingParams
from pagedq.worker.engine.paged.decode_plan import DecodePlan
from worker.engine.families import FAMILY_BUILDERS, build_family, max_attention_score
from worker.engine.helpers import TinyModel, one_torch_thread, random_prompts, recorded_logits, reference_logits, run

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)
LOGIT_TOL = 1e-4  # fp32, absolute (logits of these models are O(1..10))
# Against transformers' own forward in the same dtype (measured max |logit diff|, sharp attention, logits ~10:
# bf16 0.004 Llama, 0.013 Gemma-2, 0.009 GPT-OSS; fp16 0.0007 Llama, 0.0007 Qwen2):
BF16_LOGIT_TOL = 0.05
FP16_LOGIT_TOL = 0.005
REFUSED = {
    "stablelm": "does not support custom attention backends",
    "falcon": "does not support custom attention backends",
    "phi3_longrope": "longrope rotary scaling",
}
EXACT = [name for name in FAMILY_BUILDERS if name not in REFUSED]


@pytest.fixture(scope="module")
def families() -> dict[str, TinyModel]:
    return {}


def family(cache: dict[str, TinyModel], name: str) -> TinyModel:
    if name not in cache:
        cache[name] = build_family(name)
    return cache[name]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def test_test_models_attend_sharply(families: dict[str, TinyModel]) -> None:
    """The sharpening is real: some attention score reaches tens (random tiny models stay near 0.1)."""
    for name in EXACT:
        assert max_attention_score(family(families, name).model) > 15, name


@pytest.mark.parametrize("native", [None, False], ids=["auto", "portable"])
@pytest.mark.parametrize("name", EXACT)
def test_exact(name: str, native: bool | None, families: dict[str, TinyModel], monkeypatch: pytest.MonkeyPatch) -> None:
    tm = family(families, name)
    shared = random_prompts([9], seed=7)[0]  # 2 full blocks of 4 + 1: rows sharing them form a cascade group
    prompts = random_prompts([3, 21, 40], seed=2) + random_prompts([5, 2], seed=3, prefix=shared)
    new = [6, 5, 7, 6, 5]
    config = EngineConfig(max_batch_tokens=16, max_running_requests=5, block_size=4)
    engine = LLMEngine(tm.model, config=config, num_blocks=96, namespace=name, cascade_min_tokens=4,
                       native_decode=native)  # fmt: skip
    assert engine.runner.native_decode == (native is None and paged_decode_available())
    names = [f"r{i}" for i in range(len(prompts))]
    arrivals: dict[int, list] = {0: [], 2: []}
    for i, (rid, prompt, n) in enumerate(zip(names, prompts, new, strict=True)):
        arrivals[0 if i % 2 == 0 else 2].append((rid, prompt, greedy(n)))
    plans: list[DecodePlan] = []
    real_plan = model_runner.plan_decode
    monkeypatch.setattr(model_runner, "plan_decode", lambda *a: plans.append(real_plan(*a)) or plans[-1])
    with recorded_logits(engine) as logits:
        done = run(engine, arrivals)
    assert any(p.cascades for p in plans) and any(p.buckets for p in plans)  # both decode paths ran
    for rid, prompt, n in zip(names, prompts, new, strict=True):
        out = done[rid].output_token_ids
        assert out == tm.expected(prompt, n), f"{name} {rid}"
        ref = reference_logits(tm.reference, prompt, out)
        err = (torch.stack(logits[rid]) - ref).abs().max().item()
        assert err < LOGIT_TOL, f"{name} {rid}: logits differ by {err:.2e}"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_with_reason(name: str, caplog: pytest.LogCaptureFixture) -> None:
    model = build_family(name).model
    with pytest.raises(UnsupportedModel, match=REFUSED[name]):
        LLMEngine(model, config=EngineConfig(block_size=4), num_blocks=64, namespace=name)
    refusals = [r for r in caplog.records if "refusing model" in r.getMessage()]
    assert len(refusals) == 1 and REFUSED[name] in refusals[0].getMessage()


def test_longrope_accepted_under_its_switch_point() -> None:
    """With every request under `original_max_position_embeddings`, LongRoPE's factors never change."""
    tm = build_family("phi3_longrope")
    engine = LLMEngine(tm.model, config=EngineConfig(block_size=4), num_blocks=64, max_model_len=32)
    prompts = random_prompts([4, 17], seed=5)
    outs = engine.generate(prompts, greedy(6))
    for out, prompt in zip(outs, prompts, strict=True):
        assert out.output_token_ids == tm.expected(prompt, 6)


@pytest.mark.parametrize(("name", "dtype"), [("llama", torch.bfloat16), ("gemma2", torch.bfloat16),
                                             ("gpt_oss", torch.bfloat16), ("llama", torch.float16),
                                             ("qwen2", torch.float16)])
def test_half_precision_matches_transformers_in_the_same_dtype(name: str, dtype: torch.dtype) -> None:
    """bf16 / fp16: greedy equal to `generate` in that dtype; logits within `BF16_LOGIT_TOL` /
    `FP16_LOGIT_TOL` of transformers' own forward in that dtype."""
    tolerance = BF16_LOGIT_TOL if dtype == torch.bfloat16 else FP16_LOGIT_TOL
    tm = build_family(name, dtype=dtype)
    engine = LLMEngine(tm.model, config=EngineConfig(block_size=4, max_batch_tokens=16), num_blocks=32)
    prompts = random_prompts([5, 11], seed=8)
    with recorded_logits(engine) as logits:
        outs = engine.generate(prompts, greedy(4))
    for i, (out, prompt) in enumerate(zip(outs, prompts, strict=True)):
        assert out.output_token_ids == tm.expected(prompt, 4), f"{name} prompt {i}"
        ref = reference_logits(tm.reference, prompt, out.output_token_ids)
        err = (torch.stack(logits[out.request_id]) - ref).abs().max().item()
        assert err < tolerance, f"{name} prompt {i}: {dtype} logits differ by {err:.3f}"

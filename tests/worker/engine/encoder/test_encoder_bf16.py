"""bf16 packed encoder forwards against transformers (fp32 and bf16), and forwards cut into chunks.

The model is BERT-shaped (2 layers, hidden 128, 2 heads of 64 like BERT-base's, intermediate 512), its query
and key weights scaled by `QK_SCALE` so attention scores reach tens (asserted: tiny random models attend
almost uniformly, which hides attention errors), its classifier widened (`HEAD_STD`) so that logits differ
between texts. Texts are 8..200 tokens of one-token words, so a step packs segments of many lengths into
several attention groups with padding.

bf16 cannot equal fp32, nor another bf16 program bit for bit (rounding order); what holds, measured on the
AMX development machine (2026-12, torch 2.13; 32 texts, fp32 logits up to ~4.6, top-2 margins from 0.02):

    packed bf16 vs transformers' bf16 forward of each text alone    max |logit| 0.027, max |prob| 0.004
    packed bf16 vs transformers' fp32 forward                       max |logit| 0.064, max |prob| 0.013
    transformers' own bf16 vs its fp32 forward                      max |logit| 0.064, max |prob| 0.013
    labels, packed bf16 vs fp32                                     32 of 32 (30 with a margin > 0.2)

so the tests assert about 3x the measured distances (`BF16_LOGIT_TOLERANCE` against transformers' bf16,
`FP32_LOGIT_TOLERANCE` and `PROB_TOLERANCE` against fp32), and equal labels on every text whose fp32 top-2
margin is above `CLEAR_MARGIN` (closer texts may flip in any bf16 program, transformers' included).
"""

from __future__ import annotations

import copy
import random
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
from transformers.utils import logging as hf_logging

import pagedq.worker.engine.encoder.varlen_attention as varlen
from pagedq.shared.registry import ModelSpec
from pagedq.worker.demo.corpus import ENGLISH_WORDS
from pagedq.worker.demo.tokenizers import build_wordpiece
from pagedq.worker.engine.core.executor import LoadedModel
from pagedq.worker.engine.cpu.linear import prepare_for_host
from pagedq.worker.engine.encoder.forward import CPU_ACTIVATION_BYTES, EncoderForward, forward_token_limit
from pagedq.worker.engine.encoder.varlen_attention import Segments, varlen_attention

QK_SCALE = 4.0
HEAD_STD = 0.5
NUM_TEXTS = 32
BF16_LOGIT_TOLERANCE = 0.1
FP32_LOGIT_TOLERANCE = 0.2
PROB_TOLERANCE = 0.04
CLEAR_MARGIN = 0.2
#: bf16 attention output against an exact (fp64) attention of the same bf16 inputs, relative to max |output|:
#: the probabilities are rounded to bf16 before they weigh the values (measured 2^-8.6)
BF16_ATTENTION_TOLERANCE = 2**-7


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return build_wordpiece(BertTokenizerFast, tmp_path_factory.mktemp("wordpiece"))
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def texts(tokenizer: Any) -> list[str]:
    words = [w.lower() for w in ENGLISH_WORDS if len(tokenizer.tokenize(w.lower())) == 1]
    rng = random.Random(1234)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 200) - 2)) for _ in range(NUM_TEXTS)]


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> Any:
    torch.manual_seed(1234)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512, num_labels=3, initializer_range=0.05)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("attention.self.query", "attention.self.key")):
                module.weight.mul_(QK_SCALE)
                module.bias.mul_(QK_SCALE)
        torch.nn.init.normal_(model.classifier.weight, std=HEAD_STD)
    return model


def encodings(tokenizer: Any, texts: list[str]) -> list[dict[str, list[int]]]:
    return [{name: list(ids) for name, ids in tokenizer(text).items()} for text in texts]


def packed_forward(model: Any, tokenizer: Any, dtype: torch.dtype) -> EncoderForward:
    """What the classification executor runs: a copy of the model in `dtype`, linears prepared, packed."""
    model = copy.deepcopy(model).to(dtype)
    prepare_for_host(model, True)
    loaded = LoadedModel(ModelSpec(name="bf16", task="classify", source="in-memory"), model, tokenizer,
                         torch.device("cpu"), dtype)  # fmt: skip
    forward = EncoderForward(loaded, pooled=True, packing=True)
    assert forward.packed
    return forward


def alone(model: Any, tokenizer: Any, texts: list[str], dtype: torch.dtype) -> torch.Tensor:
    """transformers' own forward of each text alone (its SDPA attention, no padding), float32 logits."""
    model = copy.deepcopy(model).to(dtype)
    with torch.inference_mode():
        return torch.cat([model(**tokenizer(text, return_tensors="pt")).logits.float() for text in texts])


def test_attention_scores_reach_tens(model: Any, tokenizer: Any, texts: list[str]) -> None:
    attention = model.bert.encoder.layer[0].attention.self
    with torch.inference_mode():
        hidden = model.bert.embeddings(input_ids=tokenizer(texts[0], return_tensors="pt")["input_ids"])
        q, k = (p(hidden).view(1, -1, 2, 64).transpose(1, 2) for p in (attention.query, attention.key))
        assert ((q @ k.transpose(-1, -2)) / 8.0).abs().max() > 10


@pytest.mark.parametrize(("dtype", "native"), [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_varlen_attention_equals_each_segment_alone(
    dtype: torch.dtype, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many groups, padding in most; scores in the tens. fp32: exact to rounding; bf16: within its rounding,
    computed in bf16 (a CPU with native bf16) or upcast to fp32 per group (`native=False`: AVX2 CPUs)."""
    if not native:
        monkeypatch.setattr(varlen, "CPU_NATIVE_HALF", frozenset())
    rng = random.Random(0)
    lengths = [rng.randint(1, 120) for _ in range(20)] + [120, 1, 7]
    segments = Segments.from_lengths(lengths)
    assert len(segments.groups) > 5 and segments.padding_slots > 0
    tokens, heads, head_dim = sum(lengths), 4, 32
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads * head_dim).view(1, tokens, heads, head_dim).transpose(1, 2)
               for _ in range(3))  # fmt: skip
    q, k, v = (3 * q).to(dtype), (3 * k).to(dtype), v.to(dtype)
    scale = head_dim**-0.5
    got = varlen_attention(torch.nn.Module(), q, k, v, None, scaling=scale, pagedq_segments=segments)[0][0]
    assert got.dtype == dtype
    exact = []
    for start, n in zip(segments.starts, lengths, strict=True):
        qs, ks, vs = (t[0, :, start : start + n].double() for t in (q, k, v))
        if n == 120:
            assert ((qs @ ks.transpose(-1, -2)) * scale).abs().max() > 10
        exact.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1))
    reference = torch.cat(exact)
    error = float((got.double() - reference).abs().max())
    limit = 1e-5 if dtype == torch.float32 else BF16_ATTENTION_TOLERANCE * float(reference.abs().max())
    assert error <= limit, (error, limit)


def test_packed_bf16_agrees_with_transformers_bf16_and_fp32(model: Any, tokenizer: Any, texts: list[str]) -> None:
    packed = packed_forward(model, tokenizer, torch.bfloat16).logits(encodings(tokenizer, texts))
    fp32, bf16 = alone(model, tokenizer, texts, torch.float32), alone(model, tokenizer, texts, torch.bfloat16)
    assert packed.dtype == torch.float32 and packed.shape == fp32.shape
    assert float(fp32.std(0).min()) > 0.2  # logits depend on the text
    for reference, tolerance in ((bf16, BF16_LOGIT_TOLERANCE), (fp32, FP32_LOGIT_TOLERANCE)):
        assert float((packed - reference).abs().max()) <= tolerance
        assert float((packed.softmax(-1) - reference.softmax(-1)).abs().max()) <= PROB_TOLERANCE
    top2 = fp32.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > CLEAR_MARGIN
    assert int(clear.sum()) >= NUM_TEXTS // 2  # most texts have a clear label
    assert torch.equal(packed.argmax(-1)[clear], fp32.argmax(-1)[clear])


def test_packed_fp32_stays_exact(model: Any, tokenizer: Any, texts: list[str]) -> None:
    packed = packed_forward(model, tokenizer, torch.float32).logits(encodings(tokenizer, texts))
    torch.testing.assert_close(packed, alone(model, tokenizer, texts, torch.float32), atol=1e-4, rtol=1e-4)


def test_forward_token_limit_keeps_the_widest_activation_under_the_mmap_threshold() -> None:
    config = BertConfig(vocab_size=100, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                        intermediate_size=3072)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BertForSequenceClassification(config).eval()
    fp32 = forward_token_limit(model, torch.device("cpu"))
    assert fp32 is not None and fp32 * 3072 * 4 <= CPU_ACTIVATION_BYTES < (fp32 + 1) * 3072 * 4
    bf16 = forward_token_limit(model.to(torch.bfloat16), torch.device("cpu"))
    assert bf16 is not None and 5400 < bf16 <= CPU_ACTIVATION_BYTES // (3072 * 2)
    assert forward_token_limit(model, torch.device("meta")) is None  # other devices: no limit


def test_a_step_cut_into_forwards_equals_one_forward(model: Any, tokenizer: Any, texts: list[str]) -> None:
    forward = packed_forward(model, tokenizer, torch.float32)
    batch = encodings(tokenizer, texts)
    lengths = [len(enc["input_ids"]) for enc in batch]
    whole = forward.logits(batch)
    assert len(forward.chunks(batch)) == 1  # a few thousand tokens: one forward
    forward.forward_tokens = 600
    chunks = forward.chunks(batch)
    assert [enc for chunk in chunks for enc in chunk] == batch  # in order, each input once
    assert len(chunks) > 3 and all(sum(len(e["input_ids"]) for e in c) <= 600 for c in chunks)
    forward.counters = {"computed_tokens": 0, "padded_tokens": 0}
    torch.testing.assert_close(forward.logits(batch), whole, atol=1e-5, rtol=1e-5)
    assert forward.counters == {"computed_tokens": sum(lengths), "padded_tokens": 0}
    forward.forward_tokens = 100  # inputs longer than a forward's limit run alone
    assert all(len(c) == 1 or sum(len(e["input_ids"]) for e in c) <= 100 for c in forward.chunks(batch))

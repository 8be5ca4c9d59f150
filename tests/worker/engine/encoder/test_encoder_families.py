"""Encoder families are exact or refused: each one packed and exact, or padded (fallback) and exact.

Every family is built from a config (2 layers, hidden 64, 4 heads) with one offline WordPiece tokenizer, its
query/key projections scaled by `QK_SCALE` so attention scores reach tens (tiny random models attend almost
uniformly, which hides attention and position errors; asserted once). Scores are compared with transformers'
own forward of each text ALONE on an untouched copy of the model (its own attention, no padding), as raw
logits (`function_to_apply="none"`) within `LOGIT_TOLERANCE`.

    packed (passes the load-time self-check)   BERT, DistilBERT, RoBERTa, XLM-RoBERTa, ELECTRA
    padded                                     ALBERT, ModernBERT (no packing layout: shared layers, rotary
                                               positions and local attention), DeBERTa-v2, MPNet, RoFormer
                                               (relative / rotary positions: no attention interface)
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers as tf
from executor_support import TEXTS, request, run
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.utils import logging as hf_logging

import pagedq.worker.engine.encoder.varlen_attention as varlen
from pagedq.shared.models import ClassifyRequest, QARequest, TaskType
from pagedq.shared.registry import ModelSpec
from pagedq.worker.demo.tokenizers import build_wordpiece
from pagedq.worker.engine.core.executor import EngineConfig, LoadedModel
from pagedq.worker.engine.encoder.packing import LAYOUTS, EncoderLayout, PositionRule
from pagedq.worker.engine.encoder.varlen_attention import SEGMENTS_KWARG, VARLEN_ATTENTION
from pagedq.worker.engine.tasks.classify import ClassificationExecutor
from pagedq.worker.engine.tasks.extractive_qa import ExtractiveQAExecutor

LOGIT_TOLERANCE = 1e-4  # fp32 logits, packed or padded, against one forward per text
QK_SCALE = 5.0  # query and key weights x5: attention scores x25, into the tens
SHAPE: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
LABELS: dict[str, Any] = dict(id2label={0: "negative", 1: "neutral", 2: "positive"},
                              label2id={"negative": 0, "neutral": 1, "positive": 2})
QK_NAMES = ("query", "key", "q_lin", "k_lin", "q", "k", "query_proj", "key_proj")
TEXT_PAIR_CASES = [("Where is the tower?", TEXTS[4]), ("What was late?", TEXTS[2]), ("Quality?", TEXTS[5])]


def _configs(pad: int) -> dict[str, tuple[Any, Any, bool]]:
    """family -> (config, classification class, packs)."""
    common: dict[str, Any] = dict(vocab_size=1000, initializer_range=0.1, pad_token_id=pad, **SHAPE, **LABELS)
    offset = dict(max_position_embeddings=512 + pad + 1)  # RoBERTa family: positions from pad + 1
    return {
        "bert": (tf.BertConfig(**common), tf.BertForSequenceClassification, True),
        "distilbert": (tf.DistilBertConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                           initializer_range=0.1, pad_token_id=pad, **LABELS),
                       tf.DistilBertForSequenceClassification, True),
        "roberta": (tf.RobertaConfig(**common, **offset), tf.RobertaForSequenceClassification, True),
        "xlm-roberta": (tf.XLMRobertaConfig(**common, **offset), tf.XLMRobertaForSequenceClassification, True),
        "electra": (tf.ElectraConfig(embedding_size=32, **common), tf.ElectraForSequenceClassification, True),
        "albert": (tf.AlbertConfig(embedding_size=32, **common), tf.AlbertForSequenceClassification, False),
        "deberta-v2": (tf.DebertaV2Config(relative_attention=True, pos_att_type=["p2c", "c2p"], **common),
                       tf.DebertaV2ForSequenceClassification, False),
        "mpnet": (tf.MPNetConfig(**common), tf.MPNetForSequenceClassification, False),
        "modernbert": (tf.ModernBertConfig(bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
                                           global_attn_every_n_layers=2, local_attention=8, **common),
                       tf.ModernBertForSequenceClassification, False),
        "roformer": (tf.RoFormerConfig(embedding_size=64, **common), tf.RoFormerForSequenceClassification, False),
    }


def sharpen(model: Any) -> Any:
    """Scale the query/key projections by QK_SCALE (ModernBERT's fused Wqkv: its q and k thirds)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf in QK_NAMES:
                module.weight.mul_(QK_SCALE)
                if module.bias is not None:
                    module.bias.mul_(QK_SCALE)
            elif leaf == "Wqkv":
                module.weight[: 2 * module.out_features // 3].mul_(QK_SCALE)
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_wordpiece(tf.BertTokenizerFast, tmp_path_factory.mktemp("wordpiece"))


def build(tokenizer: Any, family: str, head: Callable[[Any], Any] | None = None) -> tuple[LoadedModel, Any]:
    """(the executor's model, an untouched copy for the reference), fp32 on the CPU, eval mode."""
    config, cls, _ = _configs(tokenizer.pad_token_id)[family]
    if head is not None:  # question answering: start and end logits
        config.num_labels = 2
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sharpen((head or cls)(config)).eval()
    reference = copy.deepcopy(model)
    spec = ModelSpec(name=family, task="classify" if head is None else "qa", source="in-memory")
    return LoadedModel(spec, model, tokenizer, torch.device("cpu"), torch.float32), reference


def alone(reference: Any, tokenizer: Any, *texts: str) -> Any:
    """transformers' own forward of one input alone."""
    with torch.inference_mode():
        return reference(**tokenizer(*texts, return_tensors="pt"))


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if bars:
        hf_logging.enable_progress_bar()


def test_scaled_attention_scores_reach_tens(tokenizer: Any) -> None:
    lm, _ = build(tokenizer, "bert")
    attention = lm.model.bert.encoder.layer[0].attention.self
    with torch.inference_mode():
        hidden = lm.model.bert.embeddings(input_ids=tokenizer(TEXTS[2], return_tensors="pt")["input_ids"])
        q, k = (p(hidden).view(1, -1, 4, 16).transpose(1, 2) for p in (attention.query, attention.key))
        scores = (q @ k.transpose(-1, -2)) / 4.0
    assert scores.abs().max() > 10


@pytest.mark.parametrize("family", list(_configs(0)))
def test_classify_is_exact_packed_or_padded(tokenizer: Any, family: str) -> None:
    lm, reference = build(tokenizer, family)
    packs = _configs(tokenizer.pad_token_id)[family][2]
    executor = ClassificationExecutor(lm, EngineConfig(max_batch_tokens=256, max_running_requests=16))
    stats = executor.stats().as_dict()
    assert stats["path"] == ("packed" if packs else "padded"), stats["path_reason"]
    assert "self-check" not in stats["path_reason"]  # a padded family is padded by design, not by surprise
    reqs = [request(TaskType.CLASSIFY, ClassifyRequest(text=t, top_k=None, function_to_apply="none"), family)
            for t in TEXTS]
    assert run(executor, reqs) < len(reqs)  # batched
    spread = []
    for req, text in zip(reqs, TEXTS, strict=True):
        got = {s.label: s.score for s in req.future.result(timeout=0).scores}
        want = alone(reference, tokenizer, text).logits[0]
        assert [got[lm.model.config.id2label[i]] for i in range(3)] == pytest.approx(want.tolist(),
                                                                                     abs=LOGIT_TOLERANCE)
        spread.append(float(want[0]))
    assert max(spread) - min(spread) > 100 * LOGIT_TOLERANCE  # logits depend on the text
    assert (executor.stats().as_dict()["padded_tokens"] == 0) is packs


@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "albert"])
def test_extractive_qa_logits_are_exact(tokenizer: Any, family: str) -> None:
    """QA reads every token: per-token start/end logits of each (question, context) pair, token types included."""
    cls = getattr(tf, _configs(0)[family][1].__name__.replace("SequenceClassification", "QuestionAnswering"))
    lm, reference = build(tokenizer, family, head=cls)
    executor = ExtractiveQAExecutor(lm, EngineConfig(max_batch_tokens=1024, max_running_requests=8))
    assert executor.stats().as_dict()["path"] == ("packed" if family != "albert" else "padded")
    encodings = [dict(tokenizer(q, c)) for q, c in TEXT_PAIR_CASES]
    outputs = executor.forward.token_outputs(encodings, ("start_logits", "end_logits"))
    for (start, end), (question, context) in zip(outputs, TEXT_PAIR_CASES, strict=True):
        want = alone(reference, tokenizer, question, context)
        torch.testing.assert_close(torch.from_numpy(start), want.start_logits[0], atol=LOGIT_TOLERANCE, rtol=0)
        torch.testing.assert_close(torch.from_numpy(end), want.end_logits[0], atol=LOGIT_TOLERANCE, rtol=0)
    reqs = [request(TaskType.QA, QARequest(question=q, context=c), family) for q, c in TEXT_PAIR_CASES]
    run(executor, reqs)
    assert all(req.future.result(timeout=0).answer is not None for req in reqs)


# ---- the self-check catches what packing gets wrong -----------------------------------------------------
def _leaky_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
    """A broken packed attention: every token attends to the whole packed row (other inputs included)."""
    kwargs.pop(SEGMENTS_KWARG, None)
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


@pytest.fixture()
def leaky_packing(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(varlen, "varlen_attention", _leaky_attention)  # what register_varlen_attention installs
    yield
    monkeypatch.undo()
    varlen.register_varlen_attention()  # the real one again, for every later test


@pytest.mark.parametrize("pooled", [True, False])
def test_self_check_catches_a_broken_packed_attention_and_falls_back(
    tokenizer: Any, leaky_packing: Any, pooled: bool, caplog: pytest.LogCaptureFixture
) -> None:
    head = None if pooled else tf.BertForQuestionAnswering
    lm, reference = build(tokenizer, "bert", head=head)
    config = EngineConfig(max_batch_tokens=256, max_running_requests=16)
    with caplog.at_level(logging.INFO, logger="pagedq.worker.engine.encoder.forward"):
        executor = (ClassificationExecutor if pooled else ExtractiveQAExecutor)(lm, config)
    stats = executor.stats().as_dict()
    assert stats["path"] == "padded" and stats["path_reason"].startswith("self-check: packed outputs differ")
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # one line, naming the reason
    assert "self-check" in caplog.records[0].getMessage()
    assert lm.model.config._attn_implementation != VARLEN_ATTENTION  # the model's own attention is back
    if pooled:
        reqs = [request(TaskType.CLASSIFY, ClassifyRequest(text=t, function_to_apply="none", top_k=None), "bert")
                for t in TEXTS]
        run(executor, reqs)
        for req, text in zip(reqs, TEXTS, strict=True):
            got = {s.label: s.score for s in req.future.result(timeout=0).scores}
            want = alone(reference, tokenizer, text).logits[0].tolist()
            assert [got[label] for label in ("negative", "neutral", "positive")] == pytest.approx(
                want, abs=LOGIT_TOLERANCE)
        assert executor.stats().as_dict()["padded_tokens"] > 0


@pytest.mark.parametrize(("family", "layout"), [
    ("roberta", EncoderLayout("encoder", "attention", PositionRule.FROM_ZERO)),  # positions without the offset
    ("albert", EncoderLayout("encoder", "albert_layers.0.attention", PositionRule.FROM_ZERO,  # one shared layer:
                             layers="albert_layer_groups")),                     # the first-token cut runs twice
])
def test_self_check_catches_a_wrong_layout(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch, family: str, layout: EncoderLayout
) -> None:
    monkeypatch.setitem(LAYOUTS, family, layout)
    lm, _ = build(tokenizer, family)
    stats = ClassificationExecutor(lm, EngineConfig()).stats().as_dict()
    assert stats["path"] == "padded" and stats["path_reason"].startswith("self-check"), stats


def test_packing_required_but_refused_by_the_self_check_raises(tokenizer: Any, leaky_packing: Any) -> None:
    lm, _ = build(tokenizer, "roberta")
    with pytest.raises(ValueError, match="cannot pack inputs: self-check"):
        ClassificationExecutor(lm, EngineConfig(), packing=True)


def test_the_self_check_passes_a_correct_packing_of_the_same_model(tokenizer: Any) -> None:
    """Control for the broken-attention test: the same model with the real varlen attention packs."""
    lm, _ = build(tokenizer, "bert")
    assert ClassificationExecutor(lm, EngineConfig()).stats().as_dict()["path"] == "packed"

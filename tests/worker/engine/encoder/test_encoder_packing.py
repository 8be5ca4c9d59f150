"""Packed (varlen) encoder forwards on every architecture that packs, and the padded fallback.

Builds tiny random-weight RoBERTa and XLM-RoBERTa classifiers and QA models (plus a DistilBERT QA model and a
DeBERTa-v2 classifier, which cannot pack) with offline tokenizers -- a byte-level BPE (RoBERTa) and a Unigram
(XLM-R, SentencePiece-style) trained here -- saved with save_pretrained and loaded with from_pretrained. The
demo models cover BERT and DistilBERT classification and BERT QA (tests/test_executors*.py).

Every comparison is against transformers on a separate copy of the model that keeps its own SDPA attention.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from executor_support import SCORE_TOLERANCE, TEXTS, long_text, pipeline_scores, reference_qa, request, run
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForQuestionAnswering,
    DistilBertTokenizer,
    RobertaConfig,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaTokenizer,
    XLMRobertaConfig,
    XLMRobertaForQuestionAnswering,
    XLMRobertaForSequenceClassification,
    XLMRobertaTokenizer,
)
from transformers.models.roberta.modeling_roberta import RobertaEmbeddings
from transformers.utils import logging as hf_logging

from pagedq.shared.models import ClassifyRequest, QARequest, TaskType
from pagedq.shared.registry import ModelSpec
from pagedq.worker.demo.corpus import ENGLISH_WORDS, printable_characters, synthetic_sentences
from pagedq.worker.demo.models import ENCODER_INIT_STD, HEAD_INIT_STD
from pagedq.worker.demo.tokenizers import build_wordpiece
from pagedq.worker.engine.core.executor import EngineConfig, LoadedModel
from pagedq.worker.engine.encoder import varlen_attention
from pagedq.worker.engine.encoder.forward import EncoderForward
from pagedq.worker.engine.encoder.packing import PositionRule, enable_packing, position_ids, unsupported_reason
from pagedq.worker.engine.encoder.varlen_attention import GROUP_MIN_SHARE, VARLEN_ATTENTION, Segments
from pagedq.worker.engine.tasks.classify import ClassificationExecutor
from pagedq.worker.engine.tasks.extractive_qa import ExtractiveQAExecutor

ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # pad id 1: positions start at 2
VOCAB_SIZE = 800
SHAPE: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
SENTIMENT, TOPICS = ("negative", "neutral", "positive"), ("business", "politics", "sports", "technology")
PAD_TEXT = "A literal <pad> token inside a text keeps its position at padding_idx."
CLASSIFY_TEXTS = [*TEXTS, PAD_TEXT]
QA_CASES = [
    ("Where is the Eiffel tower?", TEXTS[4]),
    ("What was wonderful?", TEXTS[6] + " " + TEXTS[0]),
    ("When was the tower built?", long_text(600)),  # several windows
    ("What is the price?", " ".join(TEXTS[:4] * 6)),
]


# ---- tiny models, built once per module ---------------------------------------------------------------
def _corpus() -> list[str]:
    return synthetic_sentences(ENGLISH_WORDS, 1000, 7) + [" ".join(printable_characters())]


def _roberta_tokenizer(out: Path) -> Any:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=ROBERTA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(pair) for pair in model["merges"]]
    tokenizer = RobertaTokenizer(vocab=model["vocab"], merges=merges, model_max_length=512)
    tokenizer.save_pretrained(out)
    return tokenizer


def _xlmr_tokenizer(out: Path) -> Any:
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=ROBERTA_SPECIALS,  # XLM-R's order too: <s> <pad> </s> <unk>
        unk_token="<unk>",
        initial_alphabet=printable_characters(),
        show_progress=False,
    )
    unigram.train_from_iterator(_corpus(), trainer=trainer)
    pieces = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    tokenizer = XLMRobertaTokenizer(vocab=pieces, model_max_length=512)
    tokenizer.save_pretrained(out)
    return tokenizer


def _roberta_config(config_cls: Any, tokenizer: Any, **fields: Any) -> Any:
    return config_cls(
        vocab_size=len(tokenizer),
        max_position_embeddings=512 + 2,  # positions 2..513
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        initializer_range=ENCODER_INIT_STD,
        **SHAPE,
        **fields,
    )


def _labels(names: tuple[str, ...]) -> dict[str, Any]:
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def _widen_heads(model: Any) -> Any:
    """Wider task heads so that scores and spans differ between inputs (as in worker.demo_models)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(k in name for k in ("classifier", "qa_outputs", "pooler")):
            torch.nn.init.normal_(module.weight, std=HEAD_INIT_STD)
    return model


def _roberta_classifier(tok: Any) -> Any:
    return RobertaForSequenceClassification(_roberta_config(RobertaConfig, tok, **_labels(SENTIMENT)))


def _xlmr_multilabel(tok: Any) -> Any:
    config = _roberta_config(XLMRobertaConfig, tok, problem_type="multi_label_classification", **_labels(TOPICS))
    return XLMRobertaForSequenceClassification(config)


def _roberta_qa(tok: Any) -> Any:
    return RobertaForQuestionAnswering(_roberta_config(RobertaConfig, tok))


def _xlmr_qa(tok: Any) -> Any:
    return XLMRobertaForQuestionAnswering(_roberta_config(XLMRobertaConfig, tok))


def _distilbert_qa(tok: Any) -> Any:
    config = DistilBertConfig(
        vocab_size=len(tok), dim=64, n_layers=2, n_heads=4, hidden_dim=128, initializer_range=ENCODER_INIT_STD
    )
    return DistilBertForQuestionAnswering(config)


def _deberta_classifier(tok: Any) -> Any:
    config = DebertaV2Config(
        vocab_size=len(tok),
        max_position_embeddings=512,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        pad_token_id=tok.pad_token_id,
        initializer_range=ENCODER_INIT_STD,
        **SHAPE,
        **_labels(SENTIMENT),
    )
    return DebertaV2ForSequenceClassification(config)


MODELS: dict[str, tuple[str, Callable[[Path], Any], Callable[[Any], Any]]] = {
    # name: (task, tokenizer builder, model builder)
    "roberta-classifier": ("classify", _roberta_tokenizer, _roberta_classifier),
    "xlmr-multilabel": ("classify", _xlmr_tokenizer, _xlmr_multilabel),
    "deberta-classifier": ("classify", _xlmr_tokenizer, _deberta_classifier),
    "roberta-qa": (
        "qa",
        _roberta_tokenizer,
        lambda tok: RobertaForQuestionAnswering(_roberta_config(RobertaConfig, tok)),
    ),
    "xlmr-qa": (
        "qa",
        _xlmr_tokenizer,
        lambda tok: XLMRobertaForQuestionAnswering(_roberta_config(XLMRobertaConfig, tok)),
    ),
    "distilbert-qa": ("qa", lambda out: build_wordpiece(DistilBertTokenizer, out), _distilbert_qa),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packing-models")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars for kilobyte files are noise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' advisories about random-weight configs
            for name, (_, build_tokenizer, build_model) in MODELS.items():
                torch.manual_seed(1234)
                tokenizer = build_tokenizer(root / name)
                _widen_heads(build_model(tokenizer)).save_pretrained(root / name)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return {name: root / name for name in MODELS}


def load(model_dirs: dict[str, Path], name: str) -> LoadedModel:
    """A fresh fp32 copy from disk (each call: its own model and config)."""
    task = MODELS[name][0]
    spec = ModelSpec(name=name, task=task, source=str(model_dirs[name]))
    auto = AutoModelForSequenceClassification if task == "classify" else AutoModelForQuestionAnswering
    model = auto.from_pretrained(model_dirs[name], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[name])
    return LoadedModel(spec, model, tokenizer, torch.device("cpu"), torch.float32)


# ---- the packed forward itself -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["roberta-classifier", "xlmr-multilabel", "roberta-qa", "xlmr-qa", "distilbert-qa"])
def test_packed_forward_equals_one_forward_per_input(model_dirs: dict[str, Path], name: str) -> None:
    lm, ref = load(model_dirs, name), load(model_dirs, name)
    classifier = MODELS[name][0] == "classify"
    forward = EncoderForward(lm, pooled=classifier)
    assert forward.packed and lm.model.config._attn_implementation == VARLEN_ATTENTION
    encodings = [dict(lm.tokenizer(text)) for text in CLASSIFY_TEXTS]
    with torch.inference_mode():
        singles = [ref.model(**{k: torch.tensor([v]) for k, v in enc.items()}) for enc in encodings]
    if classifier:
        last_ffn = lm.model.base_model.encoder.layer[-1].intermediate
        ffn_rows: list[int] = []
        handle = last_ffn.register_forward_pre_hook(lambda _m, args: ffn_rows.append(args[0].shape[1]))
        packed = forward.logits(encodings)
        handle.remove()
        torch.testing.assert_close(packed, torch.cat([s.logits for s in singles]), atol=1e-5, rtol=1e-5)
        assert ffn_rows == [len(encodings)]  # the last feed-forward ran on the first tokens only
    else:
        packed_rows = forward.token_outputs(encodings, ("start_logits", "end_logits"))
        for (start, end), single in zip(packed_rows, singles, strict=True):
            torch.testing.assert_close(torch.from_numpy(start), single.start_logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.from_numpy(end), single.end_logits[0], atol=1e-5, rtol=1e-5)
    real = sum(len(enc["input_ids"]) for enc in encodings)
    assert forward.counters == {"computed_tokens": real, "padded_tokens": 0}


def test_a_packed_forward_builds_no_attention_mask_and_a_padded_one_still_does(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The packed forward's attention reads segment bounds, never a mask: transformers' [T, T] packed mask is not
    built for it (varlen_mask). The same model called padded, outside the engine's packed forward, still gets
    its padding mask and computes what the plain model computes."""
    lm, ref = load(model_dirs, "roberta-classifier"), load(model_dirs, "roberta-classifier")
    forward = EncoderForward(lm, pooled=True)
    assert forward.packed
    built: list[Any] = []
    real_mask = varlen_attention.sdpa_mask
    monkeypatch.setattr(varlen_attention, "sdpa_mask", lambda *a, **k: built.append(real_mask(*a, **k)) or built[-1])
    encodings = [dict(lm.tokenizer(text)) for text in CLASSIFY_TEXTS]
    with torch.inference_mode():
        singles = torch.cat([ref.model(**{k: torch.tensor([v]) for k, v in enc.items()}).logits for enc in encodings])
    torch.testing.assert_close(forward.logits(encodings), singles, atol=1e-5, rtol=1e-5)
    assert built == []
    batch = lm.tokenizer(CLASSIFY_TEXTS[:3], padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())  # the three texts differ in length: padding to mask
    with torch.inference_mode():
        padded = lm.model(**batch).logits
    assert len(built) == 1 and built[0] is not None
    torch.testing.assert_close(padded, singles[:3], atol=1e-5, rtol=1e-5)


def test_packed_bf16_stays_close_to_fp32(model_dirs: dict[str, Path]) -> None:
    """bf16 weights: attention runs per segment in fp32 on CPU; logits within bf16 rounding of fp32."""
    lm, ref = load(model_dirs, "roberta-qa"), load(model_dirs, "roberta-qa")
    lm.model.to(torch.bfloat16)
    encodings = [dict(lm.tokenizer(text)) for text in CLASSIFY_TEXTS]
    forward = EncoderForward(lm, pooled=False)
    assert forward.packed  # the self-check's bf16 tolerance (packing_check.TOLERANCES) lets it pack
    packed = forward.token_outputs(encodings, ("start_logits",))
    with torch.inference_mode():
        for (start,), enc in zip(packed, encodings, strict=True):
            single = ref.model(**{k: torch.tensor([v]) for k, v in enc.items()}).start_logits[0]
            assert start.dtype == np.float32 and np.abs(start - single.numpy()).max() < 0.1


def test_segments_attend_in_groups_of_similar_length() -> None:
    """Longest first; a segment joins while >= GROUP_MIN_SHARE of the group's longest; every token once; one
    gather of every group's slots, one take back to packed order."""
    lengths = [10, 3, 9, 3, 7, 6]
    segments = Segments.from_lengths(lengths)
    assert GROUP_MIN_SHARE == 0.8
    assert [(g.size, g.longest) for g in segments.groups] == [(2, 10), (2, 7), (2, 3)]  # [10 9] [7 6] [3 3]
    assert [g.key_mask is None for g in segments.groups] == [False, False, True]  # equal lengths: no mask
    rows = torch.cat([g.rows for g in segments.groups]).sort().values
    assert rows.tolist() == list(range(sum(lengths)))
    second = segments.groups[1]
    assert second.slots.view(2, 7)[0].tolist() == list(range(25, 32))  # the 7-token segment starts at 25
    assert second.real.sum() == 7 + 6
    assert segments.padding_slots == 1 + 1
    assert [g.offset for g in segments.groups] == [0, 20, 34]
    assert segments.gather.tolist() == torch.cat([g.slots for g in segments.groups]).tolist()
    assert segments.gather[segments.take].tolist() == list(range(sum(lengths)))


@pytest.mark.parametrize("rule", list(PositionRule))
def test_position_ids_restart_per_segment_as_the_model_counts(rule: PositionRule) -> None:
    pad = 1
    segments_ids = [[0, 7, 8, 2], [0, 9, pad, 9, 2], [0, 2]]  # a literal pad token in the second
    segments = Segments.from_lengths([len(s) for s in segments_ids])
    packed = torch.tensor([i for s in segments_ids for i in s])
    got = position_ids(packed, segments, rule, pad).split(segments.lengths)
    for ids, positions in zip(segments_ids, got, strict=True):
        if rule is PositionRule.FROM_ZERO:
            expected = torch.arange(len(ids))
        else:  # what RoBERTa's embeddings compute for one unpadded input
            expected = RobertaEmbeddings.create_position_ids_from_input_ids(torch.tensor([ids]), pad)[0]
        assert positions.tolist() == expected.tolist()


# ---- the executors against transformers ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["roberta-classifier", "xlmr-multilabel", "deberta-classifier"])
def test_classify_matches_the_pipeline(model_dirs: dict[str, Path], name: str) -> None:
    lm, ref = load(model_dirs, name), load(model_dirs, name)
    executor = ClassificationExecutor(lm, EngineConfig(max_batch_tokens=256, max_running_requests=16))
    packs = name != "deberta-classifier"
    assert executor.forward.packed is packs
    reqs = [request(TaskType.CLASSIFY, ClassifyRequest(text=t, top_k=None), name) for t in CLASSIFY_TEXTS]
    steps = run(executor, reqs)
    assert steps < len(reqs)
    top_scores = []
    for req, text in zip(reqs, CLASSIFY_TEXTS, strict=True):
        result = req.future.result(timeout=0)
        expected = pipeline_scores(ref, text)
        assert [s.label for s in result.scores] == [e["label"] for e in expected]
        assert [s.score for s in result.scores] == pytest.approx([e["score"] for e in expected], abs=SCORE_TOLERANCE)
        top_scores.append(result.score)
    assert max(top_scores) - min(top_scores) > 100 * SCORE_TOLERANCE  # scores depend on the text
    stats = executor.stats().as_dict()
    assert (stats["padded_tokens"] == 0) is packs and stats["computed_tokens"] > 0


@pytest.mark.parametrize("name", ["roberta-qa", "xlmr-qa", "distilbert-qa"])
def test_extractive_qa_matches_the_reference(model_dirs: dict[str, Path], name: str) -> None:
    lm, ref = load(model_dirs, name), load(model_dirs, name)
    executor = ExtractiveQAExecutor(lm, EngineConfig(max_batch_tokens=1024, max_running_requests=8))
    assert executor.forward.packed
    reqs = [
        request(TaskType.QA, QARequest(question=q, context=c, max_answer_len=15, handle_impossible_answer=i % 2), name)
        for i, (q, c) in enumerate(QA_CASES)
    ]
    steps = run(executor, reqs)
    assert steps < executor.stats().as_dict()["num_windows"]
    for i, (req, (question, context)) in enumerate(zip(reqs, QA_CASES, strict=True)):
        got, want = req.future.result(timeout=0), reference_qa(ref, question, context, 15, bool(i % 2))
        assert (got.answer, got.start, got.end) == (want["answer"], want["start"], want["end"])
        assert got.score == pytest.approx(want["score"], abs=SCORE_TOLERANCE)
    assert executor.stats().as_dict()["padded_tokens"] == 0


# ---- what the swap leaves behind, and who falls back ---------------------------------------------------
def test_unpacked_callers_keep_sdpa_attention(model_dirs: dict[str, Path]) -> None:
    """A packing model still serves padded batches (pipelines, the fallback) exactly like SDPA."""
    lm, ref = load(model_dirs, "roberta-classifier"), load(model_dirs, "roberta-classifier")
    enable_packing(lm.model)
    batch = lm.tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all()  # padding present
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(**batch).logits, ref.model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_models_that_cannot_pack_fall_back(model_dirs: dict[str, Path]) -> None:
    deberta = load(model_dirs, "deberta-classifier")
    assert "does not take an attention implementation" in (unsupported_reason(deberta.model) or "")
    with pytest.raises(ValueError, match="cannot pack"):
        ClassificationExecutor(deberta, EngineConfig(), packing=True)
    assert deberta.model.config._attn_implementation != VARLEN_ATTENTION
    tiny: dict[str, Any] = dict(vocab_size=50, **SHAPE)
    albert = AlbertForSequenceClassification(AlbertConfig(embedding_size=32, **tiny)).eval()  # one shared layer
    assert "no packing layout" in (unsupported_reason(albert) or "")
    decoder = BertForSequenceClassification(BertConfig(is_decoder=True, **tiny)).eval()
    assert "decoder" in (unsupported_reason(decoder) or "")
    assert "training" in (unsupported_reason(BertForSequenceClassification(BertConfig(**tiny))) or "")

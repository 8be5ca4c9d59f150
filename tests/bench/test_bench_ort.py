"""The W3 peer (bench/peers_ort.py): a tiny random BERT classifier exported to ONNX in the test, run by ONNX
Runtime in sorted, right-padded batches, gives transformers' own logits; int8 runs and is compared with fp32.
No timing is asserted."""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from repo_paths import BENCH

sys.path.insert(0, str(BENCH))  # the scripts import their siblings by bare name, as `python bench/x.py` does

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import peers_ort  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer  # noqa: E402

from pagedq.worker.demo.corpus import ENGLISH_WORDS  # noqa: E402
from pagedq.worker.demo.tokenizers import build_wordpiece  # noqa: E402

TOLERANCE = 1e-4  # |logit| difference allowed between ORT fp32 and transformers' fp32 forward
QK_FACTOR = 20.0  # query and key scaled by this: attention scores x400, so attention is sharp (asserted)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_wordpiece(BertTokenizer, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def texts(tokenizer: Any) -> list[str]:
    """14 texts of 3..60 words (one token each), in no length order: batches of 4 differ in width."""
    rng = random.Random(7)
    words = [w.lower() for w in ENGLISH_WORDS if len(tokenizer.tokenize(w.lower())) == 1]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(14)]


@pytest.fixture(scope="module")
def model(tokenizer: Any, texts: list[str]) -> Any:
    """2 layers, hidden 64, 4 heads, 3 labels; sharp attention (padding leaking in would show), and the
    classifier's bias centred on these texts' mean logits so that they do not all get one label."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=3,
    )
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for linear in (layer.attention.self.query, layer.attention.self.key):
                linear.weight.mul_(QK_FACTOR)
                linear.bias.mul_(QK_FACTOR)
        model.bert.pooler.dense.weight.normal_(0.0, 1.0)
        model.classifier.bias.sub_(torch.from_numpy(one_by_one(model, tokenizer, texts).mean(0)))
    return model


@pytest.fixture(scope="module")
def graphs(model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    workdir = tmp_path_factory.mktemp("onnx")
    plain = peers_ort.export(model, workdir / "model.onnx")
    fused, counts = peers_ort.optimize_bert(plain, workdir / "fused.onnx", model.config)
    assert counts.get("Attention") == 2 and counts.get("SkipLayerNormalization") == 4, counts
    return {"plain": plain, "fused": fused}


def one_by_one(model: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
    """transformers' forward per text, unpadded: what every padded batch must reproduce."""
    with torch.inference_mode():
        return np.concatenate([model(**tokenizer(t, return_tensors="pt")).logits.numpy() for t in texts])


def test_attention_is_sharp(model: Any, tokenizer: Any, texts: list[str]) -> None:
    """The test would miss padding leaking into attention if the tiny model attended uniformly."""
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.inference_mode():
        attentions = eager(**tokenizer(texts[0], return_tensors="pt"), output_attentions=True).attentions
    assert all(a.max(-1).values.mean() > 0.7 for a in attentions)


@pytest.mark.parametrize("graph", ["plain", "fused"])
def test_fp32_logits_equal_transformers(
    graph: str, graphs: dict[str, Path], model: Any, tokenizer: Any, texts: list[str]
) -> None:
    ids = tokenizer(texts)["input_ids"]
    widths = {max(len(ids[i]) for i in b) for b in peers_ort.batches([len(x) for x in ids], 4)}
    assert len(widths) == 4, "batches of different lengths"
    classifier = peers_ort.OrtClassifier(graphs[graph], tokenizer, threads=1, batch_size=4)
    logits = classifier.logits(texts)
    reference = one_by_one(model, tokenizer, texts)
    assert np.abs(logits - reference).max() <= TOLERANCE
    assert np.abs(peers_ort.transformers_logits(model, tokenizer, texts, 4) - reference).max() <= TOLERANCE
    agreement = peers_ort.agreement(logits, reference)
    assert agreement.labels == 1.0 and agreement.distinct > 1


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_int8_runs_and_is_compared(
    per_channel: bool, graphs: dict[str, Path], tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    int8 = peers_ort.quantize_int8(graphs["fused"], tmp_path / "int8.onnx", per_channel)
    logits = peers_ort.OrtClassifier(int8, tokenizer, threads=1, batch_size=4).logits(texts)
    fp32 = peers_ort.OrtClassifier(graphs["fused"], tokenizer, threads=1, batch_size=4).logits(texts)
    assert logits.shape == (len(texts), 3) and np.isfinite(logits).all()
    agreement = peers_ort.agreement(logits, fp32)
    print(agreement.line(f"int8 {'per-channel' if per_channel else 'per-tensor'} vs fp32"))
    assert agreement.count == len(texts) and 0.0 <= agreement.labels <= 1.0


def test_build_keeps_a_working_fp32_and_int8(model: Any, tokenizer: Any, texts: list[str], tmp_path: Path) -> None:
    """The benchmark's entry point: every candidate built, the fastest of each kept; fp32 still exact."""
    lines: list[str] = []
    peers = peers_ort.build(model, tokenizer, tmp_path, threads=1, sample=texts[:4], log=lines.append)
    assert len(lines) == 3 and lines[1].startswith("onnxruntime: fp32 kept:")
    assert np.abs(peers.fp32.logits(texts) - one_by_one(model, tokenizer, texts)).max() <= TOLERANCE
    assert peers.int8.logits(texts).shape == (len(texts), 3)


def test_padding_share_of_sorted_batches() -> None:
    assert peers_ort.padding_share([1, 4, 2, 4], batch_size=2) == pytest.approx(1 - 11 / 12)
    assert [len(b) for b in peers_ort.batches([5, 1, 3, 2, 4], 2)] == [2, 2, 1]


def test_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    assert peers_ort.missing() is None
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an install without the bench extra imports
    assert peers_ort.missing() == "onnxruntime not installed: peers skipped (pip install 'pagedq[bench]')"

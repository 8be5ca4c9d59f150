"""The demo models: they build, load through the Auto classes, and the registry resolves them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

from pagedq.shared.models import TaskType
from pagedq.shared.registry import Registry
from pagedq.worker.demo.models import BUILD_MARKER, DEMO_MODELS_VERSION, build_demo_models

AUTO_CLASSES = {
    "demo-classifier": AutoModelForSequenceClassification,
    "demo-multilabel": AutoModelForSequenceClassification,
    "demo-qa": AutoModelForQuestionAnswering,
    "demo-translator": AutoModelForSeq2SeqLM,
    "demo-llm": AutoModelForCausalLM,
}
ARCHITECTURES = {
    "demo-classifier": "BertForSequenceClassification",
    "demo-multilabel": "DistilBertForSequenceClassification",
    "demo-qa": "BertForQuestionAnswering",
    "demo-translator": "MarianMTModel",
    "demo-llm": "LlamaForCausalLM",
}


@pytest.fixture(scope="module")
def registry(demo_models: Path) -> Registry:
    return Registry.load(demo_models)


def _tokenizer(path: str):  # noqa: ANN202 - a transformers tokenizer
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        return AutoTokenizer.from_pretrained(path)


def test_registry_lists_every_model_with_defaults(registry: Registry) -> None:
    assert set(registry.models) == set(AUTO_CLASSES)
    assert registry.defaults == {
        TaskType.CLASSIFY: "demo-classifier",
        TaskType.TRANSLATE: "demo-translator",
        TaskType.QA: "demo-qa",
    }
    assert registry.models["demo-translator"].languages == ["en-de"]
    assert registry.models["demo-qa"].mode == "extractive"
    llm = registry.models["demo-llm"]
    assert (llm.mode, llm.architecture) == ("generative", "causal-lm")
    assert "{context}" in llm.prompt_template and "{question}" in llm.prompt_template


def test_sources_resolve_to_saved_models(registry: Registry, demo_models: Path) -> None:
    for spec in registry.models.values():
        assert spec.source == f"./{spec.name}"
        path = Path(registry.resolve_source(spec))
        assert path == (demo_models.parent / spec.name).resolve()
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


@pytest.mark.parametrize("name", list(AUTO_CLASSES))
def test_model_and_tokenizer_load_with_auto_classes(registry: Registry, name: str) -> None:
    path = registry.resolve_source(registry.models[name])
    model = AUTO_CLASSES[name].from_pretrained(path).eval()
    tokenizer = _tokenizer(path)
    assert type(model).__name__ == ARCHITECTURES[name]
    assert tokenizer.is_fast or name == "demo-translator"
    assert tokenizer.model_max_length <= model.config.max_position_embeddings
    encoded = tokenizer(["The tower is in Paris.", "Hello"], padding=True, return_tensors="pt")
    if tokenizer.unk_token_id is not None:  # common English tokenizes without unknown pieces
        assert (encoded["input_ids"] != tokenizer.unk_token_id).all()
    with torch.no_grad():
        if name in ("demo-translator", "demo-llm"):
            out = model.generate(**encoded, max_new_tokens=3, do_sample=False)
            assert out.shape[0] == 2
        else:
            out = model(**encoded)
            assert torch.isfinite(out[0]).all()


def test_bert_tokenizers_give_character_offsets(registry: Registry) -> None:
    tokenizer = _tokenizer(registry.resolve_source(registry.models["demo-qa"]))
    text = "Where is the Eiffel Tower? It is in Paris."
    encoded = tokenizer(text, return_offsets_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "paris" in tokens
    start, end = encoded["offset_mapping"][tokens.index("paris")]
    assert text[start:end] == "Paris"


def test_labels_and_problem_types(registry: Registry) -> None:
    sentiment = AutoConfig.from_pretrained(registry.resolve_source(registry.models["demo-classifier"]))
    assert list(sentiment.id2label.values()) == ["negative", "neutral", "positive"]
    multilabel = AutoConfig.from_pretrained(registry.resolve_source(registry.models["demo-multilabel"]))
    assert multilabel.problem_type == "multi_label_classification" and multilabel.num_labels > 1


def test_generation_configs(registry: Registry) -> None:
    marian = GenerationConfig.from_pretrained(registry.resolve_source(registry.models["demo-translator"]))
    tokenizer = _tokenizer(registry.resolve_source(registry.models["demo-translator"]))
    assert marian.decoder_start_token_id == tokenizer.pad_token_id == marian.pad_token_id
    assert marian.eos_token_id == tokenizer.eos_token_id
    llm_path = registry.resolve_source(registry.models["demo-llm"])
    llm, llm_tokenizer = GenerationConfig.from_pretrained(llm_path), _tokenizer(llm_path)
    assert (llm.eos_token_id, llm.pad_token_id) == (llm_tokenizer.eos_token_id, llm_tokenizer.pad_token_id)
    assert llm_tokenizer("Hi")["input_ids"][0] == llm_tokenizer.bos_token_id


def test_build_is_idempotent(demo_models: Path) -> None:
    marker = demo_models.parent / BUILD_MARKER
    assert marker.read_text() == DEMO_MODELS_VERSION
    before = marker.stat().st_mtime_ns
    assert build_demo_models(demo_models.parent) == demo_models
    assert marker.stat().st_mtime_ns == before

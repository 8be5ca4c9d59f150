"""The contracts in shared/: request validation and limits, the registry, the Celery configuration."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pagedq.shared.celery_config import QUEUES, TASK_NAMES, celery_config, celery_priority
from pagedq.shared.errors import ModelNotFound, UnsupportedLanguagePair
from pagedq.shared.models import (
    NOT_BLANK,
    ClassifyRequest,
    GenerationOptions,
    QARequest,
    StatusQuery,
    TaskState,
    TaskType,
    TranslateRequest,
    limits_schema,
)
from pagedq.shared.registry import Registry
from pagedq.shared.settings import Limits, Settings

SMALL = {"limits": Limits(max_text_chars=10, max_context_chars=20, max_new_tokens=8, max_beams=2, max_timeout_s=5)}


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_is_rejected(text: str) -> None:
    with pytest.raises(ValidationError, match="text must not be empty"):
        ClassifyRequest(text=text)


def test_limits_from_context_are_enforced() -> None:
    ClassifyRequest.model_validate({"text": "x" * 10}, context=SMALL)
    with pytest.raises(ValidationError, match="text is 11 characters; the limit is 10"):
        ClassifyRequest.model_validate({"text": "x" * 11}, context=SMALL)
    with pytest.raises(ValidationError, match="context is 21 characters"):
        QARequest.model_validate({"question": "q", "context": "c" * 21}, context=SMALL)
    with pytest.raises(ValidationError, match="max_new_tokens is 9"):
        TranslateRequest.model_validate({"text": "t", "generation": {"max_new_tokens": 9}}, context=SMALL)
    with pytest.raises(ValidationError, match="num_beams is 3"):
        TranslateRequest.model_validate({"text": "t", "generation": {"num_beams": 3}}, context=SMALL)
    with pytest.raises(ValidationError, match="timeout_s is 6"):
        ClassifyRequest.model_validate({"text": "t", "timeout_s": 6}, context=SMALL)


def test_blank_is_python_whitespace_in_the_schema_pattern_too() -> None:
    """The schema's pattern spells out what `str.isspace` calls whitespace, so every regex dialect agrees."""
    everything = "".join(map(chr, range(0x110000)))
    assert set(re.sub(NOT_BLANK, "", everything)) == {c for c in everything if c.isspace()}
    with pytest.raises(ValidationError, match="text must not be empty"):
        ClassifyRequest(text="\x1c\x85")  # whitespace to Python, not to ECMA's \s
    assert ClassifyRequest(text="\ufeff").text == "\ufeff"  # the reverse


def test_lone_surrogates_are_rejected() -> None:
    """JSON can carry `"\\ud800"`; no tokenizer (nor UTF-8) can take it."""
    with pytest.raises(ValidationError, match=re.escape("text is not valid Unicode: a lone surrogate '\\ud800' at")):
        ClassifyRequest(text="a\ud800")
    with pytest.raises(ValidationError, match="question is not valid Unicode"):
        QARequest(question="\udc00", context="c")
    with pytest.raises(ValidationError, match="context is not valid Unicode"):
        QARequest(question="q", context="c\ud800c")
    with pytest.raises(ValidationError, match="model"):
        ClassifyRequest(text="ok", model="m\udfff")
    assert ClassifyRequest(text="\U0001f600").text == "\U0001f600"  # a surrogate pair in JSON is one character


def test_sampling_temperature_has_a_floor_greedy_ignores_it() -> None:
    with pytest.raises(ValidationError, match="temperature is 1e-300; sampling needs at least 0.01"):
        GenerationOptions(do_sample=True, temperature=1e-300)
    assert GenerationOptions(do_sample=True, temperature=0.01).temperature == 0.01
    assert GenerationOptions(temperature=1e-300).temperature == 1e-300  # greedy: unused
    assert GenerationOptions(num_beams=4, temperature=1e-300).num_beams == 4


LIMIT_CASES = {  # model name -> (the model, a valid request to set the limited field in)
    "ClassifyRequest": (ClassifyRequest, {"text": "t"}),
    "TranslateRequest": (TranslateRequest, {"text": "t"}),
    "QARequest": (QARequest, {"question": "q", "context": "c"}),
    "StatusQuery": (StatusQuery, {"ids": ["a"]}),
}


def _at(keyword: str, bound: float, over: bool) -> Any:
    """A value exactly at `bound` (or just over it) for a JSON Schema keyword."""
    if keyword == "maxLength":
        return "x" * (int(bound) + over)
    if keyword == "maxItems":
        return ["x"] * (int(bound) + over)
    return bound + over


@pytest.mark.parametrize("over", [False, True])
def test_the_schema_keywords_of_the_limits_are_what_the_validators_enforce(over: bool) -> None:
    limits = SMALL["limits"]
    for model_name, fields in limits_schema(limits).items():
        for field, keywords in fields.items():
            ((keyword, bound),) = keywords.items()
            value = _at(keyword, bound, over)
            if model_name == "GenerationOptions":
                model, data = TranslateRequest, {"text": "t", "generation": {field: value}}
            else:
                model, base = LIMIT_CASES[model_name]
                data = {**base, field: value}
            if over:
                with pytest.raises(ValidationError, match=f"{field} is|limit is"):
                    model.model_validate(data, context=SMALL)
            else:
                model.model_validate(data, context=SMALL)


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDQ_LIMITS__MAX_TEXT_CHARS", "4")
    assert Settings().limits.max_text_chars == 4


def test_unknown_fields_and_wrong_types_are_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ClassifyRequest.model_validate({"text": "hi", "colour": "blue"})
    with pytest.raises(ValidationError, match="valid string"):
        ClassifyRequest.model_validate({"text": 42})
    with pytest.raises(ValidationError, match="either sampling"):
        GenerationOptions(do_sample=True, num_beams=4)
    with pytest.raises(ValidationError):
        ClassifyRequest(text="hi", priority=1000)


def test_task_states() -> None:
    assert not TaskState.QUEUED.is_final and not TaskState.RUNNING.is_final
    assert all(s.is_final for s in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.EXPIRED))


REGISTRY = """
[defaults]
classify = "clf"
translate = "en-de"

[models.clf]
task = "classify"
source = "./clf"

[models.en-de]
task = "translate"
source = "Helsinki-NLP/opus-mt-en-de"
languages = ["en-de"]

[models.en-fr]
task = "translate"
source = "./en-fr"
languages = ["en-fr"]

[models.span]
task = "qa"
source = "/abs/span"

[models.llm]
task = "qa"
mode = "generative"
source = "./llm"
"""


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    path = tmp_path / "registry.toml"
    path.write_text(REGISTRY)
    return Registry.load(path)


def test_registry_fills_architecture_and_resolves_sources(registry: Registry, tmp_path: Path) -> None:
    assert registry.models["clf"].architecture == "sequence-classification"
    assert registry.models["en-de"].architecture == "seq2seq"
    assert registry.models["span"].architecture == "question-answering"
    assert registry.models["span"].mode == "extractive"
    assert registry.models["llm"].architecture == "causal-lm"
    assert registry.resolve_source(registry.models["clf"]) == str(tmp_path.resolve() / "clf")
    assert registry.resolve_source(registry.models["en-de"]) == "Helsinki-NLP/opus-mt-en-de"


def test_registry_selects_models(registry: Registry) -> None:
    assert registry.select(TaskType.CLASSIFY, ClassifyRequest(text="x")).name == "clf"
    assert registry.select(TaskType.TRANSLATE, TranslateRequest(text="x")).name == "en-de"
    fr = TranslateRequest(text="x", source_lang="en", target_lang="fr")
    assert registry.select(TaskType.TRANSLATE, fr).name == "en-fr"
    gen = QARequest(question="q", context="c", mode="generative")
    assert registry.select(TaskType.QA, gen).name == "llm"
    assert registry.select(TaskType.QA, QARequest(question="q", context="c")).name == "span"


def test_registry_rejects_what_it_cannot_serve(registry: Registry) -> None:
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        registry.select(TaskType.CLASSIFY, ClassifyRequest(text="x", model="nope"))
    with pytest.raises(ModelNotFound, match="serves translate, not classify"):
        registry.select(TaskType.CLASSIFY, ClassifyRequest(text="x", model="en-de"))
    with pytest.raises(UnsupportedLanguagePair, match="en -> xx"):
        registry.select(TaskType.TRANSLATE, TranslateRequest(text="x", source_lang="en", target_lang="xx"))
    with pytest.raises(UnsupportedLanguagePair, match=r"does not translate \* -> fr"):
        registry.select(TaskType.TRANSLATE, TranslateRequest(text="x", target_lang="fr", model="en-de"))


def test_registry_file_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[defaults]\nclassify = "missing"\n[models.a]\ntask = "classify"\nsource = "x"\n')
    with pytest.raises(ValidationError, match="default classify model 'missing' is not in"):
        Registry.load(path)
    path.write_text('[models.a]\ntask = "translate"\nsource = "x"\nlanguages = ["english"]\n')
    with pytest.raises(ValidationError, match="must look like 'en-de'"):
        Registry.load(path)
    path.write_text('[models.a]\ntask = "classify"\nsource = "x"\nintra_op_threads = 0\n')
    with pytest.raises(ValidationError, match="intra_op_threads"):
        Registry.load(path)


def test_intra_op_threads_are_read_from_the_registry_and_the_environment(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "threads.toml"
    path.write_text('[models.a]\ntask = "classify"\nsource = "x"\nintra_op_threads = 1\n'
                    '[models.b]\ntask = "classify"\nsource = "x"\n'
                    '[models.c]\ntask = "classify"\nsource = "x"\nintra_op_threads = "auto"\n')
    registry = Registry.load(path)
    assert registry.models["a"].intra_op_threads == 1 and registry.models["b"].intra_op_threads is None
    assert registry.models["c"].intra_op_threads == "auto"
    monkeypatch.setenv("PAGEDQ_INTRA_OP_THREADS", "3")
    assert Settings().intra_op_threads == 3
    monkeypatch.setenv("PAGEDQ_INTRA_OP_THREADS", "auto")
    assert Settings().intra_op_threads == "auto"
    for bad in ("0", "many"):
        monkeypatch.setenv("PAGEDQ_INTRA_OP_THREADS", bad)
        with pytest.raises(ValidationError, match="intra_op_threads"):
            Settings()
    path.write_text('[models.a]\ntask = "classify"\nsource = "x"\nintra_op_threads = "fast"\n')
    with pytest.raises(ValidationError, match="intra_op_threads"):
        Registry.load(path)


def test_celery_configuration_is_safe_for_at_least_once_delivery() -> None:
    settings = Settings(result_ttl_s=1234)
    conf = celery_config(settings)
    assert conf["task_serializer"] == "json" and conf["accept_content"] == ["json"]
    assert conf["result_accept_content"] == ["json"]
    assert conf["task_acks_late"] is True and conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_transport_options"]["visibility_timeout"] > settings.limits.max_timeout_s
    assert conf["result_expires"] == 1234
    assert conf["worker_send_task_events"] is True and conf["task_send_sent_event"] is True
    assert [q.name for q in conf["task_queues"]] == ["pagedq.classify", "pagedq.translate", "pagedq.qa"]
    assert conf["task_routes"]["pagedq.qa"] == {"queue": "pagedq.qa"}
    assert TASK_NAMES[TaskType.QA] == QUEUES[TaskType.QA] == "pagedq.qa"


def test_priorities_map_lower_first_onto_redis_priorities() -> None:
    assert celery_priority(-100) == 0 and celery_priority(100) == 9
    assert celery_priority(-10) <= celery_priority(0) <= celery_priority(10)


def test_published_registries_merge_into_what_the_live_workers_serve() -> None:
    """Each worker publishes `Registry.published` in its lease; producers validate against the union."""
    one = Registry.model_validate({
        "models": {"a": {"task": "translate", "source": "x/a", "languages": ["en-de"], "device": "cuda:1"},
                   "b": {"task": "classify", "source": "x/b"}},
        "defaults": {"translate": "a", "classify": "b"}})
    two = Registry.model_validate({"models": {"c": {"task": "qa", "source": "x/c", "mode": "extractive"},
                                              "b": {"task": "classify", "source": "x/b"}}})
    first = one.published(refused={"b": "ValueError: no"})
    assert first["models"] == {"a": {"task": "translate", "source": "x/a", "architecture": "seq2seq",
                                     "mode": None, "languages": ["en-de"]}}  # what validation needs, no device
    assert first["defaults"] == {"translate": "a"} and first["refused"] == {"b": "ValueError: no"}
    merged, refused = Registry.from_published([first, two.published()])
    assert merged is not None and sorted(merged.models) == ["a", "b", "c"]
    assert refused == {}  # b is refused by one worker but served by another
    with pytest.raises(UnsupportedLanguagePair):
        merged.select(TaskType.TRANSLATE, TranslateRequest(text="hi", source_lang="en", target_lang="fr"))
    alone, refused = Registry.from_published([first])
    assert alone is not None and sorted(alone.models) == ["a"] and refused == {"b": "ValueError: no"}
    assert Registry.from_published([]) == (None, {})

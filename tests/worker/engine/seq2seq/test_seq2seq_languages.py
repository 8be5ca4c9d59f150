"""Language pairs on a multilingual model: M2M100 with an offline M2M100Tokenizer, through the executor.

The source language is set on the tokenizer (its language token starts the input), the target's language
token is forced as the first generated token -- what transformers' translation pipeline did -- and a code
the model does not know is `UnsupportedLanguagePair`, never a crash.
"""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any

import pytest
import torch
from executor_support import TEXTS, request, run
from transformers import GenerationConfig, M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

from pagedq.shared.errors import InvalidRequest, UnsupportedLanguagePair
from pagedq.shared.models import GenerationOptions, TaskType, TranslateRequest
from pagedq.shared.registry import ModelSpec
from pagedq.worker.demo.corpus import ENGLISH_WORDS
from pagedq.worker.demo.tokenizers import _train_sentencepiece
from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel
from pagedq.worker.engine.tasks.translate import Seq2SeqExecutor

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def m2m(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Any]:
    """A tiny random M2M100 and its tokenizer (100 fairseq language codes); plus an untouched copy."""
    out = tmp_path_factory.mktemp("m2m100")
    (out / "spm.model").write_bytes(_train_sentencepiece(ENGLISH_WORDS, 7))
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    pieces = [processor.IdToPiece(i) for i in range(processor.GetPieceSize())]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIALS, *pieces]))}
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = M2M100Tokenizer(str(out / "vocab.json"), str(out / "spm.model"), src_lang="en", model_max_length=128)
    torch.manual_seed(0)
    vocab_size = max(tokenizer.lang_code_to_id.values()) + 1 + tokenizer.num_madeup_words  # len() omits them
    config = M2M100Config(
        vocab_size=vocab_size, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, init_std=0.2,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = M2M100ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=2, eos_token_id=2, pad_token_id=1, max_length=13)
    spec = ModelSpec(name="m2m", task=TaskType.TRANSLATE, source=str(out), languages=["en-de", "en-fr", "de-en"])
    return LoadedModel(spec, model, tokenizer, torch.device("cpu"), torch.float32), copy.deepcopy(model)


def translate(text: str, **fields: Any) -> EngineRequest:
    generation = GenerationOptions(**fields.pop("generation", {}))
    langs = {k: fields.pop(k) for k in ("source_lang", "target_lang") if k in fields}
    return request(TaskType.TRANSLATE, TranslateRequest(text=text, generation=generation, **langs), "m2m", **fields)


def reference(loaded: LoadedModel, ref: Any, text: str, source: str, target: str, **kwargs: Any) -> str:
    tokenizer = loaded.tokenizer
    tokenizer.src_lang = source
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**inputs, forced_bos_token_id=tokenizer.get_lang_id(target), **kwargs)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_target_language_is_the_forced_first_token(m2m: tuple[LoadedModel, Any]) -> None:
    loaded, ref = m2m
    executor = Seq2SeqExecutor(loaded, EngineConfig(block_size=4))
    pairs = [("en", "de"), ("en", "fr"), ("de", "en"), ("en", "de")]
    reqs = [translate(t, source_lang=s, target_lang=g) for t, (s, g) in zip(TEXTS, pairs, strict=False)]
    beam = translate(TEXTS[4], source_lang="en", target_lang="fr", generation={"num_beams": 3})
    run(executor, [*reqs, beam])
    assert executor.stats().as_dict()["num_fallback_requests"] == 0
    for req, text, (source, target) in zip(reqs, TEXTS, pairs, strict=False):
        assert req.future.result(timeout=0).translation == reference(loaded, ref, text, source, target)
    assert beam.future.result(timeout=0).translation == reference(loaded, ref, TEXTS[4], "en", "fr", num_beams=3)


def test_unknown_or_unserved_languages_are_rejected(m2m: tuple[LoadedModel, Any]) -> None:
    loaded, _ = m2m
    executor = Seq2SeqExecutor(loaded, EngineConfig(block_size=4))
    unserved = translate(TEXTS[0], source_lang="en", target_lang="ja")  # a code M2M100 knows; not registered
    loaded.spec.languages.append("en-xx")
    try:
        unknown = translate(TEXTS[0], source_lang="en", target_lang="xx")  # registered, but not a model language
        missing = translate(TEXTS[0], target_lang="xx")  # the source comes from the registered pair
        run(executor, [unserved, unknown, missing])
    finally:
        loaded.spec.languages.remove("en-xx")
    for req in (unserved, unknown, missing):
        with pytest.raises(UnsupportedLanguagePair):
            req.future.result(timeout=0)
    default = translate(TEXTS[1])  # no languages at all: the first registered pair
    run(executor, [default])
    assert default.future.result(timeout=0).model == "m2m"
    assert executor.engine is not None and executor.engine.kv.pool.usage == 0.0


def test_a_multilingual_model_without_registered_pairs_needs_both_languages(m2m: tuple[LoadedModel, Any]) -> None:
    loaded, _ = m2m
    spec = loaded.spec.model_copy(update={"languages": []})
    executor = Seq2SeqExecutor(LoadedModel(spec, loaded.model, loaded.tokenizer, loaded.device, loaded.dtype),
                               EngineConfig(block_size=4))  # fmt: skip
    vague = translate(TEXTS[0], target_lang="de")
    run(executor, [vague])
    with pytest.raises(InvalidRequest, match="source_lang and target_lang"):
        vague.future.result(timeout=0)

"""No generation option is ignored in silence: each is honoured by the paged engine, sends the request to the
`generate` fallback (which honours everything generate does), or refuses the request."""

from __future__ import annotations

import dataclasses

import pytest
from seq2seq_support import build_pair
from transformers import GenerationConfig

from pagedq.shared.models import GenerationOptions
from pagedq.worker.engine.decoding.seq2seq_options import (
    NO_EFFECT_ON_TOKENS,
    REQUEST_OPTIONS,
    UNSUPPORTED_WHEN_SET,
    DecodeSettings,
    unknown_request_options,
    unsupported_options,
)

#: generation_config fields `decode_settings` reads under another name
RESOLVED_AS = {
    "max_length": "max_new_tokens",
    "eos_token_id": "eos_token_ids",
    "bos_token_id": "decoder_start_token_id",
}


def test_every_request_option_has_a_path() -> None:
    assert set(GenerationOptions.model_fields) == set(REQUEST_OPTIONS)
    every = GenerationOptions(
        max_new_tokens=3, do_sample=True, temperature=0.5, top_p=0.9, top_k=5, seed=1, stream=True
    )
    assert unknown_request_options(every) == []


def test_a_request_option_no_path_knows_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(REQUEST_OPTIONS, "top_k")
    assert unknown_request_options(GenerationOptions(top_k=5, do_sample=True)) == ["top_k"]
    assert unknown_request_options(GenerationOptions(do_sample=True)) == [], "left at its default: nothing to do"


def test_every_generation_config_field_is_honoured_routed_or_without_effect() -> None:
    """A field transformers adds to GenerationConfig fails here until it is classified."""
    honoured = {f.name for f in dataclasses.fields(DecodeSettings)} | set(RESOLVED_AS)
    fields = set(GenerationConfig().to_dict())
    unclassified = fields - honoured - set(UNSUPPORTED_WHEN_SET) - NO_EFFECT_ON_TOKENS
    assert not unclassified, f"classify {sorted(unclassified)} in worker/engine/decoding/seq2seq_options.py"
    assert not honoured & set(UNSUPPORTED_WHEN_SET)


def test_a_model_default_the_engine_does_not_implement_routes_to_the_fallback() -> None:
    for name, value in {"repetition_penalty": 1.2, "penalty_alpha": 0.6, "dola_layers": "low", "max_time": 5.0}.items():
        model = build_pair("marian", **{name: value}).model
        assert name in unsupported_options(model, GenerationOptions())
    assert unsupported_options(build_pair("marian").model, GenerationOptions(num_beams=2)) == []


def test_min_new_tokens_replaces_min_length_as_generate_does() -> None:
    """generate: with `min_new_tokens` set, `min_length` becomes min_new_tokens + the decoder start token."""
    from pagedq.worker.engine.decoding.seq2seq_options import decode_settings

    both = decode_settings(build_pair("marian", min_length=20, min_new_tokens=3).model, GenerationOptions())
    assert (both.min_length, both.min_new_tokens) == (4, 3)
    only_length = decode_settings(build_pair("marian", min_length=20).model, GenerationOptions())
    assert (only_length.min_length, only_length.min_new_tokens) == (20, 0)

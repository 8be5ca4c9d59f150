"""One resolution of a request's options for every architecture: the request's value, else the model's
generation_config, else generate's default -- the same knobs on a causal LM and a translation model."""

from __future__ import annotations

from typing import Any

import pytest
from seq2seq_support import build_pair
from transformers import GenerationConfig

from pagedq.shared.models import GenerationOptions
from pagedq.worker.engine.decoding.causal_options import sampling_params
from pagedq.worker.engine.decoding.options import resolve
from pagedq.worker.engine.decoding.seq2seq_options import decode_settings, generate_kwargs, generation_key
from worker.engine.families import build_family


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return build_family("llama", seed=1).model, build_pair("marian").model


def knobs(causal: Any, seq2seq: Any, options: GenerationOptions) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    p = sampling_params(causal, options, [])
    s = decode_settings(seq2seq, options)
    return (p.temperature, p.top_k, p.top_p, p.num_beams), (s.temperature, s.top_k, s.top_p, s.num_beams)


@pytest.mark.parametrize(
    ("config", "options", "want"),
    [
        ({}, {"do_sample": True}, (1.0, 50, 1.0, 1)),  # generate's defaults
        ({"top_k": 7, "temperature": 0.6}, {"do_sample": True}, (0.6, 7, 1.0, 1)),  # the model's
        ({"top_k": 7, "temperature": 0.6}, {"do_sample": True, "top_k": 0, "top_p": 0.9}, (0.6, 0, 0.9, 1)),
        ({"do_sample": True, "top_p": 0.8}, {}, (1.0, 50, 0.8, 1)),  # sampling by the model's default
        ({"num_beams": 3}, {}, (0.0, 0, 1.0, 3)),  # beams by the model's default (seq2seq: 1.0, 0, 1.0)
    ],
)
def test_the_same_request_picks_the_same_knobs_on_both_architectures(
    models: tuple[Any, Any], config: dict[str, Any], options: dict[str, Any], want: tuple[Any, ...]
) -> None:
    causal, seq2seq = models
    saved = causal.generation_config, seq2seq.generation_config
    try:
        for model in models:
            model.generation_config = GenerationConfig(**config, eos_token_id=model.generation_config.eos_token_id)
        request = GenerationOptions(**options)
        ours_causal, ours_seq2seq = knobs(causal, seq2seq, request)
        assert ours_causal == want
        sampled = resolve(request, seq2seq.generation_config).do_sample
        assert ours_seq2seq == (want if sampled else (1.0, 0, 1.0, want[3]))  # greedy: neutral knobs
        key = generation_key(request, "r", seq2seq)  # the generate fallback passes the same knobs
        kwargs = generate_kwargs(key, seq2seq)
        assert kwargs["do_sample"] == sampled and kwargs["num_beams"] == want[3]
        if sampled:
            assert (kwargs["temperature"], kwargs["top_k"], kwargs["top_p"]) == want[:3]
    finally:
        causal.generation_config, seq2seq.generation_config = saved

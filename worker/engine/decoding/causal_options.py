"""Exact or refused, for options: how the paged causal-LM path treats every `GenerationConfig` field and request option.

Every field of transformers' `GenerationConfig` is in exactly one table (a test fails when transformers adds
one that nobody sorted):

- `HONOURED`: applied as `model.generate` applies it -- the logits processors by `logits_processors` (raw
  logits, greedy and sampled, in generate's order), the warpers and stops by `sampling`;
- `NO_EFFECT_ON_TOKENS`: never changes which tokens come out on this path;
- `REFUSED_WHEN_SET` (with its "off" value): not implemented, and the causal path has no `generate` fallback,
  so a model whose generation_config sets one is refused when its engine is built (`check_generation_config`
  raises `UnsupportedModel` naming the field, its value and what to do).

A request's `GenerationOptions` resolve once, in `sampling_params`, as for every architecture (`options.resolve`):
what the request sets, else the model's generation_config, else generate's own default (e.g. top_k 50 when
sampling). A request option outside `REQUEST_OPTIONS`, or beam sampling (`do_sample` with
`num_beams > 1`), fails the request with `InvalidRequest`. Beam search (`num_beams > 1`, greedy) runs on the
engine as generate runs it (`decoding.beam_search`: its length penalty and early stopping, lengths counted from
the prompt).

Units follow generate for a decoder-only model called on one unpadded prompt: `min_length` counts the prompt
too; `min_new_tokens` (which then replaces `min_length`), repetition penalty, n-gram and bad-word bans see the
prompt and the generated tokens together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pagedq.shared.errors import InvalidRequest
from pagedq.shared.models import GenerationOptions
from pagedq.worker.engine.decoder_only.self_check import UnsupportedModel
from pagedq.worker.engine.decoding.logits_processors import ProcessorSettings
from pagedq.worker.engine.decoding.options import resolve, value
from pagedq.worker.engine.decoding.sampling import SamplingParams
from pagedq.worker.engine.decoding.seq2seq_options import NO_EFFECT_ON_TOKENS as SEQ2SEQ_NO_EFFECT

DEFAULT_MAX_NEW_TOKENS = 64  # when neither the request nor the generation_config says

HONOURED: dict[str, str] = {
    "max_new_tokens": "SamplingParams.max_new_tokens (the request's, else this, else DEFAULT_MAX_NEW_TOKENS)",
    "max_length": "superseded: every request has a max_new_tokens, which generate also lets win over max_length",
    "eos_token_id": "StopChecker (the engine's EOS ids); banned by min_length / min_new_tokens",
    "do_sample": "SamplingParams.temperature (0: greedy)",
    "temperature": "SamplingParams.temperature",
    "top_k": "SamplingParams.top_k",
    "top_p": "SamplingParams.top_p",
    "min_p": "SamplingParams.min_p (transformers' MinPLogitsWarper)",
    "typical_p": "SamplingParams.typical_p (TypicalLogitsWarper)",
    "epsilon_cutoff": "SamplingParams.epsilon_cutoff (EpsilonLogitsWarper)",
    "eta_cutoff": "SamplingParams.eta_cutoff (EtaLogitsWarper)",
    "repetition_penalty": "ProcessorSettings.repetition_penalty (prompt and generated tokens)",
    "no_repeat_ngram_size": "ProcessorSettings.no_repeat_ngram_size (prompt and generated tokens)",
    "bad_words_ids": "ProcessorSettings.bad_words_ids (EOS-only words dropped, as generate)",
    "min_length": "ProcessorSettings.min_length (prompt included; replaced by min_new_tokens when that is set)",
    "min_new_tokens": "ProcessorSettings.min_new_tokens",
    "forced_bos_token_id": "ProcessorSettings.forced_bos_token_id (cur_len == 1: a one-token prompt)",
    "forced_eos_token_id": "ProcessorSettings.forced_eos_token_id (one id: the last token max_new_tokens allows)",
    "suppress_tokens": "ProcessorSettings.suppress_tokens",
    "begin_suppress_tokens": "ProcessorSettings.begin_suppress_tokens (the first generated token)",
    "num_beams": "SamplingParams.num_beams: beam search (decoding.beam_search), greedy only",
    "length_penalty": "SamplingParams.length_penalty (beam search)",
    "early_stopping": "SamplingParams.early_stopping (beam search)",
}

#: fields that never change the tokens here: seq2seq's list (outputs, caches, compilation, assistant knobs), plus
#: ids generate needs only without a prompt or for padding, and renormalize_logits (a final log-softmax: argmax,
#: softmax and beam search's log-softmaxed scores unchanged)
NO_EFFECT_ON_TOKENS = SEQ2SEQ_NO_EFFECT | {
    "pad_token_id", "bos_token_id", "decoder_start_token_id", "renormalize_logits",
}  # fmt: skip

#: not implemented on the paged causal path: a generation_config that sets one (to other than the value on the
#: right, or None) is refused. encoder_* act on the prompt for a decoder-only model (generate passes it as
#: `encoder_input_ids`).
REFUSED_WHEN_SET: dict[str, Any] = {
    "num_return_sequences": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "sequence_bias": None,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None,
    "remove_invalid_values": False,
    "guidance_scale": 1.0,
    "top_h": None,
    "force_words_ids": None,
    "constraints": None,
    "watermarking_config": None,
    "penalty_alpha": None,
    "dola_layers": None,
    "max_time": None,
    "stop_strings": None,
    "token_healing": False,
    "prompt_lookup_num_tokens": None,
    "speculation_type": None,
    "use_mtp": False,
}

#: how each request option (`pagedq.shared.models.GenerationOptions`) is honoured; a request setting another is refused
REQUEST_OPTIONS: dict[str, str] = {
    "max_new_tokens": "SamplingParams.max_new_tokens",
    "do_sample": "SamplingParams.temperature (0: greedy)",
    "temperature": "SamplingParams.temperature (sampling only, as generate)",
    "top_p": "SamplingParams.top_p (sampling only)",
    "top_k": "SamplingParams.top_k (sampling only)",
    "seed": "SamplingParams.seed: the request's own generator",
    "num_beams": "SamplingParams.num_beams: beam search (greedy only; with do_sample: InvalidRequest)",
    "stream": "the executor: on_token streams every token",
}


def refused_fields(generation_config: Any) -> list[str]:
    """`field=value` for each field the config sets that the paged causal path cannot apply."""
    if generation_config is None:
        return []
    found = [
        f"{name}={value!r}"
        for name, off in REFUSED_WHEN_SET.items()
        if (value := getattr(generation_config, name, None)) is not None and value != off
    ]
    forced_eos = generation_config.forced_eos_token_id
    if isinstance(forced_eos, (list, tuple)) and len(forced_eos) > 1:
        found.append(f"forced_eos_token_id={list(forced_eos)!r} (several ids)")
    if (generation_config.num_beams or 1) > 1 and generation_config.do_sample:
        found.append(f"num_beams={generation_config.num_beams} with do_sample=True (beam sampling)")
    return found


def check_generation_config(model: Any) -> None:
    """Refuse a model whose generation_config asks for what the paged causal path does not implement."""
    found = refused_fields(getattr(model, "generation_config", None))
    if found:
        raise UnsupportedModel(
            f"{type(model).__name__}'s generation_config sets {', '.join(found)}, which the paged causal-LM engine "
            "does not implement: it would be served differently from model.generate. Set each to its default "
            "(remove it) in generation_config.json to serve this model."
        )


def sampling_params(
    model: Any, options: GenerationOptions, eos_token_ids: Sequence[int], stop: tuple[str, ...] = ()
) -> SamplingParams:
    """`options` over `model.generation_config` over generate's defaults, resolved once for one request."""
    unknown = sorted(set(options.model_fields_set) - REQUEST_OPTIONS.keys())
    if unknown:
        raise InvalidRequest(f"generation options {unknown} are not supported for causal LMs")
    gen = model.generation_config
    r = resolve(options, gen)
    sample, beams = r.do_sample, r.num_beams
    if beams > 1 and sample:
        raise InvalidRequest("beam sampling (do_sample with num_beams > 1) is not supported; use one of the two")
    return SamplingParams(
        max_new_tokens=options.max_new_tokens or gen.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=r.temperature if sample else 0.0,
        top_k=r.top_k if sample else 0,
        top_p=r.top_p if sample else 1.0,
        min_p=float(gen.min_p or 0.0) if sample else 0.0,
        typical_p=float(value(gen, "typical_p")) if sample else 1.0,
        epsilon_cutoff=float(value(gen, "epsilon_cutoff")) if sample else 0.0,
        eta_cutoff=float(value(gen, "eta_cutoff")) if sample else 0.0,
        seed=options.seed,
        stop=stop,
        processors=processor_settings(gen, eos_token_ids),
        num_beams=beams,
        length_penalty=float(value(gen, "length_penalty")),
        early_stopping=value(gen, "early_stopping"),
    )


def processor_settings(gen: Any, eos_token_ids: Sequence[int]) -> ProcessorSettings:
    """The generation_config's logits processors with generate's decoder-only semantics."""
    eos = tuple(int(t) for t in eos_token_ids)
    forced_eos = _ids(gen.forced_eos_token_id)
    min_new = gen.min_new_tokens
    return ProcessorSettings(
        repetition_penalty=float(value(gen, "repetition_penalty")),
        no_repeat_ngram_size=int(value(gen, "no_repeat_ngram_size")),
        bad_words_ids=tuple(tuple(w) for w in (gen.bad_words_ids or ()) if not (len(w) == 1 and w[0] in eos)),
        eos_token_ids=eos,
        # generate: min_new_tokens replaces min_length by min_new_tokens + prompt length
        min_length=int(value(gen, "min_length")) if min_new is None else 0,
        min_new_tokens=int(min_new or 0),
        forced_bos_token_id=gen.forced_bos_token_id,
        forced_eos_token_id=forced_eos[0] if forced_eos else None,
        suppress_tokens=_ids(gen.suppress_tokens),
        begin_suppress_tokens=_ids(gen.begin_suppress_tokens),
    )


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)

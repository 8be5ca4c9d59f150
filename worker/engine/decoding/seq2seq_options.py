"""Generation options of encoder-decoder requests: what `generate` would apply, for both translation paths.

Each option resolves as for every architecture (`options.resolve`): the request's value if it set it, else the
model's `generation_config`, else generate's own default.

- The paged engine resolves everything once per request into `DecodeSettings` (`decode_settings`), and
  refuses what it does not implement (`unsupported_options`: such a request runs on the fallback).
- A request option that neither path knows (`REQUEST_OPTIONS`) is refused (`unknown_request_options`:
  InvalidRequest), never ignored.
- The batched-`generate` fallback groups requests whose effective options are equal (`GenerationKey`) into
  one `generate` call; a seeded request never shares (its key carries its request id), so its random
  stream is its own.

A temperature below `sampling.GREEDY_BELOW_TEMPERATURE` decodes greedily on both paths: the sampler's
distribution is the argmax there anyway, and generate's own `scores / temperature` would overflow to NaN.

Lengths: an encoder-decoder's decoder sequence starts with `decoder_start_token_id`, so
`max_new_tokens = N` is `max_length = N + 1`. We pass whichever of the two the model's config uses, so
transformers never sees both (it warns on every call if it does).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from pagedq.shared.models import GenerationOptions
from pagedq.worker.engine.decoding.logits_processors import ProcessorSettings
from pagedq.worker.engine.decoding.options import resolve, value
from pagedq.worker.engine.decoding.sampling import SamplingParams

DECODER_START_TOKENS = 1  # the decoder_start_token_id every encoder-decoder output begins with
@dataclass(frozen=True)
class GenerationKey:
    """Effective options of one request (`options.resolve`); the sampling knobs are None when it does not sample."""

    max_new_tokens: int
    num_beams: int
    do_sample: bool
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    alone: str | None = None  # the request id when it must run in a batch of its own
    forced_bos_token_id: int | None = None  # the target-language token of multilingual models

    @property
    def seeded(self) -> bool:
        return self.seed is not None


def default_max_new_tokens(model: Any) -> int:
    config = model.generation_config
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    return int(value(config, "max_length")) - DECODER_START_TOKENS


def generation_key(
    options: GenerationOptions, request_id: str, model: Any, forced_bos_token_id: int | None = None
) -> GenerationKey:
    """The effective options of request `request_id` on `model`."""
    max_new = options.max_new_tokens or default_max_new_tokens(model)
    positions = getattr(model.config, "max_position_embeddings", None)  # learned/sinusoidal decoder positions
    if positions is not None:
        max_new = min(max_new, positions - DECODER_START_TOKENS)
    r = resolve(options, model.generation_config)
    return GenerationKey(
        max_new_tokens=max_new,
        num_beams=r.num_beams,
        do_sample=r.do_sample,
        temperature=r.temperature if r.do_sample else None,  # sampling knobs only matter when sampling
        top_p=r.top_p if r.do_sample else None,
        top_k=r.top_k if r.do_sample else None,
        seed=options.seed,
        alone=request_id if options.seed is not None else None,
        forced_bos_token_id=forced_bos_token_id,
    )


def generate_kwargs(key: GenerationKey, model: Any) -> dict[str, Any]:
    """Keyword arguments for `model.generate` that apply `key` over the model's generation_config."""
    kwargs: dict[str, Any] = {"num_beams": key.num_beams}
    if model.generation_config.max_new_tokens is not None:
        kwargs["max_new_tokens"] = key.max_new_tokens
    else:
        kwargs["max_length"] = key.max_new_tokens + DECODER_START_TOKENS
    kwargs["do_sample"] = key.do_sample
    if key.do_sample:
        kwargs.update(temperature=key.temperature, top_p=key.top_p, top_k=key.top_k)
    if key.forced_bos_token_id is not None:
        kwargs["forced_bos_token_id"] = key.forced_bos_token_id
    return kwargs


def split_output(row: list[int], model: Any, max_new_tokens: int) -> tuple[list[int], Literal["stop", "length"]]:
    """Generated tokens up to and including the first EOS (padding after it dropped), and why it ended.

    "length" when the limit was reached -- including an EOS forced at the limit (`forced_eos_token_id`).
    """
    config = model.generation_config
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    end = next((i for i, token in enumerate(row) if token in eos_ids), None)
    if end is None:
        return row[:max_new_tokens], "length"
    tokens = row[: end + 1]
    forced = config.forced_eos_token_id is not None
    return tokens, "length" if forced and len(tokens) >= max_new_tokens else "stop"


# ---- the paged engine's view: every option generate would apply, resolved once per request ---------------------

#: generation_config fields the paged engine does not implement; a request whose effective config sets one
#: runs on the batched-`generate` fallback instead (their "off" values on the right).
UNSUPPORTED_WHEN_SET: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "guidance_scale": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
    "num_return_sequences": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "force_words_ids": None,
    "constraints": None,
    "watermarking_config": None,
    "prefix_allowed_tokens_fn": None,
    "penalty_alpha": None,  # contrastive search
    "dola_layers": None,
    "max_time": None,
    "stop_strings": None,
    "token_healing": None,
    "prompt_lookup_num_tokens": None,
    "speculation_type": None,
    "use_mtp": None,
}

#: generation_config fields that never change which tokens come out (outputs, caches, compilation, and the
#: assistant knobs, which act only with an assistant model, which neither path passes)
NO_EFFECT_ON_TOKENS = frozenset({
    "_from_model_config", "transformers_version", "output_attentions", "output_hidden_states", "output_logits",
    "output_scores", "return_dict_in_generate", "use_cache", "cache_implementation", "cache_config",
    "max_cache_len", "compile_config", "disable_compile", "low_memory", "prefill_chunk_size",
    "continuous_batching_config", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
    "assistant_ensemble_weight", "max_matching_ngram_size",
})  # fmt: skip

#: how each request option (`pagedq.shared.models.GenerationOptions`) is honoured on the paged engine (the
#: `generate` fallback: `generate_kwargs`); a request that sets a field missing here is refused
REQUEST_OPTIONS = {
    "max_new_tokens": "DecodeSettings.max_new_tokens (generate: max_length / max_new_tokens)",
    "do_sample": "DecodeSettings.do_sample",
    "temperature": "DecodeSettings.temperature (sampling only, as generate)",
    "top_p": "DecodeSettings.top_p (sampling only)",
    "top_k": "DecodeSettings.top_k (sampling only)",
    "seed": "DecodeSettings.seed: the request's own generator (generate: torch.manual_seed in a forked RNG)",
    "num_beams": "DecodeSettings.num_beams (beam search)",
    "stream": "the task layer: a translation is published in one piece when it finishes",
}


@dataclass(frozen=True)
class DecodeSettings:
    """Everything that decides one request's output on the paged engine, as `generate` would apply it.

    Lengths count generated tokens; `max_length` (generate's unit) adds the decoder start token."""

    max_new_tokens: int
    decoder_start_token_id: int
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # EOS-only entries dropped, as generate does
    min_length: int = 0  # generate's unit (decoder tokens, start included)
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0

    @property
    def max_length(self) -> int:
        return self.max_new_tokens + DECODER_START_TOKENS

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    @cached_property
    def sampling_params(self) -> SamplingParams:
        """What each of the request's decoder sequences samples and stops with (`decoding.step`): its
        processors (an encoder-decoder row's prefix is its decoder start token, so `cur_len` counts decoder
        tokens including it, generate's `input_ids.shape[-1]`), EOS as its stop tokens, the length limit."""
        processors = ProcessorSettings(
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            bad_words_ids=self.bad_words_ids,
            eos_token_ids=self.eos_token_ids,
            min_length=self.min_length,
            min_new_tokens=self.min_new_tokens,
            forced_bos_token_id=self.forced_bos_token_id,
            forced_eos_token_id=self.forced_eos_token_id,
        )
        sample = self.do_sample
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature if sample else 0.0,
            top_k=self.top_k if sample else 0,
            top_p=self.top_p if sample else 1.0,
            seed=self.seed if sample else None,
            stop_token_ids=self.eos_token_ids,
            processors=processors,
            num_beams=self.num_beams,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
        )


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def unknown_request_options(options: GenerationOptions) -> list[str]:
    """Options the request sets that no translation path implements (refuse the request)."""
    return sorted(set(options.model_fields_set) - REQUEST_OPTIONS.keys())


def unsupported_options(model: Any, options: GenerationOptions) -> list[str]:
    """The options (model defaults included) that the paged engine cannot apply exactly as generate does."""
    config = model.generation_config
    found = [name for name, off in UNSUPPORTED_WHEN_SET.items() if getattr(config, name, off) not in (off, None)]
    r = resolve(options, config)
    if r.do_sample and r.num_beams > 1:
        found.append("do_sample with num_beams > 1 (beam sampling)")
    forced_eos = config.forced_eos_token_id
    if forced_eos is not None and not isinstance(forced_eos, int) and len(_ids(forced_eos)) != 1:
        found.append("forced_eos_token_id with several ids")
    return found


def decode_settings(model: Any, options: GenerationOptions, forced_bos_token_id: int | None = None) -> DecodeSettings:
    """`options` over `model.generation_config` over generate's defaults (check `unsupported_options` first).

    `forced_bos_token_id` (the request's target-language token) overrides the model's default."""
    config = model.generation_config
    key = generation_key(options, "", model)
    temperature, top_k, top_p = resolve(options, config).knobs
    eos = _ids(config.eos_token_id)
    start = config.decoder_start_token_id
    if start is None:
        start = model.config.decoder_start_token_id
    if start is None:
        start = config.bos_token_id
    forced_eos = _ids(config.forced_eos_token_id)
    return DecodeSettings(
        max_new_tokens=key.max_new_tokens,
        decoder_start_token_id=int(start),
        eos_token_ids=eos,
        pad_token_id=config.pad_token_id,
        num_beams=key.num_beams,
        do_sample=key.do_sample,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        seed=options.seed,
        length_penalty=float(value(config, "length_penalty")),
        early_stopping=value(config, "early_stopping"),
        forced_bos_token_id=forced_bos_token_id if forced_bos_token_id is not None else config.forced_bos_token_id,
        forced_eos_token_id=forced_eos[0] if forced_eos else None,
        bad_words_ids=tuple(tuple(w) for w in (config.bad_words_ids or ()) if not (len(w) == 1 and w[0] in eos)),
        # generate: a set min_new_tokens replaces min_length with min_new_tokens + the decoder start token
        min_length=int(value(config, "min_length")) if config.min_new_tokens is None else config.min_new_tokens + 1,
        min_new_tokens=int(config.min_new_tokens or 0),
        no_repeat_ngram_size=int(value(config, "no_repeat_ngram_size")),
    )

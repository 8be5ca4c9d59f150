"""Generation options for `model.generate` on encoder-decoder models: grouping key, kwargs, output parsing.

Defaults come from the model's `generation_config`; a request overrides only what it sets. Requests whose
effective options are equal (`GenerationKey`) may share one `generate` call; a seeded request never shares
(its key carries its request id), so its random stream is its own.

Lengths: an encoder-decoder's decoder sequence starts with `decoder_start_token_id`, so
`max_new_tokens = N` is `max_length = N + 1`. We pass whichever of the two the model's config uses, so
transformers never sees both (it warns on every call if it does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shared.models import GenerationOptions

DEFAULT_MAX_NEW_TOKENS = 20  # transformers' default when a generation config sets no length
DECODER_START_TOKENS = 1  # the decoder_start_token_id every encoder-decoder output begins with


@dataclass(frozen=True)
class GenerationKey:
    """Effective options of one request; None means the model's default for that option."""

    max_new_tokens: int
    num_beams: int
    do_sample: bool | None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    alone: str | None = None  # the request id when it must run in a batch of its own

    @property
    def seeded(self) -> bool:
        return self.seed is not None


def default_max_new_tokens(model: Any) -> int:
    config = model.generation_config
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    if config.max_length is not None:
        return int(config.max_length) - DECODER_START_TOKENS
    return DEFAULT_MAX_NEW_TOKENS


def generation_key(options: GenerationOptions, request_id: str, model: Any) -> GenerationKey:
    """The effective options of request `request_id` on `model`."""
    max_new = options.max_new_tokens or default_max_new_tokens(model)
    positions = getattr(model.config, "max_position_embeddings", None)  # learned/sinusoidal decoder positions
    if positions is not None:
        max_new = min(max_new, positions - DECODER_START_TOKENS)
    explicit = "do_sample" in options.model_fields_set or options.do_sample
    do_sample = options.do_sample if explicit else None
    return GenerationKey(
        max_new_tokens=max_new,
        num_beams=options.num_beams or model.generation_config.num_beams or 1,
        do_sample=do_sample,
        temperature=options.temperature if do_sample else None,  # sampling knobs only matter when sampling
        top_p=options.top_p if do_sample else None,
        top_k=options.top_k if do_sample else None,
        seed=options.seed,
        alone=request_id if options.seed is not None else None,
    )


def generate_kwargs(key: GenerationKey, model: Any) -> dict[str, Any]:
    """Keyword arguments for `model.generate` that apply `key` over the model's generation_config."""
    kwargs: dict[str, Any] = {"num_beams": key.num_beams}
    if model.generation_config.max_new_tokens is not None:
        kwargs["max_new_tokens"] = key.max_new_tokens
    else:
        kwargs["max_length"] = key.max_new_tokens + DECODER_START_TOKENS
    if key.do_sample is not None:
        kwargs["do_sample"] = key.do_sample
    if key.do_sample:
        kwargs.update(temperature=key.temperature, top_p=key.top_p, top_k=key.top_k)
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

"""A request's generation options over the model's `generation_config`, resolved one way for every architecture.

Each knob a request can set (`pagedq.shared.models.GenerationOptions`) resolves as `generate` resolves a keyword
argument over the model's generation_config: the request's value if the request set it, else the
generation_config's, else generate's own default (`GenerationConfig._get_default_generation_params`, e.g. top_k 50
when sampling). `resolve` does it once per request; the causal path (`causal_options.sampling_params`) and both
encoder-decoder paths (`seq2seq_options.decode_settings`, the batched-`generate` fallback's `generation_key`)
read the same `Resolved`, so a causal LM and a translation model pick the same knobs for the same request.

The one difference between architectures is the default length (`causal_options.DEFAULT_MAX_NEW_TOKENS`): an
encoder-decoder's `max_length` counts its decoder tokens only, a causal LM's counts the prompt as well, so a
causal LM without `max_new_tokens` anywhere gets a fixed number of new tokens instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig

from pagedq.shared.models import GenerationOptions
from pagedq.worker.engine.decoding.sampling import GREEDY_BELOW_TEMPERATURE

#: generate's values for fields a generation config leaves unset
GENERATE_DEFAULTS: dict[str, Any] = GenerationConfig._get_default_generation_params()


def value(gen: Any, name: str) -> Any:
    """The generation_config's `name`, else generate's default (None where generate has none)."""
    found = getattr(gen, name, None)
    return GENERATE_DEFAULTS.get(name) if found is None else found


def pick(options: GenerationOptions, gen: Any, name: str) -> Any:
    """The request's `name` if it set it, else the generation_config's, else generate's default."""
    if name in options.model_fields_set:
        return getattr(options, name)
    return value(gen, name)


@dataclass(frozen=True)
class Resolved:
    """How one request picks tokens: sampling (with its knobs), greedy, or beam search."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    num_beams: int

    @property
    def knobs(self) -> tuple[float, int, float]:
        """(temperature, top_k, top_p) when sampling; generate's neutral values otherwise."""
        return (self.temperature, self.top_k, self.top_p) if self.do_sample else (1.0, 0, 1.0)


def resolve(options: GenerationOptions, gen: Any) -> Resolved:
    """`options` over `gen` (module docstring). A sampling temperature below `GREEDY_BELOW_TEMPERATURE` is greedy:
    what sampling at that temperature gives, without generate's NaN."""
    temperature = float(pick(options, gen, "temperature"))
    sample = bool(pick(options, gen, "do_sample")) and temperature >= GREEDY_BELOW_TEMPERATURE
    return Resolved(
        do_sample=sample,
        temperature=temperature,
        top_k=int(pick(options, gen, "top_k") or 0),
        top_p=float(pick(options, gen, "top_p")),
        num_beams=int(options.num_beams or gen.num_beams or 1),
    )

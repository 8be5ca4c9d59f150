"""A translation request's languages, as each kind of translation model expects them.

The registry (`ModelSpec.languages`) already routed the request to a model serving its pair. Within
the model, the languages become, as transformers' translation pipeline does it:

    multilingual Marian  (tokenizer.supported_language_codes)  a ">>de<<" token before the text
    T5                   (config.task_specific_params)         a "translate English to German: " prefix
    M2M100, NLLB, mBART  (tokenizer.src_lang)                  tokenizer.src_lang = source, and the
                                                               target's language token forced as the
                                                               first generated token (forced_bos)

Language codes are the model's own ("de" for M2M100, "deu_Latn" for NLLB, "de_DE" for mBART-50). A code
the model does not know is `UnsupportedLanguagePair` (a 4xx at the API), never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedq.shared.errors import InvalidRequest, UnsupportedLanguagePair
from pagedq.shared.models import TranslateRequest
from pagedq.shared.registry import ModelSpec


@dataclass(frozen=True)
class Languages:
    """How one request is tokenized and decoded: the text fed to the tokenizer, its `src_lang`, forced BOS."""

    text: str
    src_lang: str | None = None  # set on the tokenizer before tokenizing (multilingual tokenizers)
    forced_bos_token_id: int | None = None


def is_multilingual(tokenizer: Any) -> bool:
    """Tokenizers that take a source language and whose models take a forced target-language token."""
    return hasattr(tokenizer, "src_lang") and hasattr(tokenizer, "set_src_lang_special_tokens")


def language_id(tokenizer: Any, code: str) -> int | None:
    """The token id of language `code` in a multilingual tokenizer, None if it has no such language."""
    if hasattr(tokenizer, "get_lang_id"):  # M2M100: "de" -> "__de__"
        try:
            return int(tokenizer.get_lang_id(code))
        except KeyError:
            return None
    mapping = getattr(tokenizer, "lang_code_to_id", None)
    if mapping:
        found = mapping.get(code)
        return None if found is None else int(found)
    token_id = tokenizer.convert_tokens_to_ids(code)  # NLLB, mBART: the code is a special token
    return None if token_id is None or token_id == tokenizer.unk_token_id else int(token_id)


def resolve_languages(spec: ModelSpec, tokenizer: Any, config: Any, payload: TranslateRequest) -> Languages:
    """The request's text and language tokens for this model (module docstring)."""
    source, target = payload.source_lang, payload.target_lang
    if target and f">>{target}<<" in getattr(tokenizer, "supported_language_codes", ()):
        return Languages(f">>{target}<< {payload.text}")
    if not is_multilingual(tokenizer):
        params = (getattr(config, "task_specific_params", None) or {}).get(f"translation_{source}_to_{target}", {})
        return Languages(params.get("prefix", "") + payload.text)
    source, target = _complete_pair(spec, source, target)
    ids = {code: language_id(tokenizer, code) for code in (source, target)}
    unknown = [code for code, found in ids.items() if found is None]
    if unknown:
        raise UnsupportedLanguagePair(f"model {spec.name!r} has no language {' or '.join(unknown)!r}")
    return Languages(payload.text, src_lang=source, forced_bos_token_id=ids[target])


def _complete_pair(spec: ModelSpec, source: str | None, target: str | None) -> tuple[str, str]:
    """Fill a missing side from the first registered pair that matches the given one."""
    for pair in spec.languages:
        s, t = pair.split("-")
        if (source is None or source == s) and (target is None or target == t):
            source, target = source or s, target or t
            break
    if source is None or target is None:
        raise InvalidRequest(f"model {spec.name!r} is multilingual: send source_lang and target_lang")
    return source, target

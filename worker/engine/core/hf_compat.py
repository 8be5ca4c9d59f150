"""What differs between transformers 5.x releases, for the engine.

pyproject asks for transformers>=5.24 (the oldest release the test suite passes with: on 5.21-5.23 GPT-J
runs outside the attention interface and the engine refuses it at load, and the tests' references pass
`cache=`). Older 5.x releases are not supported, but the engine does not depend on the newest spelling where
that is cheap, so that a machine with an older transformers (a GPU image, say) serves the families it can:
the KV cache keyword of a model's forward -- recent releases take `cache=` (`past_key_values=` is a
deprecated alias, warned about on every call); earlier ones take only `past_key_values=`, and a `cache=`
there falls through `**kwargs` down to the attention function (which refuses it as an unknown keyword: no
layer would write its K/V). `cache_kwargs` names the cache the way this model's forward takes it.
"""

from __future__ import annotations

import inspect
from typing import Any

_KEYWORDS: dict[type[Any], str] = {}  # model class -> the keyword its forward takes the cache by


def cache_keyword(model: Any) -> str:
    """`cache` where `model`'s forward takes it by that name, else `past_key_values` (per class, read once:
    `inspect.signature` sees through transformers' decorators, which keep `__wrapped__`)."""
    cls: type[Any] = type(model)
    if cls not in _KEYWORDS:
        _KEYWORDS[cls] = "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
    return _KEYWORDS[cls]


def cache_kwargs(model: Any, kv_cache: Any) -> dict[str, Any]:
    """`{keyword: kv_cache}` for `model(...)` (module docstring)."""
    return {cache_keyword(model): kv_cache}

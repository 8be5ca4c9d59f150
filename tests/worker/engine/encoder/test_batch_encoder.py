"""`BatchEncoder`: the classifier's tokenization outside the engine thread (worker/engine/encoder/batch_encoder.py).

It must give exactly what `tokenizer(texts, truncation=False)` gives, from any number of threads at once, while
the tokenizer itself is called with other settings; and it must refuse tokenizers it cannot show equal."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from executor_support import load_demo
from transformers import AutoTokenizer

from pagedq.shared.registry import Registry
from pagedq.worker.engine.encoder.batch_encoder import PROBES, BatchEncoder
from worker.engine.tiny_tokenizer import build_tokenizer

TEXTS = [
    "I love this product.",
    "Terrible. The delivery was late and nobody answered!",
    "Prices: 3,50 € or $4.99 -- naïve café, Straße; 東京 😀",
    "[CLS] special [SEP] tokens [MASK] as text",
    "  spaces   everywhere\tand\nlines  ",
    "",
    "a long one " * 200,
]


def source(registry_path: Path, name: str = "demo-classifier") -> str:
    registry = Registry.load(registry_path)
    return str(registry.resolve_source(registry.models[name]))


def names(tokenizer: Any) -> list[str]:
    return [n for n in tokenizer.model_input_names if n != "offset_mapping"]


def expected(tokenizer: Any, texts: list[str]) -> list[dict[str, list[int]]]:
    out = tokenizer(texts, truncation=False, verbose=False)
    return [{name: out[name][i] for name in names(tokenizer)} for i in range(len(texts))]


@pytest.fixture(scope="module")
def tokenizers(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    bpe = build_tokenizer(tmp_path_factory.mktemp("bpe"))
    split = AutoTokenizer.from_pretrained(source(demo_models), split_special_tokens=True)
    return {
        "wordpiece (demo classifier)": load_demo(demo_models, "demo-classifier").tokenizer,
        "wordpiece, split special tokens": split,
        "byte-level BPE": bpe,
    }


@pytest.mark.parametrize("kind", ["wordpiece (demo classifier)", "wordpiece, split special tokens", "byte-level BPE"])
def test_it_encodes_exactly_what_the_tokenizer_gives(tokenizers: dict[str, Any], kind: str) -> None:
    tokenizer = tokenizers[kind]
    encoder = BatchEncoder.for_tokenizer(tokenizer, names(tokenizer))
    assert encoder is not None
    assert encoder.encode(TEXTS) == expected(tokenizer, TEXTS)
    assert encoder.encode(list(PROBES)) == expected(tokenizer, list(PROBES))


def test_split_special_tokens_is_followed(tokenizers: dict[str, Any]) -> None:
    plain, split = tokenizers["wordpiece (demo classifier)"], tokenizers["wordpiece, split special tokens"]
    text = ["[MASK]"]
    a = BatchEncoder.for_tokenizer(plain, names(plain))
    b = BatchEncoder.for_tokenizer(split, names(split))
    assert a is not None and b is not None
    assert a.encode(text)[0]["input_ids"] != b.encode(text)[0]["input_ids"]  # one token vs its characters


def test_threads_encode_at_once_while_the_tokenizer_truncates_elsewhere(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["wordpiece (demo classifier)"]
    encoder = BatchEncoder.for_tokenizer(tokenizer, names(tokenizer))
    assert encoder is not None
    batches = [[f"{t} number {i}" for t in TEXTS] for i in range(8)]
    want = [expected(tokenizer, b) for b in batches]
    errors: list[BaseException] = []
    stop = threading.Event()

    def encode(i: int) -> None:
        try:
            for _ in range(30):
                assert encoder.encode(batches[i]) == want[i]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def truncate() -> None:  # what the engine thread does for a too-long text: it rewrites the tokenizer's state
        while not stop.is_set():
            assert len(tokenizer(TEXTS, truncation=True, max_length=5)["input_ids"][1]) == 5

    other = threading.Thread(target=truncate)
    other.start()
    threads = [threading.Thread(target=encode, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    other.join()
    assert not errors, errors[0]


def test_tokenizers_it_cannot_show_equal_are_refused(demo_models: Path) -> None:
    marian = load_demo(demo_models, "demo-translator").tokenizer  # SentencePiece in Python, source/target modes
    assert BatchEncoder.for_tokenizer(marian, names(marian)) is None
    classifier = load_demo(demo_models, "demo-classifier").tokenizer
    assert BatchEncoder.for_tokenizer(classifier, ["input_ids", "pixel_values"]) is None

    class Uppercasing(type(classifier)):  # type: ignore[misc]
        def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
            return super().__call__([t.upper() for t in text], *args, **kwargs)

    custom = Uppercasing.from_pretrained(source(demo_models))
    assert BatchEncoder.for_tokenizer(custom, names(custom)) is None

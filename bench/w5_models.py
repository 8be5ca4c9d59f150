"""W5's realistic model mix: real architectures at the sizes users deploy, random weights, built offline once.

`build_realistic_models(out_dir)` saves three models with `save_pretrained` plus the demo's offline tokenizers
(`pagedq.worker.demo.tokenizers`) and writes `out_dir/registry.toml`, so that a worker loads them from disk with
`from_pretrained` exactly as it loads any model:

| name          | architecture                         | shape                                    | params |
|---------------|--------------------------------------|------------------------------------------|--------|
| w5-classifier | DistilBertForSequenceClassification  | distilbert-base: 6 x 768, 12 heads, 3072 | 44M    |
| w5-translator | MarianMTModel en->de                 | opus-mt-en-de: 6+6 x 512, 8 heads, 2048  | 74M    |
|               |                                      | vocab 58101                              |        |
| w5-qa         | DistilBertForQuestionAnswering       | distilbert-base (as w5-classifier)       | 43M    |

Their outputs are meaningless; what matters is the compute of each request. The encoders' vocabulary is the
demo WordPiece's 596 tokens, not distilbert-base's 30,522 (hence 44M parameters, not 66M: the missing 22M are
embedding rows, a lookup, not FLOPs). The classifier has 2 labels. The last linear of each task head is
initialised wider than BERT's 0.02 so that scores and spans differ between inputs and "equal within 1e-4" is
a real check.

The translator computes logits over OPUS-MT en-de's 58,101 ids (the LM head is more than half of a decoder
step's FLOPs at this size); the demo SentencePiece tokenizer names only the first 1,272 of them, so a
`final_logits_bias` of -1e4 keeps the others out of every output, and texts decode. </s> gets the same bias:
a random-weight model stops at once or never, so every translation runs to its request's `max_new_tokens`
(then `forced_eos_token_id` ends it), as in W4 -- the benchmark sets `max_new_tokens` per request. Its
generation config is OPUS-MT's (pad = decoder start, pad banned, forced EOS, max_length 512, greedy).

Invariants: deterministic (fixed seeds) and idempotent -- a complete build is marked by `BUILD_MARKER` holding
`VERSION`, written last; a directory with that marker is returned as is. Bump `VERSION` when what is built
changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    DistilBertConfig,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertTokenizer,
    GenerationConfig,
    MarianConfig,
    MarianMTModel,
)

from pagedq.worker.demo import tokenizers as toks
from pagedq.worker.demo.models import ModelSet

VERSION = "1"
BUILD_MARKER = ".w5-models-complete"
LOCK_FILE = ".w5-models-lock"
SEED = 1234
MAX_POSITIONS = 512
HEAD_INIT_STD = 0.25  # the last linear of each task head: scores and spans differ visibly between inputs
TRANSLATOR_VOCAB = 58101  # Helsinki-NLP/opus-mt-en-de
MASKED_LOGIT = -1.0e4  # final_logits_bias of </s> and of the ids the demo tokenizer cannot decode
LABELS = ("NEGATIVE", "POSITIVE")

_DISTILBERT_BASE: dict[str, Any] = dict(
    max_position_embeddings=MAX_POSITIONS, dim=768, n_layers=6, n_heads=12, hidden_dim=3072
)


def _build_classifier(out: Path) -> dict[str, Any]:
    tokenizer = toks.build_wordpiece(DistilBertTokenizer, out)
    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
        **_DISTILBERT_BASE,
    )
    model = DistilBertForSequenceClassification(config)
    torch.nn.init.normal_(model.classifier.weight, std=HEAD_INIT_STD)
    model.save_pretrained(out)
    return {"task": "classify"}


def _build_qa(out: Path) -> dict[str, Any]:
    tokenizer = toks.build_wordpiece(DistilBertTokenizer, out)
    model = DistilBertForQuestionAnswering(DistilBertConfig(vocab_size=len(tokenizer), **_DISTILBERT_BASE))
    torch.nn.init.normal_(model.qa_outputs.weight, std=HEAD_INIT_STD)
    model.save_pretrained(out)
    return {"task": "qa", "mode": "extractive"}


def _build_translator(out: Path) -> dict[str, Any]:
    _, vocab = toks.build_marian(out, SEED)
    pad, eos = vocab["<pad>"], vocab["</s>"]
    config = MarianConfig(
        vocab_size=TRANSLATOR_VOCAB, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
        pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad, forced_eos_token_id=eos,
    )  # fmt: skip
    model = MarianMTModel(config)
    with torch.no_grad():
        model.final_logits_bias[0, len(vocab) :] = MASKED_LOGIT  # ids the tokenizer cannot decode
        model.final_logits_bias[0, eos] = MASKED_LOGIT  # lengths come from each request's max_new_tokens
    model.generation_config = GenerationConfig(
        decoder_start_token_id=pad, pad_token_id=pad, eos_token_id=eos, forced_eos_token_id=eos,
        bad_words_ids=[[pad]], max_length=512, num_beams=1,
    )  # fmt: skip
    model.save_pretrained(out)
    return {"task": "translate", "languages": ["en-de"]}


BUILDERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "w5-classifier": _build_classifier,
    "w5-translator": _build_translator,
    "w5-qa": _build_qa,
}
DEFAULTS = {"classify": "w5-classifier", "translate": "w5-translator", "qa": "w5-qa"}


W5_MODELS = ModelSet(BUILDERS, DEFAULTS, VERSION, BUILD_MARKER, LOCK_FILE,
                     "Random-weight W5 models written by bench/w5_models.py: their outputs are meaningless.")


def build_realistic_models(out_dir: Path) -> Path:
    """Build (once) the models into `out_dir`; return the path of its `registry.toml` (file-locked, so two
    processes building at once get one build)."""
    return W5_MODELS.build(out_dir)

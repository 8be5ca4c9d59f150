"""Tiny random-weight demo models for tests, demos and local development (no hub, no network).

`build_demo_models(out_dir)` saves five real transformers architectures with RANDOM weights -- their
outputs are meaningless -- plus offline tokenizers (`pagedq.worker.demo.tokenizers`), and writes
`out_dir/registry.toml` (format: `pagedq.shared.registry`) with relative `source = "./<name>"` paths:

| name            | architecture                                      | task      | tokenizer             |
|-----------------|---------------------------------------------------|-----------|-----------------------|
| demo-classifier | BertForSequenceClassification, 3 labels            | classify  | WordPiece (uncased)   |
| demo-multilabel | DistilBertForSequenceClassification, 4, multi-label | classify  | WordPiece (uncased)   |
| demo-qa         | BertForQuestionAnswering (extractive)              | qa        | WordPiece (uncased)   |
| demo-translator | MarianMTModel en->de                               | translate | SentencePiece x2      |
| demo-llm        | LlamaForCausalLM, grouped-query attention          | qa (gen.) | byte-level BPE        |

Encoders take 512 tokens, the Llama 2048; each model is well under a million parameters, so all five
build in a few seconds on two CPU cores. Initialisation is widened where a realistic demo needs it (see
the constants below): scores differ between inputs and translations end at varied lengths.

Invariants: the build is deterministic (fixed seeds) and idempotent -- a complete build is marked by
`BUILD_MARKER` holding `DEMO_MODELS_VERSION`, written last; a directory with that marker is returned as is.
Bump the version whenever what is built changes.

CLI: `python -m pagedq.worker.demo.models OUT_DIR` prints the registry path.
"""

from __future__ import annotations

import fcntl
import json
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertTokenizer,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
)
from transformers.utils import logging as hf_logging

from pagedq.worker.demo import tokenizers as toks

log = logging.getLogger(__name__)

DEMO_MODELS_VERSION = "4"
BUILD_MARKER = ".demo-models-complete"
LOCK_FILE = ".demo-models-lock"
REGISTRY_FILE = "registry.toml"
SEED = 1234
MAX_POSITIONS = 512
LLM_MAX_POSITIONS = 2048
DEMO_MAX_NEW_TOKENS = 32  # keeps random-weight generation (which rarely emits EOS) short
SENTIMENT_LABELS = ("negative", "neutral", "positive")
TOPIC_LABELS = ("business", "politics", "sports", "technology")
LLM_PROMPT = "Answer the question using the context.\nContext: {context}\nQuestion: {question}\nAnswer:"

# Encoders and task heads are initialised wider than BERT's 0.02 so that scores and spans differ visibly
# between inputs (near-uniform scores would make "equals the pipeline within 1e-4" a weak check).
ENCODER_INIT_STD = 0.1
HEAD_INIT_STD = 0.25
# The translator: a wider init plus a bias towards </s> make its outputs depend on the input and end at
# varied lengths (some stop early, some run to the limit), as real translations do. Tuned by measurement.
TRANSLATOR_INIT_STD = 0.1
TRANSLATOR_EOS_BIAS = 3.0

# Shared shape of the tiny encoders: a few hundred thousand parameters each.
_BERT_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    initializer_range=ENCODER_INIT_STD,
)


def _labels(names: tuple[str, ...]) -> dict[str, Any]:
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def _widen(*heads: torch.nn.Linear) -> None:
    for head in heads:
        torch.nn.init.normal_(head.weight, std=HEAD_INIT_STD)


def _build_classifier(out: Path) -> dict[str, Any]:
    tokenizer = toks.build_wordpiece(BertTokenizer, out)
    config = BertConfig(
        vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS, **_BERT_SHAPE, **_labels(SENTIMENT_LABELS)
    )
    model = BertForSequenceClassification(config)
    _widen(model.classifier)
    model.save_pretrained(out)
    return {"task": "classify"}


def _build_multilabel(out: Path) -> dict[str, Any]:
    tokenizer = toks.build_wordpiece(DistilBertTokenizer, out)
    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        dim=64,
        n_layers=2,
        n_heads=4,
        hidden_dim=128,
        initializer_range=ENCODER_INIT_STD,
        problem_type="multi_label_classification",
        **_labels(TOPIC_LABELS),
    )
    model = DistilBertForSequenceClassification(config)
    _widen(model.pre_classifier, model.classifier)
    model.save_pretrained(out)
    return {"task": "classify"}


def _build_qa(out: Path) -> dict[str, Any]:
    tokenizer = toks.build_wordpiece(BertTokenizer, out)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS, **_BERT_SHAPE)
    model = BertForQuestionAnswering(config)
    _widen(model.qa_outputs)
    model.save_pretrained(out)
    return {"task": "qa", "mode": "extractive"}


def _build_translator(out: Path) -> dict[str, Any]:
    _, vocab = toks.build_marian(out, SEED)
    pad, eos = vocab["<pad>"], vocab["</s>"]
    config = MarianConfig(
        vocab_size=len(vocab),
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=pad,  # as in every OPUS-MT checkpoint
        forced_eos_token_id=eos,
        init_std=TRANSLATOR_INIT_STD,
    )
    model = MarianMTModel(config)
    with torch.no_grad():
        model.final_logits_bias[0, eos] = TRANSLATOR_EOS_BIAS
    model.generation_config = GenerationConfig(
        decoder_start_token_id=pad,
        pad_token_id=pad,
        eos_token_id=eos,
        forced_eos_token_id=eos,
        bad_words_ids=[[pad]],
        max_length=DEMO_MAX_NEW_TOKENS + 1,  # decoder length, counting the start token
        num_beams=1,
    )
    model.save_pretrained(out)
    return {"task": "translate", "languages": ["en-de"]}


def _build_llm(out: Path) -> dict[str, Any]:
    tokenizer = toks.build_byte_level_bpe(out, SEED)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in current Llama checkpoints
        max_position_embeddings=LLM_MAX_POSITIONS,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, max_new_tokens=DEMO_MAX_NEW_TOKENS
    )
    model.save_pretrained(out)
    return {"task": "qa", "mode": "generative", "architecture": "causal-lm", "prompt_template": LLM_PROMPT}


BUILDERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "demo-classifier": _build_classifier,
    "demo-multilabel": _build_multilabel,
    "demo-qa": _build_qa,
    "demo-translator": _build_translator,
    "demo-llm": _build_llm,
}
DEFAULTS = {"classify": "demo-classifier", "translate": "demo-translator", "qa": "demo-qa"}


def _toml_value(value: Any) -> str:
    # JSON strings and lists of strings are valid TOML basic strings / arrays.
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class ModelSet:
    """A directory of random-weight models built from `builders` (name -> build(dir) -> registry fields), with
    its registry. Built once: a complete build ends with `marker` holding `version`, written last."""

    builders: dict[str, Callable[[Path], dict[str, Any]]]
    defaults: dict[str, str]
    version: str
    marker: str
    lock: str
    header: str  # the registry's first comment line

    def build(self, out_dir: Path) -> Path:
        """Build (once) into `out_dir`; return the path of its `registry.toml`.

        Safe to call from several processes at once: builders queue on a file lock, and whoever comes second
        finds the complete build and returns it.
        """
        out_dir = Path(out_dir)
        registry = out_dir / REGISTRY_FILE
        if self._is_complete(out_dir):
            return registry
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / self.lock, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if self._is_complete(out_dir):
                return registry
            log.info("Building random-weight models in %s (their outputs are meaningless)", out_dir)
            (out_dir / self.marker).unlink(missing_ok=True)
            registry.write_text(self._registry_toml(self._build_all(out_dir)), encoding="utf-8")
            (out_dir / self.marker).write_text(self.version)
        return registry

    def _is_complete(self, out_dir: Path) -> bool:
        marker = out_dir / self.marker
        return marker.is_file() and marker.read_text().strip() == self.version and (out_dir / REGISTRY_FILE).is_file()

    def _build_all(self, out_dir: Path) -> dict[str, dict[str, Any]]:
        """Every model of `builders`, each from the same seed; returns the registry entries."""
        entries = {}
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # "Writing model shards" bars for kilobyte files are noise
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' advisories about random-weight configs
                for name, build in self.builders.items():
                    torch.manual_seed(SEED)
                    entries[name] = {"source": f"./{name}", **build(out_dir / name), "dtype": "float32"}
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        return entries

    def _registry_toml(self, entries: dict[str, dict[str, Any]]) -> str:
        lines = [f"# {self.header}", ""]
        lines += ["[defaults]", *(f"{task} = {_toml_value(name)}" for task, name in self.defaults.items()), ""]
        for name, fields in entries.items():
            lines.append(f"[models.{name}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in fields.items()]
            lines.append("")
        return "\n".join(lines)


DEMO_MODELS = ModelSet(BUILDERS, DEFAULTS, DEMO_MODELS_VERSION, BUILD_MARKER, LOCK_FILE,
                       "Random-weight demo models written by worker.demo_models: their outputs are meaningless.")


def build_demo_models(out_dir: Path) -> Path:
    """Build (once) the demo models into `out_dir`; return the path of its `registry.toml`."""
    return DEMO_MODELS.build(out_dir)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m pagedq.worker.demo.models OUT_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    print(build_demo_models(Path(argv[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

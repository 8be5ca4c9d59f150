"""Offline tokenizers for the demo models, built from `pagedq.worker.demo.corpus` (no hub, no network).

Each builder saves a tokenizer into a directory with `save_pretrained`, so that
`AutoTokenizer.from_pretrained(dir)` (next to the model's config.json) loads the intended class:

- `build_wordpiece` -- uncased BERT WordPiece ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, then every printable
  ASCII character, its `##` continuation, then whole words). A fast tokenizer, so `offset_mapping` works.
- `build_marian` -- the files `MarianTokenizer` reads: `source.spm` / `target.spm` (SentencePiece unigram
  models trained here on English / German sentences) and one shared `vocab.json` with `</s>`=0, `<unk>`=1
  and `<pad>` last, as in the OPUS-MT checkpoints.
- `build_byte_level_bpe` -- a GPT-2/Llama-3 style byte-level BPE with `<s>` prepended, loaded as a plain
  `TokenizersBackend` (the class that `PreTrainedTokenizerFast` names in transformers 5).

Invariant: the same corpus seed gives byte-identical vocabularies.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import MarianTokenizer, PreTrainedTokenizerFast

from pagedq.worker.demo.corpus import (
    ENGLISH_WORDS,
    GERMAN_WORDS,
    LATIN_LETTERS,
    printable_characters,
    synthetic_sentences,
)

MODEL_MAX_LENGTH = 512  # encoder models: the usual BERT / OPUS-MT limit
LLM_MAX_LENGTH = 2048
CORPUS_SENTENCES = 3000
SPM_VOCAB_SIZE = 1000  # a soft limit (hard_vocab_limit=False): the corpus is small
BPE_VOCAB_SIZE = 2000
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
LLM_SPECIALS = ("<s>", "</s>", "<pad>")


def build_wordpiece(tokenizer_cls: Any, out_dir: Path) -> Any:
    """Save an uncased WordPiece tokenizer of class `tokenizer_cls` (BertTokenizer or a subclass)."""
    chars = printable_characters()
    tokens = [*BERT_SPECIALS, *chars, *(f"##{c}" for c in chars), *(w.lower() for w in ENGLISH_WORDS)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = tokenizer_cls(vocab=vocab, do_lower_case=True, model_max_length=MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _train_sentencepiece(words: tuple[str, ...], seed: int) -> bytes:
    """A serialized SentencePiece unigram model trained on sentences drawn from `words`."""
    sentences = synthetic_sentences(words, CORPUS_SENTENCES, seed)
    sentences.append(" ".join([*printable_characters(), *LATIN_LETTERS]))  # every character gets a piece
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=proto,
        vocab_size=SPM_VOCAB_SIZE,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,  # the trainer is chatty on stderr otherwise
        num_threads=1,  # deterministic piece scores
    )
    return proto.getvalue()


def build_marian(out_dir: Path, seed: int) -> tuple[Any, dict[str, int]]:
    """Save an en->de MarianTokenizer; returns it and its vocabulary (token -> id)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pieces: list[str] = []
    for name, words, offset in (("source.spm", ENGLISH_WORDS, 0), ("target.spm", GERMAN_WORDS, 1)):
        blob = _train_sentencepiece(words, seed + offset)
        (out_dir / name).write_bytes(blob)
        processor = spm.SentencePieceProcessor(model_proto=blob)
        pieces += [processor.IdToPiece(i) for i in range(processor.GetPieceSize())]
    tokens = ["</s>", "<unk>", *(p for p in pieces if p not in ("<unk>", "</s>", "<pad>")), "<pad>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        tokenizer = MarianTokenizer(
            source_spm=str(out_dir / "source.spm"),
            target_spm=str(out_dir / "target.spm"),
            vocab=str(out_dir / "vocab.json"),
            source_lang="en",
            target_lang="de",
            model_max_length=MODEL_MAX_LENGTH,
        )
    tokenizer.save_pretrained(out_dir)
    return tokenizer, vocab


def build_byte_level_bpe(out_dir: Path, seed: int) -> Any:
    """Save a byte-level BPE tokenizer that prepends `<s>` (like Llama 3); `<pad>` is its own token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=list(LLM_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(synthetic_sentences(ENGLISH_WORDS, CORPUS_SENTENCES, seed), trainer=trainer)
    bos = LLM_SPECIALS[0]
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=LLM_SPECIALS[0],
        eos_token=LLM_SPECIALS[1],
        pad_token=LLM_SPECIALS[2],
        model_max_length=LLM_MAX_LENGTH,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer

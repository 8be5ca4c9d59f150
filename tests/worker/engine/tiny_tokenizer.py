"""An offline byte-level BPE tokenizer (GPT-2 style, `<s>` prepended), saved and reloaded like a real one.

Byte-level, so `decode(encode(text)) == text` for any text (newlines included: stop strings work).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIALS = ("<s>", "</s>", "<pad>")
CORPUS = [
    "Context: Ada Lovelace wrote the first program for the Analytical Engine in 1843.",
    "Question: Who wrote the first program?\nAnswer: Ada Lovelace.",
    "Translate from en to de:\nThe cat sleeps on the warm mat.\nDie Katze schläft auf der warmen Matte.",
    "The quick brown fox jumps over the lazy dog while the engine schedules every request.",
    "Paged attention keeps key and value blocks in a pool shared by all running requests.",
] * 20


def build_tokenizer(out_dir: Path, vocab_size: int = 400, model_max_length: int = 256) -> Any:
    """Train, save with `save_pretrained`, and reload with `AutoTokenizer.from_pretrained`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    wrapped.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)

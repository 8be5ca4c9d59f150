"""Tiny random-weight encoder-decoder models for the seq2seq engine tests, and `generate` references.

Each builder makes a real transformers architecture (2+2 layers, d_model 64) from a config, with an EOS
bias tuned by measurement so that greedy outputs end at varied lengths: some stop on EOS, some run to
the limit (random weights otherwise emit EOS at once or never). K and V projections get small random biases
(transformers initialises biases to zero; trained checkpoints have them, and the engine's cross-attention
handles K and V biases itself; larger ones would undo the EOS tuning). The reference is always a deep
copy of the model taken before the engine switches its attention implementation.

`build_pair(..., sharp=True)` scales every attention's query and key projections (or T5's relative bias)
so that scores reach tens, as in trained models: random weights attend almost uniformly, which hides
errors in which key a row attends to (`attention_sharpness` measures it).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BlenderbotConfig,
    BlenderbotForConditionalGeneration,
    BlenderbotSmallConfig,
    BlenderbotSmallForConditionalGeneration,
    FSMTConfig,
    FSMTForConditionalGeneration,
    GenerationConfig,
    LongT5Config,
    LongT5ForConditionalGeneration,
    M2M100Config,
    M2M100ForConditionalGeneration,
    MarianConfig,
    MarianMTModel,
    MBartConfig,
    MBartForConditionalGeneration,
    MT5Config,
    MT5ForConditionalGeneration,
    PegasusConfig,
    PegasusForConditionalGeneration,
    PLBartConfig,
    PLBartForConditionalGeneration,
    ProphetNetConfig,
    ProphetNetForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    UMT5Config,
    UMT5ForConditionalGeneration,
)

from pagedq.shared.models import GenerationOptions
from pagedq.worker.engine.decoding.seq2seq_options import decode_settings

VOCAB = 96
PAD, EOS, START = 0, 1, 2
FIRST_WORD = 4  # ids below are special
MAX_NEW_TOKENS = 20
ATTENTION_PROJECTIONS = ("k_proj", "v_proj")  # T5 has no biases
_LAYERS = dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4)
_SHAPE = dict(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, **_LAYERS)
_IDS = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=START)


@dataclass
class Pair:
    """The engine's model and an untouched copy for `generate`."""

    model: Any
    reference: Any

    def generate(self, encoder_ids: list[int], **kwargs: Any) -> list[int]:
        """Generated tokens of one request, decoder start removed (a batch of one is never padded)."""
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.reference.generate(torch.tensor([encoder_ids]), **kwargs)[0, 1:].tolist()


def _marian() -> Any:
    model = MarianMTModel(MarianConfig(init_std=0.1, **_SHAPE, **_IDS))
    model.final_logits_bias[0, EOS] = 1.8
    return model


def _bart() -> Any:
    config = BartConfig(
        init_std=0.1, bos_token_id=3, forced_bos_token_id=None, forced_eos_token_id=None, **_SHAPE, **_IDS
    )
    model = BartForConditionalGeneration(config)
    model.final_logits_bias[0, EOS] = 2.75
    return model


def _mbart() -> Any:
    model = MBartForConditionalGeneration(MBartConfig(init_std=0.1, forced_eos_token_id=None, **_SHAPE, **_IDS))
    model.final_logits_bias[0, EOS] = 3.5
    return model


def _m2m100() -> Any:
    model = M2M100ForConditionalGeneration(M2M100Config(init_std=0.2, **_SHAPE, **_IDS))
    model.lm_head.weight[EOS] *= 3.0  # no logits bias in M2M100: a longer EOS row (tied to the embedding)
    return model


def _t5() -> Any:
    config = T5Config(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, initializer_factor=4.0, tie_word_embeddings=False, **_IDS,
    )  # fmt: skip
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight[EOS] *= 2.0  # no logits bias in T5: a longer EOS row
    return model


def _t5_narrow() -> Any:
    """T5 whose attention is narrower than d_model (heads * d_kv = 36 < 64), as in mT5-small (6 x 64 < 512)."""
    config = T5Config(
        d_model=64, d_kv=12, d_ff=128, num_layers=2, num_heads=3, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, tie_word_embeddings=False, **_IDS,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


_T5_SHAPE = dict(
    d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=20, tie_word_embeddings=False,
)  # fmt: skip


def _family(config_class: Any, model_class: Any, **fields: Any) -> Callable[[], Any]:
    return lambda: model_class(config_class(**fields, **_IDS))


def _nllb() -> Any:
    """M2M100 as NLLB configures it (scaled embeddings, relu, layer drop off)."""
    config = M2M100Config(init_std=0.2, scale_embedding=True, activation_function="relu", **_SHAPE, **_IDS)
    return M2M100ForConditionalGeneration(config)


BUILDERS: dict[str, Callable[[], Any]] = {
    "marian": _marian,
    "bart": _bart,
    "mbart": _mbart,
    "t5": _t5,
    "m2m100": _m2m100,
    "t5_narrow": _t5_narrow,
    # the families of tests/worker/engine/seq2seq/test_seq2seq_families.py
    "nllb": _nllb,
    "pegasus": _family(PegasusConfig, PegasusForConditionalGeneration, init_std=0.1, **_SHAPE),
    "blenderbot": _family(BlenderbotConfig, BlenderbotForConditionalGeneration, init_std=0.1, **_SHAPE),
    "blenderbot_small": _family(BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration, init_std=0.1, **_SHAPE),
    "plbart": _family(PLBartConfig, PLBartForConditionalGeneration, init_std=0.1, **_SHAPE),
    "mt5": _family(MT5Config, MT5ForConditionalGeneration, **_T5_SHAPE),
    "umt5": _family(UMT5Config, UMT5ForConditionalGeneration, **_T5_SHAPE),
    "longt5": _family(LongT5Config, LongT5ForConditionalGeneration, **_T5_SHAPE),
    "prophetnet": lambda: ProphetNetForConditionalGeneration(
        ProphetNetConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            num_encoder_layers=2,
            num_decoder_layers=2,
            num_encoder_attention_heads=4,
            num_decoder_attention_heads=4,
            max_position_embeddings=64,
            ngram=2,
            pad_token_id=PAD,
            eos_token_id=EOS,
            decoder_start_token_id=START,
        )
    ),  # fmt: skip
    "fsmt": lambda: FSMTForConditionalGeneration(
        FSMTConfig(
            langs=["en", "de"],
            src_vocab_size=VOCAB,
            tgt_vocab_size=VOCAB,
            init_std=0.1,
            tie_word_embeddings=False,
            **_SHAPE,
            pad_token_id=PAD,
            eos_token_id=EOS,
            decoder_start_token_id=START,
        )
    ),  # fmt: skip
}

SHARPEN = 4.0  # query and key scale: scores x16, from ~1 to tens in the 64-wide test models


def sharpen(model: Any, factor: float = SHARPEN) -> None:
    """Scale every attention's query and key projections by `factor` (T5 family: the relative bias tables
    by `factor ** 2`), so attention scores reach tens."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "q", "k", "query_proj", "key_proj") and isinstance(module, torch.nn.Linear):
            module.weight.mul_(factor)
            if module.bias is not None:
                module.bias.mul_(factor)
        elif leaf == "relative_attention_bias":
            module.weight.mul_(factor**2)


def attention_sharpness(model: Any, encoder_ids: list[int], decoder_ids: list[int]) -> dict[str, float]:
    """Per kind of attention (encoder, decoder, cross): the median over rows of the largest attention
    probability, from an eager copy of `model` (1 / keys when uniform)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(
            input_ids=torch.tensor([encoder_ids]), decoder_input_ids=torch.tensor([decoder_ids]),
            output_attentions=True,
        )  # fmt: skip
    kinds = {"encoder": out.encoder_attentions, "decoder": out.decoder_attentions, "cross": out.cross_attentions}
    return {kind: float(torch.cat([a.amax(-1).flatten() for a in maps]).median()) for kind, maps in kinds.items()}


def build_pair(name: str, seed: int = 0, sharp: bool = False, **generation: Any) -> Pair:
    """A random-weight model (eval, fp32) with a generation config like real checkpoints have; `sharp`:
    attention scores in the tens (`sharpen`)."""
    torch.manual_seed(seed)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BUILDERS[name]().eval()
        for module_name, module in model.named_modules():
            if module_name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS and module.bias is not None:
                module.bias.normal_(0.0, 0.05)
        if sharp:
            sharpen(model)
    defaults = dict(decoder_start_token_id=START, pad_token_id=PAD, eos_token_id=EOS, max_length=MAX_NEW_TOKENS + 1)
    model.generation_config = GenerationConfig(**{**defaults, **generation})
    return Pair(model, copy.deepcopy(model))


def teacher_forced_logits(engine: Any, inputs: list[list[int]], teacher: list[list[int]]) -> list[torch.Tensor]:
    """The engine's fp32 logits [steps, vocab] for each input while its decoder is fed `teacher[i]` (greedy
    settings, `len(teacher[i])` steps; the picks are replaced by the teacher's tokens)."""
    logits: dict[str, list[torch.Tensor]] = {}
    forced = {f"teacher-{i}": tokens for i, tokens in enumerate(teacher)}

    def observe(requests: Any, rows: torch.Tensor) -> None:
        row = 0
        for request in requests:
            logits.setdefault(request.request_id, []).append(rows[row].float())
            row += len(request.sequences)

    def pick(_rows: torch.Tensor, sequences: Any) -> list[int]:
        return [forced[seq.seq_id.split("#")[0]][len(seq.output_token_ids)] for seq in sequences]

    sampler = engine.decoding.sampler
    engine.observe_logits, engine.decoding.sampler = observe, pick
    try:
        for (rid, tokens), ids in zip(forced.items(), inputs, strict=True):
            options = GenerationOptions(max_new_tokens=len(tokens))
            engine.add_request(rid, ids, decode_settings(engine.model, options))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.observe_logits, engine.decoding.sampler = None, sampler
    return [torch.stack(logits[rid]) for rid in forced]


def random_inputs(n: int, lengths: tuple[int, int] = (3, 40), seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=gen).tolist()
    return [torch.randint(FIRST_WORD, VOCAB, (k,), generator=gen).tolist() + [EOS] for k in lens]

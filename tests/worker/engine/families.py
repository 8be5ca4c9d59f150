"""Tiny random causal LMs of the families users commonly serve (2 layers, hidden 64), with sharp attention.

Random tiny models attend almost uniformly (scores ~0.1), which hides soft-capping, sinks and scaling
errors; `sharpen` scales each attention's query and key so the largest score of a forward is about
`SHARP_SCORE`, and `max_attention_score` measures it (run with an attention function that records).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import transformers as tf
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from worker.engine.helpers import BUILDERS, COMMON, TinyModel

SHARP_SCORE = 30.0  # target max |q.k * scaling| after `sharpen`
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, **COMMON)  # fmt: skip


def _rope_llama_like(cls: str, config_cls: str, **extra: Any) -> Callable[[], Any]:
    return lambda: getattr(tf, cls)(getattr(tf, config_cls)(**{**_SMALL, **extra}))


FAMILY_BUILDERS: dict[str, Callable[[], Any]] = {
    **BUILDERS,  # llama, qwen2, mistral, gpt2: sharpened here (test_greedy_equivalence runs them as built)
    "gemma": _rope_llama_like("GemmaForCausalLM", "GemmaConfig", head_dim=16),
    # Layer 0 sliding (window 6), layer 1 full; logits soft-capped at 30, attention scores at 50.
    "gemma2": _rope_llama_like(
        "Gemma2ForCausalLM",
        "Gemma2Config",
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=6,
        attn_logit_softcapping=20.0,
    ),
    "gemma3": _rope_llama_like(
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi": _rope_llama_like("PhiForCausalLM", "PhiConfig"),
    "phi3": _rope_llama_like("Phi3ForCausalLM", "Phi3Config"),
    "qwen3": _rope_llama_like("Qwen3ForCausalLM", "Qwen3Config", head_dim=16),
    "olmo": _rope_llama_like("OlmoForCausalLM", "OlmoConfig"),
    "olmo2": _rope_llama_like("Olmo2ForCausalLM", "Olmo2Config"),
    "cohere": _rope_llama_like("CohereForCausalLM", "CohereConfig", use_qk_norm=True),
    "granite": _rope_llama_like(
        "GraniteForCausalLM",
        "GraniteConfig",
        attention_multiplier=0.3,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        logits_scaling=2.0,
    ),
    "smollm3": _rope_llama_like("SmolLM3ForCausalLM", "SmolLM3Config", no_rope_layers=[1, 0]),
    # Sinks on every layer; layer 0 sliding (window 6); a mixture of 4 experts, 2 per token.
    "gpt_oss": _rope_llama_like(
        "GptOssForCausalLM",
        "GptOssConfig",
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # Static YaRN scaling from position 32: the self-check probes one request past it.
    "llama_yarn": _rope_llama_like(
        "LlamaForCausalLM",
        "LlamaConfig",
        rope_parameters={
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 10000.0,
        },
    ),  # fmt: skip
    # Refused: LongRoPE picks short or long factors from the step's longest position (switch at 32).
    "phi3_longrope": _rope_llama_like(
        "Phi3ForCausalLM",
        "Phi3Config",
        original_max_position_embeddings=32,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 8,
            "long_factor": [4.0] * 8,
            "original_max_position_embeddings": 32,
        },
    ),  # fmt: skip
    # Refused: not on transformers' attention interface (their own attention code).
    "stablelm": _rope_llama_like("StableLmForCausalLM", "StableLmConfig"),
    "falcon": lambda: tf.FalconForCausalLM(
        tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **COMMON)
    ),
    "opt": lambda: tf.OPTForCausalLM(
        tf.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
            **COMMON,
        )  # fmt: skip
    ),
    "gptj": lambda: tf.GPTJForCausalLM(
        tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256, **COMMON)
    ),  # fmt: skip
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(
        tf.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            **COMMON,
        )  # fmt: skip
    ),
}

# Fused projections: (module name, how many equal parts, which parts are q and k). GPT-NeoX and Falcon
# interleave q/k/v per head, so their fused weight is scaled per head slice.
_Q_NAMES = ("q_proj", "query", "q_norm", "q_layernorm")
_K_NAMES = ("k_proj", "key", "k_norm", "k_layernorm")


def _scale_norm(norm: torch.nn.Module, factor: float) -> None:
    """Multiply what a norm layer outputs by `factor` (Gemma-style norms multiply by 1 + weight)."""
    x = torch.randn(3, *norm.weight.shape)
    before = norm(x)
    saved = norm.weight.detach().clone()
    norm.weight.data.zero_()
    one_plus = bool(norm(x).abs().sum() > 0)
    norm.weight.data.copy_(saved)
    if one_plus:
        norm.weight.data.copy_((1 + saved) * factor - 1)
    else:
        norm.weight.data.mul_(factor)
    assert torch.allclose(norm(x), before * factor, rtol=1e-4, atol=1e-4)


def _scale_fused_qkv(linear: torch.nn.Linear, heads: int, factor: float, per_head: bool) -> None:
    """Scale the q and k rows of a fused qkv projection (per head [q k v] blocks, or [Q | K | V])."""
    out = linear.weight.shape[0]
    if per_head:
        rows = torch.arange(out).view(heads, 3, -1)[:, :2].flatten()
    else:
        rows = torch.arange(out).view(3, -1)[:2].flatten()
    linear.weight.data[rows] *= factor
    if linear.bias is not None:
        linear.bias.data[rows] *= factor


def _scale_qk(model: Any, factor: float) -> None:
    config = model.config
    normed = {name.rsplit(".", 1)[0] for name, _ in model.named_modules() if name.endswith(("q_norm", "q_layernorm"))}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 1)[0]
        if leaf in _Q_NAMES + _K_NAMES:
            if isinstance(module, torch.nn.Linear) and parent not in normed:
                module.weight.data.mul_(factor)
                if module.bias is not None:
                    module.bias.data.mul_(factor)
            elif not isinstance(module, torch.nn.Linear):
                _scale_norm(module, factor)
        elif leaf == "query_key_value":  # GPT-NeoX: per head [q k v]; Falcon (multi-query): [Q | K | V]
            if config.model_type == "gpt_neox":
                _scale_fused_qkv(module, config.num_attention_heads, factor, per_head=True)
            else:
                d = config.hidden_size // config.num_attention_heads
                module.weight.data[: config.hidden_size + d] *= factor
                if module.bias is not None:
                    module.bias.data[: config.hidden_size + d] *= factor
        elif leaf == "qkv_proj":  # Phi-3: [Q | K | V] rows
            text = config.get_text_config()
            d = text.hidden_size // text.num_attention_heads
            module.weight.data[: (text.num_attention_heads + text.num_key_value_heads) * d] *= factor
        elif leaf == "c_attn":  # GPT-2 Conv1D [in, 3 * hidden]: [Q | K | V] columns
            h = config.hidden_size
            module.weight.data[:, : 2 * h] *= factor
            module.bias.data[: 2 * h] *= factor


_recorded: list[float] = []


def _recording_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Any, scaling: float | None = None, **kwargs: Any) -> Any:  # fmt: skip
    groups = query.shape[1] // key.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = query @ repeat_kv(key, groups).transpose(-1, -2) * scale
    _recorded.append(float(scores.abs().max()))
    kwargs.pop("softcap", None), kwargs.pop("s_aux", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register("pagedq_test_record_scores", _recording_attention)


def max_attention_score(model: Any, length: int = 24) -> float:
    """The largest |q.k * scaling| (before any soft-capping) over every layer of one forward."""
    probe = copy.deepcopy(model)
    probe.set_attn_implementation("pagedq_test_record_scores")
    _recorded.clear()
    ids = torch.arange(3, 3 + length)[None] % model.config.get_text_config().vocab_size
    with torch.no_grad():
        probe(input_ids=ids, use_cache=False)
    return max(_recorded)


def sharpen(model: Any, target: float = SHARP_SCORE) -> float:
    """Scale q and k so the largest attention score is about `target`; returns the score reached."""
    for _ in range(2):  # bilinear in the factor; a second round corrects norms and biases
        factor = (target / max_attention_score(model)) ** 0.5
        _scale_qk(model, factor)
    return max_attention_score(model)


def sharp_gqa_llama() -> Any:
    """A Llama of 8 heads on 4 kv heads (hidden 256, 2 layers, seed 0, EOS unset), sharpened: scores above 15."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=4, max_position_embeddings=512, **COMMON)  # fmt: skip
    model = tf.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    assert sharpen(model) > 15
    return model


def build_family(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    torch.manual_seed(seed)
    model = FAMILY_BUILDERS[name]().eval()
    if model.is_backend_compatible():  # others are refused by the engine before any attention runs
        sharpen(model)
    model.to(dtype)
    model.generation_config.eos_token_id = None
    return TinyModel(name, model, copy.deepcopy(model))

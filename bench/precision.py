"""int8 against fp32 and bf16 on three shapes: speed per forward and agreement with fp32 (random weights).

    .venv/bin/python bench/precision.py [--quick] [--threads N] [--repeats N]

Shapes (the benchmarks' models, random weights, seeded):
  bert      BERT-base classifier (12 x 768, FFN 3072), one forward of --bert-batch x --bert-len tokens
  llama     the W1 56M Llama (8 x 512, FFN 1408, vocab 32000): one decode step of --rows rows over a
            --context-token KV cache, in transformers' own forward (a DynamicCache, cropped back after each
            step: its torch.cat of the cache costs as much as the linears) and in pagedq's paged engine
  marian    the W4 Marian 512 (6+6 x 512, FFN 2048, vocab 58101): one encoder pass of --rows sentences of
            --source-len tokens, and one decoder step of --rows rows
Variants: fp32 and bf16 with their linear weights pre-packed for oneDNN, as the engine runs them
(worker/engine/cpu/linear.py; glibc malloc keeps freed memory, host_memory.py); int8 (`quantize_int8`:
W8A8, per-token activations, LM head int8); int8 with the LM head fp32 (pre-packed).
Timings: the median of --repeats rounds, variants interleaved in each round (the machine's load hits them
alike); compare ratios. Agreement with fp32: classification label agreement and max |logit difference|; the
LMs: teacher-forced greedy agreement along fp32's greedy continuation (share of positions whose argmax equals
fp32's), free-running sequences equal to fp32's, max |logit difference| / max |logit|.
bf16 K/V (`kv_cache_dtype="bfloat16"`, the LMs): the fp32 and int8 models run with a cache that rounds its K/V to
bf16 (`paged.kv_dtype.rounding_cache`; the engine equals that, tests/worker/engine/paged/test_kv_cache_dtype.py),
their agreement with fp32 stated the same way (no timing row: transformers' cache is not the engine's pages).
Prints a table and a last `key=value` line; draws bench/plots/precision.png (`--plot`): runs/s per variant,
each shape its own panel, fp32 the baseline.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import _host  # noqa: F401  (first: the worker's allocator settings, before torch)
import plots
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
)

from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.cpu.host_memory import keep_freed_memory
from pagedq.worker.engine.cpu.linear import prepack_linears
from pagedq.worker.engine.cpu.quantization import int8_kernel, quantize_int8
from pagedq.worker.engine.decoder_only.engine import LLMEngine
from pagedq.worker.engine.decoding.sampling import SamplingParams
from pagedq.worker.engine.paged.kv_dtype import rounding_cache

SEED = 1234


def bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bert() -> Any:
    torch.manual_seed(SEED)
    model = BertForSequenceClassification(BertConfig(num_labels=3)).eval()
    torch.nn.init.normal_(model.classifier.weight, std=0.5)  # labels that differ between inputs
    return model


def llama() -> Any:
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def marian() -> Any:
    torch.manual_seed(SEED)
    config = MarianConfig(
        vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
        pad_token_id=58100, eos_token_id=0, decoder_start_token_id=58100,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MarianMTModel(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.forced_eos_token_id = None
    model.generation_config.bad_words_ids = None
    return model


def variants(model: Any) -> dict[str, tuple[Any, float]]:
    """name -> (model, seconds to prepare it)."""
    out: dict[str, tuple[Any, float]] = {}
    started = time.perf_counter()
    fp32 = copy.deepcopy(model)
    prepack_linears(fp32)
    out["fp32"] = (fp32, time.perf_counter() - started)
    if bf16_supported():
        started = time.perf_counter()
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        prepack_linears(bf16)
        out["bf16"] = (bf16, time.perf_counter() - started)
    started = time.perf_counter()
    out["int8"] = (quantize_int8(copy.deepcopy(model)), time.perf_counter() - started)
    if model.get_output_embeddings() is not None:
        started = time.perf_counter()
        int8_head32 = quantize_int8(copy.deepcopy(model), lm_head=False)
        prepack_linears(int8_head32)
        out["int8, head fp32"] = (int8_head32, time.perf_counter() - started)
    return out


def timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median ms per call, the variants interleaved in every round."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up: oneDNN primitives, packed weights
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - started) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def decode_step(model: Any, rows: int, context: int, encoder: Any = None) -> Callable[[], Any]:
    """One decoder step of `rows` rows over a `context`-token cache, cropped back after each call."""
    g = torch.Generator().manual_seed(SEED)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab - 2, (rows, context), generator=g)
    step_ids = torch.randint(3, vocab - 2, (rows, 1), generator=g)
    with torch.inference_mode():
        if encoder is None:
            cache = model(input_ids=prompt, use_cache=True).past_key_values
        else:
            cache = model(encoder_outputs=encoder, decoder_input_ids=prompt, use_cache=True).past_key_values

    def run() -> Any:
        with torch.inference_mode():
            if encoder is None:
                out = model(input_ids=step_ids, cache=cache, use_cache=True)
            else:
                out = model(encoder_outputs=encoder, decoder_input_ids=step_ids, cache=cache, use_cache=True)
        cache.crop(-1)  # the step's token
        assert cache.get_seq_length() == context
        return out

    return run


def engine_decode_ms(model: Any, rows: int, context: int, steps: int, name: str) -> float:
    """Median ms of one decode step of `rows` requests with `context`-token prompts through pagedq's own paged
    engine (no self-check: see worker/engine/cpu/quantization.py on int8 and its tolerance)."""
    config = EngineConfig(max_batch_tokens=rows * context, max_running_requests=rows, block_size=16)
    engine = LLMEngine(model, config=config, namespace=name, num_blocks=rows * (context + steps + 2) // 16 + 8,
                       self_check=False)  # fmt: skip
    g = torch.Generator().manual_seed(SEED)
    for i in range(rows):
        prompt = torch.randint(3, model.config.vocab_size - 2, (context,), generator=g).tolist()
        engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=steps + 2, ignore_eos=True))
    engine.step()  # the prefill of every prompt (one step: the budget holds them all)
    engine.step()  # a first decode step (warm-up)
    times = []
    while engine.has_unfinished_requests():
        started = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


KV_BF16 = ", bf16 KV"  # variant suffix: the model run with a cache rounding its K/V to bf16


def with_bf16_kv(models: dict[str, Any], names: tuple[str, ...] = ("fp32", "int8")) -> dict[str, Any]:
    """`models` plus, for `names`, the same model as a bf16-K/V variant (`greedy_agreement` gives it the cache)."""
    return {**models, **{name + KV_BF16: models[name] for name in names if name in models}}


def greedy_agreement(models: dict[str, Any], prompts: list[torch.Tensor], new: int, seq2seq: bool) -> dict[str, Any]:
    """Per variant, against fp32: teacher-forced argmax agreement, equal free-running outputs, max rel |dlogit|.
    A variant named "... , bf16 KV" runs with a fresh bf16-rounding cache in every call."""
    ref = models["fp32"]
    result: dict[str, Any] = {name: {"agree": 0, "positions": 0, "equal": 0, "dlogit": 0.0} for name in models}

    def cache(name: str, model: Any) -> dict[str, Any]:
        return {"cache": rounding_cache(model, torch.bfloat16), "use_cache": True} if name.endswith(KV_BF16) else {}

    with torch.inference_mode():
        for prompt in prompts:
            kw = dict(max_new_tokens=new, do_sample=False, min_new_tokens=new)
            want = ref.generate(input_ids=prompt[None], **kw)[0]
            for name, model in models.items():
                got = model.generate(input_ids=prompt[None], **kw, **cache(name, model))[0]
                if seq2seq:
                    lf = ref(input_ids=prompt[None], decoder_input_ids=want[None, :-1]).logits[0].float()
                    lq = model(input_ids=prompt[None], decoder_input_ids=want[None, :-1], **cache(name, model))
                    lq = lq.logits[0].float()
                else:
                    lf = ref(input_ids=want[None, :-1]).logits[0, len(prompt) - 1 :].float()
                    lq = model(input_ids=want[None, :-1], **cache(name, model)).logits[0, len(prompt) - 1 :].float()
                r = result[name]
                r["agree"] += int((lf.argmax(-1) == lq.argmax(-1)).sum())
                r["positions"] += lf.shape[0]
                r["equal"] += int(got.tolist() == want.tolist())
                r["dlogit"] = max(r["dlogit"], float((lf - lq).abs().max() / lf.abs().max()))
    return result


def agreement_lines(shape: str, agreement: dict[str, Any], prompts: int) -> list[str]:
    """The bf16-K/V variants' agreement with fp32, one line each."""
    return [
        f"{shape:<14} {name:<16} {'':>9} {'':>8}  greedy {a['agree']}/{a['positions']} teacher-forced, "
        f"{a['equal']}/{prompts} equal, max |dlogit|/max|logit| {a['dlogit']:.3f} (K/V stored bf16)"
        for name, a in agreement.items()
        if name.endswith(KV_BF16)
    ]


def panels(rows: list[tuple[str, str, float, str]]) -> list[plots.Panel]:
    """One panel per shape: each variant's runs per second (1000 / ms), fp32 the baseline."""
    shapes = list(dict.fromkeys(shape for shape, _, _, _ in rows))
    return [plots.Panel(shape, [(variant, 1000.0 / ms) for s, variant, ms, _ in rows if s == shape], "fp32")
            for shape in shapes]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller inputs, fewer rounds and agreement prompts")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--rows", type=int, default=32, help="decode rows (and Marian sentences)")
    p.add_argument("--context", type=int, default=128, help="KV tokens per decode row")
    p.add_argument("--source-len", type=int, default=32)
    p.add_argument("--bert-batch", type=int, default=None)
    p.add_argument("--bert-len", type=int, default=128)
    p.add_argument("--only", choices=("bert", "llama", "marian"), action="append")
    plots.add_plot_argument(p, "precision")
    return p


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as every engine does (worker/engine/cpu/host_memory.py)
    repeats = args.repeats or (5 if args.quick else 15)
    bert_batch = args.bert_batch or (4 if args.quick else 8)
    prompts_n = 4 if args.quick else 16
    shapes = args.only or ["bert", "llama", "marian"]
    print(f"torch {torch.__version__}, {args.threads} threads, int8 kernel: "
          f"{int8_kernel()}, bf16: {bf16_supported()}, "
          f"load {os.getloadavg()[0]:.1f} at start")
    rows: list[tuple[str, str, float, str]] = []  # shape, variant, ms, agreement
    kv_lines: list[str] = []  # the bf16-K/V variants' agreement (no timing)
    summary: dict[str, float] = {}
    g = torch.Generator().manual_seed(SEED + 1)

    if "bert" in shapes:
        vs = variants(bert())
        ids = torch.randint(1000, 30000, (bert_batch, args.bert_len), generator=g)
        times = timed({n: (lambda m=m: m(input_ids=ids)) for n, (m, _) in vs.items()}, repeats)
        inputs = torch.randint(1000, 30000, (64 if not args.quick else 16, 24), generator=g)
        with torch.inference_mode():
            logits = {n: m(input_ids=inputs).logits.float() for n, (m, _) in vs.items()}
        ref = logits["fp32"]
        top2 = ref.topk(2, dim=-1).values
        separated = (top2[:, 0] - top2[:, 1]) > 0.1
        for n, (_, prep) in vs.items():
            agree = int((logits[n].argmax(-1) == ref.argmax(-1))[separated].sum())
            d = float((logits[n] - ref).abs().max())
            rows.append(("bert fwd", n, times[n], f"labels {agree}/{int(separated.sum())} (margin > 0.1), "
                         f"max |dlogit| {d:.3f} of {float(ref.abs().max()):.2f}; prepare {prep:.2f}s"))
        summary["bert_int8_speedup"] = times["fp32"] / times["int8"]

    if "llama" in shapes:
        vs = variants(llama())
        times = timed({n: decode_step(m, args.rows, args.context) for n, (m, _) in vs.items()}, repeats)
        engine_times = {n: engine_decode_ms(copy.deepcopy(m), args.rows, args.context, repeats, n)
                        for n, (m, _) in vs.items()}  # fmt: skip
        prompts = [torch.randint(3, 31000, (24,), generator=g) for _ in range(prompts_n)]
        agreement = greedy_agreement(with_bf16_kv({n: m for n, (m, _) in vs.items()}), prompts, 16, seq2seq=False)
        for n, (_, prep) in vs.items():
            a = agreement[n]
            rows.append(("llama decode", n, times[n], f"greedy {a['agree']}/{a['positions']} teacher-forced, "
                         f"{a['equal']}/{len(prompts)} equal, max |dlogit|/max|logit| {a['dlogit']:.3f}; "
                         f"prepare {prep:.2f}s"))
        kv_lines += agreement_lines("llama", agreement, len(prompts))
        for n in vs:
            rows.append(("llama engine", n, engine_times[n], "pagedq's paged engine: one decode step"))
        summary["llama_decode_int8_speedup"] = times["fp32"] / times["int8"]
        summary["llama_engine_decode_int8_speedup"] = engine_times["fp32"] / engine_times["int8"]

    if "marian" in shapes:
        vs = variants(marian())
        source = torch.randint(3, 58000, (args.rows, args.source_len), generator=g)
        enc_times = timed({n: (lambda m=m: m.get_encoder()(input_ids=source)) for n, (m, _) in vs.items()}, repeats)
        with torch.inference_mode():
            encoded = {n: m.get_encoder()(input_ids=source) for n, (m, _) in vs.items()}
        dec_times = timed({n: decode_step(m, args.rows, 16, encoded[n]) for n, (m, _) in vs.items()}, repeats)
        prompts = [torch.randint(3, 58000, (20,), generator=g) for _ in range(prompts_n)]
        agreement = greedy_agreement(with_bf16_kv({n: m for n, (m, _) in vs.items()}), prompts, 16, seq2seq=True)
        kv_lines += agreement_lines("marian", agreement, len(prompts))
        for n, (_, prep) in vs.items():
            a = agreement[n]
            rows.append(("marian encode", n, enc_times[n], f"prepare {prep:.2f}s"))
            rows.append(("marian decode", n, dec_times[n], f"greedy {a['agree']}/{a['positions']} teacher-forced, "
                         f"{a['equal']}/{len(prompts)} equal, max |dlogit|/max|logit| {a['dlogit']:.3f}"))
        summary["marian_encode_int8_speedup"] = enc_times["fp32"] / enc_times["int8"]
        summary["marian_decode_int8_speedup"] = dec_times["fp32"] / dec_times["int8"]

    base = {shape: ms for shape, n, ms, _ in rows if n == "fp32"}
    print(f"{'shape':<14} {'variant':<16} {'ms':>9} {'vs fp32':>8}  agreement with fp32")
    for shape, n, ms, note in rows:
        print(f"{shape:<14} {n:<16} {ms:>9.2f} {base[shape] / ms:>7.2f}x  {note}")
    print("\n".join(kv_lines))
    note = f"{'--quick; ' if args.quick else ''}{args.threads} threads, int8 kernel {int8_kernel()}"
    print(plots.rates(args.plot, "Precision: each shape's forward or decode step per variant", "runs/s (1000 / ms)",
                      panels(rows), note, columns=3))
    summary["load"] = os.getloadavg()[0]
    print(" ".join(f"{k}={v:.2f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()

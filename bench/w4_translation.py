"""W4 -- translation (handbook benchmarks.md): the paged seq2seq engine against `generate`.

Model: a random-weight `MarianMTModel` shaped like OPUS-MT en-de (6+6 layers, d_model 512, 8 heads, FFN 2048,
vocab 58101, fp32), its generation config like the checkpoint's (pad = decoder start, pad banned, forced EOS).
Input: `--w4-sentences` (256) random sentences of uniform 8..128 tokens (seed 1234).
Output lengths: a random-weight model emits </s> at once or never (measured: the same length for every input),
so, as W1 does, </s> is suppressed (a -1e4 logit bias) and each sentence gets its own length: its input length
times uniform 0.8..1.2 (seed 1234), as `max_new_tokens` -- where generate's forced </s> lands. A static batch
runs to its longest member, then each row is cut to its own length: what real </s> stops cost it.

Systems (pagedq and the baselines in this process, the peers in their own), greedy and beam 4, each warmed
up once, then timed round-robin:
  one generate per sentence    `model.generate` on one sentence at a time (on the first `--w4-sequential`
                               sentences only: it is slow; tokens/s is a rate, so it compares)
  generate, static batches     `model.generate` on batches of 16 in arrival order (padded, attention mask)
  pagedq fp32 / bf16 / int8     `Seq2SeqEngine`: every sentence submitted at once, continuous batching; bf16 the
                               model cast to bf16; int8 its linear layers quantized by
                               pagedq.worker.engine.cpu.quantization (skipped with a line when absent or refused)
  pagedq int8, bf16 KV         the int8 model with `kv_cache_dtype="bfloat16"`: K/V pages in bf16 (half the bytes a
                               decode step reads; pagedq.worker.engine.paged.kv_dtype), compared with int8 and fp32
  ctranslate2 fp32 / int8      the peer (bench/peers_ct2.py): a `Translator` on the model converted in the run,
                               int8 quantized at load, each in its own process as users run it (bench/
                               peer_process.py says why). No continuous batching and no per-sentence length in a
                               batch, so it is given the lengths (generous to it): sentences sorted by length,
                               cut into chunks (the fastest of a few sizes, tried on int8, or
                               `--w4-ct2-batching`), each chunk decoded to its longest target (min = max length),
                               each sentence keeping its own tokens; the forced </s> appended undecoded
Checks: the engine's outputs equal per-sentence `generate`, token for token, on the sequential subset; so does
CT2 fp32 (greedy, and beam 4 where near-ties allow), CT2 int8 against CT2 fp32.
"x best peer": tokens/s over the faster CT2 row's. "GEMM floor": the run's model FLOPs (module `w4_flops`) at
the GEMM rate of the row's precision measured in the run, as a share of its time.
KV bytes per request: the engine's peak blocks (cross blocks at the real encoder length, decoder blocks
shared by beams) against generate's cache padded to its batch's longest input and output (cross K/V copied
per beam, as generate expands encoder outputs).

Run: `python bench/tasks.py --workload w4` (or `python bench/w4_translation.py`), `--quick` for a smoke run.
`--w4-static N` runs generate's static batches on the first N sentences only (a rate: it compares; the beam
baseline alone takes ~15 minutes of 256 sentences on 2 cores), `--w4-precisions fp32,int8` leaves pagedq's bf16
row out (emulated and slow on a CPU without bf16 instructions), `--w4-ct2-batching` skips CT2's batching search.
Summary keys: w4_<greedy|beam>_vs_static, _vs_sequential (pagedq fp32), _bf16_vs_fp32, _kv_vs_padded, _exact;
w4_greedy_vs_ct2_int8 and w4_beam4_vs_ct2_int8 (pagedq's fastest precision over CT2 int8).
Plots tokens/s per system, greedy and beam 4 side by side, with the ratio to the static batches (bench/plots.py)
to bench/plots/w4.png (`--plot`).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peers_ct2
import plots
import torch
from peer_process import PeerProcess
from transformers import GenerationConfig, MarianConfig, MarianMTModel
from transformers.utils import logging as hf_logging

from pagedq.shared.models import GenerationOptions
from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.decoding.seq2seq_options import decode_settings
from pagedq.worker.engine.seq2seq.engine import Seq2SeqEngine

SEED = 1234
VOCAB, EOS, PAD = 58101, 0, 58100  # OPUS-MT en-de's sizes and ids
EOS_BIAS = -1.0e4  # on final_logits_bias[</s>]: lengths come from the per-sentence targets instead
STATIC_BATCH = 16


Run = Callable[[list[list[int]], list[int]], list[list[int]]]  # (sentences, output lengths) -> outputs


@dataclass
class System:
    """One way of translating: `run(sentences, targets)` returns every sentence's output tokens."""

    name: str
    run: Run
    inputs: tuple[list[list[int]], list[int]]
    seconds: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    kv_bytes: float = 0.0  # mean KV bytes per request

    @property
    def sentences(self) -> int:
        return len(self.inputs[0])

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def tokens_per_s(self) -> float:
        return sum(len(o) for o in self.outputs) / self.median


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--w4-sentences", type=int, default=None, help="default 256 (32 with --quick)")
    p.add_argument("--w4-sequential", type=int, default=None, help="sentences for one generate each (16; 4 quick)")
    p.add_argument("--w4-static", type=int, default=None, help="sentences for generate's static batches (default all; "
                   "a rate, so a subset compares: the beam baseline alone takes ~15 min of 256 sentences)")
    p.add_argument("--w4-precisions", default="fp32,bf16,int8,int8+kv-bf16", help="pagedq rows, e.g. fp32,int8 "
                   "(bf16 where the CPU has no bf16 instructions is emulated and slow; int8+kv-bf16: the int8 "
                   "model with bf16 K/V pages)")  # fmt: skip
    p.add_argument("--w4-max-requests", type=int, default=256, help="max_running_requests (sequences, beams count)")
    p.add_argument("--w4-budget", type=int, default=8192, help="max_batch_tokens of the engine")
    p.add_argument("--w4-kv-gib", type=float, default=None, help="KV pool of each engine (1.5; 0.5 quick)")
    p.add_argument("--w4-repeats", type=int, default=1, help="timed runs per system (a static beam run is long)")
    p.add_argument("--w4-skip-peers", action="store_true", help="no CTranslate2 rows")
    p.add_argument("--w4-ct2-batching", default="", help="CT2 chunks, e.g. examples:16 or tokens:2048 (default: "
                   "the fastest of a few, tried on the int8 model, per decoding mode)")  # fmt: skip


def w4_model() -> Any:
    torch.manual_seed(SEED)
    config = MarianConfig(
        vocab_size=VOCAB, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, forced_eos_token_id=EOS,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MarianMTModel(config).eval()
    with torch.no_grad():
        model.final_logits_bias[0, EOS] = EOS_BIAS
    model.generation_config = GenerationConfig(
        decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS, forced_eos_token_id=EOS,
        bad_words_ids=[[PAD]], max_length=512, num_beams=4,
    )  # fmt: skip
    return model


def w4_sentences(count: int) -> tuple[list[list[int]], list[int]]:
    """Source token ids (</s> last) and each sentence's output length (module docstring)."""
    rng = random.Random(SEED)
    sentences = [[rng.randrange(1, PAD) for _ in range(rng.randint(8, 128) - 1)] + [EOS] for _ in range(count)]
    targets = [max(4, min(128, round(len(s) * rng.uniform(0.8, 1.2)))) for s in sentences]
    return sentences, targets


def kv_bytes_per_token(model: Any) -> int:
    config = model.config
    return 2 * config.decoder_layers * config.d_model * model.dtype.itemsize


def generate(model: Any, batch: list[list[int]], targets: list[int], beams: int) -> list[list[int]]:
    """One padded `generate` call to the batch's longest target; each row cut to its own target."""
    longest = max(len(ids) for ids in batch)
    input_ids = torch.tensor([ids + [PAD] * (longest - len(ids)) for ids in batch], device=model.device)
    mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in batch], device=model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, num_beams=beams, max_new_tokens=max(targets))
    return [row[:target] for row, target in zip(out[:, 1:].tolist(), targets, strict=True)]


def padded_kv_bytes(sentences: list[list[int]], outputs: list[list[int]], beams: int, per_token: int) -> float:
    """Mean KV bytes per request in `generate` on static batches: every row padded to its batch's longest
    input (cross K/V, one copy per beam) and decoder length (self K/V, per beam)."""
    total = 0
    for i in range(0, len(sentences), STATIC_BATCH):
        inputs, outs = sentences[i : i + STATIC_BATCH], outputs[i : i + STATIC_BATCH]
        longest_in, longest_out = max(len(x) for x in inputs), max(len(o) for o in outs)
        total += len(inputs) * beams * (longest_in + longest_out) * per_token
    return total / len(sentences)


class EngineRun:
    """Drives a fresh `Seq2SeqEngine` over all sentences; records each request's peak KV blocks."""

    def __init__(self, model: Any, args: argparse.Namespace, beams: int, kv_cache_dtype: str = "auto") -> None:
        self.model, self.beams = model, beams
        self.config = EngineConfig(
            max_batch_tokens=args.w4_budget,
            max_running_requests=args.w4_max_requests,
            block_size=16,
            kv_cache_bytes=int((args.w4_kv_gib or (0.5 if args.quick else 1.5)) * 2**30),
            kv_cache_dtype=kv_cache_dtype,
        )
        self.engine: Seq2SeqEngine | None = None
        self.peak_blocks: dict[str, int] = {}

    def __call__(self, sentences: list[list[int]], targets: list[int]) -> list[list[int]]:
        engine = self.engine = self.engine or Seq2SeqEngine(self.model, self.config)
        for i, (ids, target) in enumerate(zip(sentences, targets, strict=True)):
            options = GenerationOptions(num_beams=self.beams, max_new_tokens=target)
            engine.add_request(str(i), ids, decode_settings(self.model, options))
        done: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            outputs = engine.step()
            for request in engine.scheduler.running:
                held = len(request.encoder_blocks) + len(
                    {b for s in request.sequences for b in engine.kv.block_ids(s.seq_id)}
                )
                self.peak_blocks[request.request_id] = max(self.peak_blocks.get(request.request_id, 0), held)
            done.update((o.request_id, o.output_token_ids) for o in outputs)
        return [done[str(i)] for i in range(len(sentences))]

    def kv_bytes(self, per_token: int) -> float:
        """Mean peak bytes per request; `per_token` in the model's dtype, scaled to what the pages store."""
        stored = self.engine.pool.pages.element_size() / self.model.dtype.itemsize if self.engine else 1.0
        return statistics.mean(self.peak_blocks.values()) * self.config.block_size * per_token * stored


def measure(systems: list[System], repeats: int) -> None:
    """Warm each system up on two sentences, then time `repeats` full runs, round-robin (noise hits all alike)."""
    for system in systems:
        sentences, targets = system.inputs
        system.run(sentences[:2], targets[:2])
    for _ in range(repeats):
        for system in systems:
            start = time.perf_counter()
            system.outputs = system.run(*system.inputs)
            system.seconds.append(time.perf_counter() - start)


def one_by_one(model: Any, beams: int) -> Run:
    def run(sentences: list[list[int]], targets: list[int]) -> list[list[int]]:
        return [generate(model, [x], [t], beams)[0] for x, t in zip(sentences, targets, strict=True)]

    return run


def static_batches(model: Any, beams: int) -> Run:
    def run(sentences: list[list[int]], targets: list[int]) -> list[list[int]]:
        rows: list[list[int]] = []
        for i in range(0, len(sentences), STATIC_BATCH):
            rows += generate(model, sentences[i : i + STATIC_BATCH], targets[i : i + STATIC_BATCH], beams)
        return rows

    return run


def w4(args: argparse.Namespace) -> dict[str, float]:
    count = args.w4_sentences or (32 if args.quick else 256)
    sequential_count = args.w4_sequential or (4 if args.quick else 16)
    static_count = args.w4_static or count
    repeats = 1 if args.quick else args.w4_repeats
    model = w4_model()
    reference = w4_model()  # the engine switches its model's attention; generate runs on an untouched copy
    sentences, targets = w4_sentences(count)
    lengths = [len(s) for s in sentences]
    print(
        f"W4: {count} sentences of {min(lengths)}..{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), "
        f"Marian 6+6 x 512, vocab {VOCAB} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), "
        f"outputs of {min(targets)}..{max(targets)} tokens, {torch.get_num_threads()} threads, "
        f"{repeats} timed run(s) after a warm-up"
    )
    precisions = {p.strip() for p in args.w4_precisions.split(",")} | {"fp32"}  # fp32: every ratio's reference
    int8_kv = "int8+kv-bf16" in precisions
    models = pagedq_models(model, "bf16" in precisions, "int8" in precisions or int8_kv, int8_kv)
    if int8_kv and "int8" not in precisions:
        models.pop(PAGEDQ_INT8, None)
    setup = Setup(args, reference, models, Peers(args, reference), sentences, targets, sequential_count, static_count)
    print(f"{peers_ct2.rates_line(setup.rates)}; load average {load_average()}")
    summary: dict[str, float] = {}
    panels = []
    for beams, label in ((1, "greedy"), (4, "beam")):
        mode_summary, mode_panel = decoding_mode(setup, beams, label, repeats)
        summary |= mode_summary
        panels.append(mode_panel)
    summary["w4_kv_bytes_vs_padded"] = summary["w4_greedy_kv_vs_padded"]
    note = f"{'--quick: ' if args.quick else ''}{count} sentences, {repeats} timed run(s)"
    title = "W4: translation, random-weight Marian 6+6 x 512"
    print(plots.rates(plots.path_for(args.plot, "w4"), title, "generated tokens/s", panels, note))
    return summary


@dataclass
class Setup:
    """What every decoding mode shares: the models, the peers, the inputs, the GEMM rates measured now."""

    args: argparse.Namespace
    reference: Any  # untouched by any engine: generate runs on it
    models: dict[str, Any]  # pagedq row name -> the model its engine runs
    peers: Peers
    sentences: list[list[int]]
    targets: list[int]
    sequential_count: int
    static_count: int
    rates: dict[str, float] = field(default_factory=peers_ct2.gemm_rates)


def decoding_mode(setup: Setup, beams: int, label: str, repeats: int) -> tuple[dict[str, float], plots.Panel]:
    """Time every system at `beams`, print its table and checks; its summary entries and plot panel. The
    engines live only here: one mode's KV pools are freed before the next mode's are allocated."""
    inputs = (setup.sentences, setup.targets)
    head = (setup.sentences[: setup.sequential_count], setup.targets[: setup.sequential_count])
    static_inputs = (setup.sentences[: setup.static_count], setup.targets[: setup.static_count])
    engine_runs = {
        name: EngineRun(m, setup.args, beams, peers_ct2.kv_cache_dtype_of(name))
        for name, m in setup.models.items()
    }
    systems = [
        System("one generate per sentence", one_by_one(setup.reference, beams), head),
        System(f"generate, batches of {STATIC_BATCH}", static_batches(setup.reference, beams), static_inputs),
        *(System(name, run, inputs) for name, run in engine_runs.items()),
        *setup.peers.systems(beams, inputs),
    ]
    measure(systems, repeats)
    by_name = {s.name: s for s in systems}
    sequential, static, ours = systems[0], systems[1], by_name[PAGEDQ_FP32]
    static.kv_bytes = padded_kv_bytes(static_inputs[0], static.outputs, beams, kv_bytes_per_token(setup.reference))
    for name, run in engine_runs.items():
        by_name[name].kv_bytes = run.kv_bytes(kv_bytes_per_token(setup.models[name]))
    checked = sequential.sentences
    same = sum(a == b for a, b in zip(ours.outputs[:checked], sequential.outputs, strict=True))
    flops = w4_flops(setup.reference.config, setup.sentences, setup.targets, beams)
    title = f"{label} (num_beams={beams})"
    print(table(title, systems, same, checked, floor_shares(systems, flops, setup.rates)))
    print(setup.peers.checks(by_name, sequential.outputs))
    summary = {
        f"w4_{label}_vs_static": ours.tokens_per_s() / static.tokens_per_s(),
        f"w4_{label}_vs_sequential": ours.tokens_per_s() / sequential.tokens_per_s(),
    }
    if PEER_INT8 in by_name:
        best = max((by_name[name] for name in engine_runs), key=System.tokens_per_s)
        print(f"fastest pagedq row: {best.name}")
        summary[f"w4_{'greedy' if beams == 1 else f'beam{beams}'}_vs_ct2_int8"] = (
            best.tokens_per_s() / by_name[PEER_INT8].tokens_per_s()
        )
    if PAGEDQ_BF16 in by_name:
        summary[f"w4_{label}_bf16_vs_fp32"] = by_name[PAGEDQ_BF16].tokens_per_s() / ours.tokens_per_s()
    summary[f"w4_{label}_kv_vs_padded"] = ours.kv_bytes / static.kv_bytes
    summary[f"w4_{label}_exact"] = same / checked
    return summary, panel(title, systems)


PAGEDQ_FP32, PAGEDQ_BF16, PAGEDQ_INT8 = "pagedq fp32", "pagedq bf16", "pagedq int8"
PAGEDQ_INT8_KV = PAGEDQ_INT8 + peers_ct2.KV_BF16_ROW
PEER_FP32, PEER_INT8 = "ctranslate2 fp32", "ctranslate2 int8"


def pagedq_models(model: Any, bf16: bool = True, int8_row: bool = True, int8_kv_row: bool = False) -> dict[str, Any]:
    """The models the paged engine runs: fp32, bf16 (a cast copy), int8 (when pagedq's quantization exists),
    and the int8 model again for the row whose engine stores bf16 K/V."""
    models = {PAGEDQ_FP32: model}
    if bf16:
        models[PAGEDQ_BF16] = copy.deepcopy(model).to(torch.bfloat16)
    if not int8_row:
        return models
    int8, why = peers_ct2.pagedq_int8(model)
    print(why)
    if int8 is not None:
        try:
            Seq2SeqEngine(int8, EngineConfig(max_running_requests=4, kv_cache_bytes=2**24))  # its self-check
            models[PAGEDQ_INT8] = int8
            if int8_kv_row:
                models[PAGEDQ_INT8_KV] = int8
        except ValueError as refused:
            print(f"pagedq int8 skipped: the engine refused the int8 model: {refused}")
    return models


W4_BATCHINGS = [peers_ct2.Batching("examples", n) for n in (8, 16, 32)] + [peers_ct2.Batching("tokens", 2048)]


class Peers:
    """CTranslate2 fp32 and int8 Translators on the W4 model converted once (none, with a line, when
    ctranslate2 is not installed or --w4-skip-peers); their batching picked per decoding mode."""

    def __init__(self, args: argparse.Namespace, model: Any) -> None:
        self.args = args
        self.translators: dict[str, PeerProcess] = {}
        if args.w4_skip_peers:
            return
        if not peers_ct2.available():
            print(peers_ct2.SKIPPED)
            return
        with peers_ct2.temp_dir() as tmp:  # a loaded Translator holds its weights: the files can go
            path, tokens = peers_ct2.convert_marian(model, Path(tmp))
            self.translators = {  # each in its own process, as users run it (peers_ct2's docstring)
                f"ctranslate2 {p}": peers_ct2.start("translator", path, compute_type, args.threads, tokens)
                for p, compute_type in peers_ct2.COMPUTE_TYPES.items()
            }

    def run(self, name: str, beams: int, batching: peers_ct2.Batching) -> Run:
        def run(sentences: list[list[int]], targets: list[int]) -> list[list[int]]:
            translator = self.translators[name]
            return translator.call("translate", sentences, targets, beams, batching, EOS)  # type: ignore[no-any-return]

        return run

    def batching(self, beams: int, inputs: tuple[list[list[int]], list[int]]) -> peers_ct2.Batching:
        if self.args.w4_ct2_batching:
            kind, size = self.args.w4_ct2_batching.split(":")
            chosen = peers_ct2.Batching(kind, int(size))
        else:
            sentences, targets = inputs
            self.run(PEER_INT8, beams, W4_BATCHINGS[0])(sentences[:2], targets[:2])  # warm-up
            chosen, tried = peers_ct2.best_batching(lambda b: self.run(PEER_INT8, beams, b)(*inputs), W4_BATCHINGS)
            print(f"ctranslate2 int8 batching, beams {beams}, one run each: " + "; ".join(
                f"{k} {v:.1f} s" for k, v in tried.items()))  # fmt: skip
        print(
            f"ctranslate2 rows: {chosen} (both precisions), each chunk decoded to its longest target (min = max "
            f"length), each sentence's own tokens kept, the forced </s> appended undecoded; "
            f"intra_threads={self.args.threads}, inter_threads=1; each in its own process"
        )
        return chosen

    def systems(self, beams: int, inputs: tuple[list[list[int]], list[int]]) -> list[System]:
        if not self.translators:
            return []
        batching = self.batching(beams, inputs)
        return [System(name, self.run(name, beams, batching), inputs) for name in self.translators]

    def checks(self, by_name: dict[str, System], reference: list[list[int]]) -> str:
        """CT2 fp32 against per-sentence generate (the sequential subset), int8 against CT2 fp32."""
        if PEER_FP32 not in by_name:
            return ""
        fp32, int8 = by_name[PEER_FP32].outputs, by_name[PEER_INT8].outputs
        lines = [peers_ct2.agreement_line(PEER_FP32, fp32[: len(reference)], reference, "generate")]
        lines.append(peers_ct2.agreement_line(PEER_INT8, int8, fp32, PEER_FP32))
        for name in (PAGEDQ_INT8, PAGEDQ_INT8_KV):
            if name in by_name:
                lines.append(peers_ct2.agreement_line(name, by_name[name].outputs,
                                                      by_name[PAGEDQ_FP32].outputs, PAGEDQ_FP32))  # fmt: skip
        if PAGEDQ_INT8 in by_name and PAGEDQ_INT8_KV in by_name:
            lines.append(peers_ct2.agreement_line(PAGEDQ_INT8_KV, by_name[PAGEDQ_INT8_KV].outputs,
                                                  by_name[PAGEDQ_INT8].outputs, PAGEDQ_INT8))  # fmt: skip
        return "\n".join(lines)


def w4_flops(config: Any, sentences: list[list[int]], targets: list[int], beams: int) -> float:
    """Model FLOPs of W4's tokens. Encoder: each source token through every layer (linear 4d^2 + 2df, attention
    over its sentence). Decoder, per beam, per fed token (start + target - 1): self-attention and FFN linears,
    cross-attention query and output, attention over its prefix and the source, the LM head. Cross-attention
    K/V: once per sentence and layer (shared by beams). Embeddings and norms are not counted."""
    d, f, vocab = config.d_model, config.encoder_ffn_dim, config.vocab_size
    enc, dec = config.encoder_layers, config.decoder_layers
    total = 0.0
    for source, target in zip(sentences, targets, strict=True):
        n = len(source)
        total += enc * n * (2 * (4 * d * d + 2 * d * f) + 4 * d * n)
        total += dec * n * 2 * 2 * d * d  # cross K/V
        decoder = dec * target * (2 * (6 * d * d + 2 * d * f) + 4 * d * (target + 1) / 2 + 4 * d * n)
        total += beams * (decoder + target * 2 * d * vocab)
    return total


def floor_shares(systems: list[System], flops: float, rates: dict[str, float]) -> dict[str, str]:
    """Each full-workload row's GEMM floor share (rows run on a subset of the sentences: none)."""
    full = max(s.sentences for s in systems)
    return {s.name: peers_ct2.floor_share(flops, peers_ct2.precision_of(s.name), rates, s.median)
            for s in systems if s.sentences == full}  # fmt: skip


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def panel(title: str, systems: list[System]) -> plots.Panel:
    """tokens/s per system, as ratios to generate on static batches (the table's `vs static`)."""
    rows = [(s.name, s.tokens_per_s()) for s in systems]
    return plots.Panel(f"{title}; ratio: to static batches", rows, systems[1].name)


def table(title: str, systems: list[System], same: int, checked: int, floors: dict[str, str]) -> str:
    sequential, static = systems[0], systems[1]
    peer = max((s for s in systems if s.name.startswith("ctranslate2")), key=System.tokens_per_s, default=None)
    header = f"{'system':<28} {'sentences':>9} {'tokens/s':>9} {'vs 1-by-1':>9} {'vs static':>9}"
    header += f" {'x best peer':>11}" if peer else ""
    header += f" {'GEMM floor':>10} {'KV MiB/req':>10}"
    lines = [f"-- {title}", header]
    for s in systems:
        rate = s.tokens_per_s()
        kv = f"{s.kv_bytes / 2**20:>10.2f}" if s.kv_bytes else f"{'':>10}"
        line = f"{s.name:<28} {s.sentences:>9} {rate:>9.1f} {rate / sequential.tokens_per_s():>8.2f}x "
        line += f"{rate / static.tokens_per_s():>8.2f}x"
        line += f" {rate / peer.tokens_per_s():>10.2f}x" if peer else ""
        lines.append(f"{line} {floors.get(s.name, '-'):>10} {kv}")
    mean_out = statistics.mean(len(o) for o in systems[2].outputs)
    lines.append(f"(output tokens per sentence: mean {mean_out:.1f}; pagedq == generate on {same}/{checked} sentences)")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    add_arguments(p)
    plots.add_plot_argument(p, "w4")
    return p


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    summary = w4(args)
    print(" ".join(f"{key}={value:.3f}" for key, value in summary.items()))


if __name__ == "__main__":
    main()

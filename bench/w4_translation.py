"""W4 -- translation (handbook benchmarks.md): the paged seq2seq engine against `generate`.

Model: a random-weight `MarianMTModel` shaped like OPUS-MT en-de (6+6 layers, d_model 512, 8 heads, FFN 2048,
vocab 58101, fp32), its generation config like the checkpoint's (pad = decoder start, pad banned, forced EOS).
Input: `--w4-sentences` (256) random sentences of uniform 8..128 tokens (seed 1234).
Output lengths: a random-weight model emits </s> at once or never (measured: the same length for every input),
so, as W1 does, </s> is suppressed (a -1e4 logit bias) and each sentence gets its own length: its input length
times uniform 0.8..1.2 (seed 1234), as `max_new_tokens` -- where generate's forced </s> lands. A static batch
runs to its longest member, then each row is cut to its own length: what real </s> stops cost it.

Systems, in this process, greedy and beam 4, each warmed up once, then timed round-robin:
  one generate per sentence    `model.generate` on one sentence at a time (on the first `--w4-sequential`
                               sentences only: it is slow; tokens/s is a rate, so it compares)
  generate, static batches     `model.generate` on batches of 16 in arrival order (padded, attention mask)
  pagedq engine                `Seq2SeqEngine`: every sentence submitted at once, continuous batching
Checks: the engine's outputs equal per-sentence `generate`, token for token, on the sequential subset.
KV bytes per request: the engine's peak blocks (cross blocks at the real encoder length, decoder blocks
shared by beams) against generate's cache padded to its batch's longest input and output (cross K/V copied
per beam, as generate expands encoder outputs).

Run: `python bench/tasks.py --workload w4` (or `python bench/w4_translation.py`), `--quick` for a smoke run.
Plots tokens/s per system, greedy and beam 4 side by side, with the ratio to the static batches (bench/plots.py)
to bench/plots/w4.png (`--plot`).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import plots
import torch
from transformers import GenerationConfig, MarianConfig, MarianMTModel
from transformers.utils import logging as hf_logging

from pagedq.shared.models import GenerationOptions
from pagedq.worker.engine._generation import decode_settings
from pagedq.worker.engine.executor import EngineConfig
from pagedq.worker.engine.seq2seq_engine import Seq2SeqEngine

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
    p.add_argument("--w4-max-requests", type=int, default=256, help="max_running_requests (sequences, beams count)")
    p.add_argument("--w4-budget", type=int, default=8192, help="max_batch_tokens of the engine")
    p.add_argument("--w4-kv-gib", type=float, default=1.5, help="KV pool of the engine")
    p.add_argument("--w4-repeats", type=int, default=1, help="timed runs per system (a static beam run is long)")


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
    input_ids = torch.tensor([ids + [PAD] * (longest - len(ids)) for ids in batch])
    mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in batch])
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

    def __init__(self, model: Any, args: argparse.Namespace, beams: int) -> None:
        self.model, self.beams = model, beams
        self.config = EngineConfig(
            max_batch_tokens=args.w4_budget,
            max_running_requests=args.w4_max_requests,
            block_size=16,
            kv_cache_bytes=int(args.w4_kv_gib * 2**30),
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
                held = len(request.cross_blocks) + len(
                    {b for s in request.sequences for b in engine.kv.block_ids(s.request_id)}
                )
                self.peak_blocks[request.request_id] = max(self.peak_blocks.get(request.request_id, 0), held)
            done.update((o.request_id, o.output_token_ids) for o in outputs)
        return [done[str(i)] for i in range(len(sentences))]

    def kv_bytes(self, per_token: int) -> float:
        return statistics.mean(self.peak_blocks.values()) * self.config.block_size * per_token


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
    repeats = 1 if args.quick else args.w4_repeats
    model = w4_model()
    reference = w4_model()  # the engine switches its model's attention; generate runs on an untouched copy
    sentences, targets = w4_sentences(count)
    head = (sentences[:sequential_count], targets[:sequential_count])
    per_token = kv_bytes_per_token(model)
    lengths = [len(s) for s in sentences]
    print(
        f"W4: {count} sentences of {min(lengths)}..{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), "
        f"Marian 6+6 x 512, vocab {VOCAB} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), "
        f"outputs of {min(targets)}..{max(targets)} tokens, {torch.get_num_threads()} threads, "
        f"{repeats} timed run(s) after a warm-up"
    )
    summary: dict[str, float] = {}
    panels = []
    for beams, label in ((1, "greedy"), (4, "beam")):
        engine_run = EngineRun(model, args, beams)
        systems = [
            System("one generate per sentence", one_by_one(reference, beams), head),
            System(f"generate, batches of {STATIC_BATCH}", static_batches(reference, beams), (sentences, targets)),
            System("pagedq engine", engine_run, (sentences, targets)),
        ]
        measure(systems, repeats)
        sequential, static, ours = systems
        static.kv_bytes = padded_kv_bytes(sentences, static.outputs, beams, per_token)
        ours.kv_bytes = engine_run.kv_bytes(per_token)
        checked = sequential.sentences
        same = sum(a == b for a, b in zip(ours.outputs[:checked], sequential.outputs, strict=True))
        print(table(f"{label} (num_beams={beams})", systems, same, checked))
        panels.append(panel(f"{label} (num_beams={beams})", systems))
        summary[f"w4_{label}_vs_static"] = ours.tokens_per_s() / static.tokens_per_s()
        summary[f"w4_{label}_vs_sequential"] = ours.tokens_per_s() / sequential.tokens_per_s()
        summary[f"w4_{label}_kv_vs_padded"] = ours.kv_bytes / static.kv_bytes
        summary[f"w4_{label}_exact"] = same / checked
    summary["w4_kv_bytes_vs_padded"] = summary["w4_greedy_kv_vs_padded"]
    note = f"{'--quick: ' if args.quick else ''}{count} sentences, {repeats} timed run(s)"
    title = "W4: translation, random-weight Marian 6+6 x 512"
    print(plots.rates(plots.path_for(args.plot, "w4"), title, "generated tokens/s", panels, note))
    return summary


def panel(title: str, systems: list[System]) -> plots.Panel:
    """tokens/s per system, as ratios to generate on static batches (the table's `vs static`)."""
    rows = [(s.name, s.tokens_per_s()) for s in systems]
    return plots.Panel(f"{title}; ratio: to static batches", rows, systems[1].name)


def table(title: str, systems: list[System], same: int, checked: int) -> str:
    sequential, static = systems[0], systems[1]
    header = f"{'system':<28} {'sentences':>9} {'tokens/s':>9} {'vs 1-by-1':>9} {'vs static':>9} {'KV MiB/req':>10}"
    lines = [f"-- {title}", header]
    for s in systems:
        rate = s.tokens_per_s()
        kv = f"{s.kv_bytes / 2**20:>10.2f}" if s.kv_bytes else f"{'':>10}"
        lines.append(
            f"{s.name:<28} {s.sentences:>9} {rate:>9.1f} {rate / sequential.tokens_per_s():>8.2f}x "
            f"{rate / static.tokens_per_s():>8.2f}x {kv}"
        )
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

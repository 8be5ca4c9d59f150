"""Task benchmarks from the handbook's benchmarks.md, one function per workload: W3 (classification).

W3: a random-weight BERT-base-shaped classifier (12 layers, hidden 768, 12 heads, intermediate 3072, 3 labels;
`--w3-layers` for a smaller one), texts of uniform 8..256 tokens (seed 1234; a WordPiece vocabulary in which
every word is one token, so lengths are exact). Systems, all in this process, round-robin per repeat:
  one forward per text           tokenizer + model per text (no padding, no batching)
  pipeline batch_size=32         transformers `pipeline("text-classification", top_k=None)`: pads each batch
  pagedq packed                  ClassificationExecutor driven directly (add all, step until done), packed
  pagedq padded                  the same executor on its padded, length-bucketed fallback path
and, reported separately, the pipeline and pagedq packed in bf16. Scores of every system are checked against
the fp32 pipeline (max abs difference). The GEMM floor: FLOPs of the real tokens / measured GEMM rate.

Run: `python bench/tasks.py --workload w3` (2,000 texts, 3 repeats), `--quick` (200 texts, 1 repeat).
Plots texts/s per system with the ratio to the pipeline (W4: tokens/s, ratio to static batches; bench/plots.py)
to bench/plots/w3.png and w4.png (`--plot`).
Ends with one line of key=value pairs from every workload run, e.g. `w3_vs_pipeline=.. w3_padding_share=..`.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plots
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, pipeline
from transformers.utils import logging as hf_logging
from w4_translation import add_arguments as add_w4_arguments  # W4 lives in its own module (bench/w4_translation.py)
from w4_translation import w4

from pagedq.shared.models import ClassifyRequest, TaskType
from pagedq.shared.registry import ModelSpec
from pagedq.worker._demo_corpus import ENGLISH_WORDS
from pagedq.worker._demo_tokenizers import build_wordpiece
from pagedq.worker.engine.classify import ClassificationExecutor
from pagedq.worker.engine.executor import EngineConfig, EngineRequest, LoadedModel

SEED = 1234
W3_LABELS = 3


@dataclass
class System:
    """One way of running a workload: `run()` processes every input once and returns its outputs."""

    name: str
    run: Callable[[list[str]], Any]  # inputs -> outputs, one row per input
    padding_share: Callable[[], float]
    group: str = "fp32"
    seconds: list[float] = field(default_factory=list)  # wall time per timed run
    cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time (all threads) per run
    outputs: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu_seconds)


def measure(systems: list[System], inputs: list[Any], warmup: int, repeats: int) -> None:
    """Warm each system up on the first `warmup` inputs, then time `repeats` rounds over all of them,
    round-robin so that the noise of a shared machine hits every system alike."""
    for system in systems:
        system.run(inputs[:warmup])
    for _ in range(repeats):
        for system in systems:
            start, start_cpu = time.perf_counter(), time.process_time()
            system.outputs = system.run(inputs)
            system.seconds.append(time.perf_counter() - start)
            system.cpu_seconds.append(time.process_time() - start_cpu)


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def gemm_rate(dtype: torch.dtype, tokens: int = 4096, hidden: int = 768, inner: int = 3072) -> float:
    """FLOP/s of an FFN-shaped matmul on this machine now (median of 5)."""
    a, b = torch.randn(tokens, hidden, dtype=dtype), torch.randn(hidden, inner, dtype=dtype)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * tokens * hidden * inner / statistics.median(times[1:])


# ---- W3: classification --------------------------------------------------------------------------------
def w3_texts(tokenizer: Any, count: int, seed: int = SEED) -> list[str]:
    """`count` texts of uniform 8..256 tokens ([CLS] and [SEP] included): one vocabulary word per token."""
    rng = random.Random(seed)
    words = [w.lower() for w in ENGLISH_WORDS if len(tokenizer.tokenize(w.lower())) == 1]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 256) - 2)) for _ in range(count)]


def w3_model(vocab_size: int, layers: int) -> Any:
    torch.manual_seed(SEED)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=768,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        num_labels=W3_LABELS,
    )
    return BertForSequenceClassification(config).eval()


def w3_flops_per_token(config: Any, mean_length: float) -> float:
    """Forward FLOPs of one token: the linear layers, plus attention (QK^T and PV) over its own text."""
    h, i = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * (2 * (4 * h * h + 2 * h * i) + 4 * mean_length * h)


def scores_of_pipeline(outputs: list[list[dict[str, Any]]], label2id: dict[str, int]) -> np.ndarray:
    scores = np.zeros((len(outputs), len(label2id)))
    for row, ranked in enumerate(outputs):
        for entry in ranked:
            scores[row, label2id[entry["label"]]] = entry["score"]
    return scores


def run_one_by_one(model: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
    rows = []
    with torch.inference_mode():
        for text in texts:
            logits = model(**tokenizer(text, return_tensors="pt")).logits
            rows.append(torch.softmax(logits.float(), -1)[0].numpy())
    return np.stack(rows)


def run_executor(loaded: LoadedModel, config: EngineConfig, packing: bool, texts: list[str]) -> tuple[Any, dict]:
    """Add every text to a fresh executor and step until done; returns scores [N, labels] and its stats."""
    executor = ClassificationExecutor(loaded, config, packing=packing)
    requests = [
        EngineRequest(id=str(i), task=TaskType.CLASSIFY, payload=ClassifyRequest(text=t, top_k=None), model="w3")
        for i, t in enumerate(texts)
    ]
    for request in requests:
        executor.add(request)
    while executor.has_work():
        executor.step()
    label2id = loaded.model.config.label2id
    scores = np.zeros((len(texts), len(label2id)))
    for row, request in enumerate(requests):
        for entry in request.future.result(timeout=0).scores:
            scores[row, label2id[entry.label]] = entry.score
    return scores, executor.stats().as_dict()


def w3(args: argparse.Namespace) -> dict[str, float]:
    count = args.w3_texts or (200 if args.quick else 2000)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_wordpiece(BertTokenizer, Path(tmp))
    texts = w3_texts(tokenizer, count)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert min(lengths) >= 8 and max(lengths) <= 256, "every word must be one token"
    fp32 = w3_model(len(tokenizer), args.w3_layers)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    spec = ModelSpec(name="w3", task=TaskType.CLASSIFY, source="w3")

    def loaded(model: Any, dtype: torch.dtype) -> LoadedModel:  # a separate copy: packing swaps attention
        return LoadedModel(spec, copy.deepcopy(model), tokenizer, torch.device("cpu"), dtype)

    engine_config = EngineConfig(max_batch_tokens=args.w3_budget, max_running_requests=args.w3_max_requests)
    label2id = fp32.config.label2id
    pipe_padding = padding_share_of_batches(lengths, 32)
    stats: dict[str, dict] = {}

    def pipeline_system(model: Any, group: str) -> System:
        classify = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None, batch_size=32)
        return System(
            f"pipeline batch_size=32 {group}",
            lambda inputs: scores_of_pipeline(classify(inputs), label2id),
            lambda: pipe_padding,
            group,
        )

    def executor_system(name: str, lm: LoadedModel, packing: bool, group: str) -> System:
        def run(inputs: list[str]) -> np.ndarray:
            scores, stats[name] = run_executor(lm, engine_config, packing, inputs)
            return scores

        def share() -> float:
            return stats[name]["padded_tokens"] / stats[name]["computed_tokens"]

        return System(name, run, share, group)

    systems = [
        System("one forward per text", lambda inputs: run_one_by_one(fp32, tokenizer, inputs), lambda: 0.0),
        pipeline_system(fp32, "fp32"),
        executor_system("pagedq packed", loaded(fp32, torch.float32), True, "fp32"),
        executor_system("pagedq padded (bucketed)", loaded(fp32, torch.float32), False, "fp32"),
        pipeline_system(bf16, "bf16"),
        executor_system("pagedq packed bf16", loaded(bf16, torch.bfloat16), True, "bf16"),
    ]
    repeats = 1 if args.quick else args.repeats
    print(
        f"W3: {count} texts of {min(lengths)}..{max(lengths)} tokens (mean {np.mean(lengths):.0f}), BERT "
        f"{args.w3_layers} layers x 768 ({sum(p.numel() for p in fp32.parameters()) / 1e6:.0f}M params), "
        f"budget {args.w3_budget} tokens / {args.w3_max_requests} requests, {torch.get_num_threads()} threads, "
        f"{repeats} repeat(s) after a warm-up on {args.warmup} texts; load average before: {load_average()}"
    )
    measure(systems, texts, args.warmup, repeats)
    reference = systems[1].outputs
    floor_flops = sum(lengths) * w3_flops_per_token(fp32.config, float(np.mean(lengths)))
    rates = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    print(table(systems, count, reference, floor_flops, rates))
    print(f"packed: {stats['pagedq packed']['steps']:.0f} steps; load average after: {load_average()}")
    note = f"{'--quick: ' if args.quick else ''}{count} texts, BERT {args.w3_layers} x 768, {repeats} timed run(s)"
    print(plot_w3(systems, count, plots.path_for(args.plot, "w3"), note))
    by_name = {s.name: s for s in systems}
    ours, pipe, bf16_ours = by_name["pagedq packed"], by_name["pipeline batch_size=32 fp32"], systems[-1]
    return {
        "w3_vs_pipeline": pipe.median / ours.median,
        "w3_vs_pipeline_cpu": pipe.median_cpu / ours.median_cpu,
        "w3_vs_one_by_one": systems[0].median / ours.median,
        "w3_padding_share": ours.padding_share(),
        "w3_bf16_vs_fp32": ours.median / bf16_ours.median,
    }


def plot_w3(systems: list[System], count: int, path: Path, note: str) -> str:
    """texts/s per system, fp32 and bf16 side by side, each as ratios to its own group's pipeline."""
    panels = []
    for group in ("fp32", "bf16"):
        members = [s for s in systems if s.group == group]
        pipe = next(s.name for s in members if s.name.startswith("pipeline"))
        panels.append(
            plots.Panel(f"{group}; ratio: to the {group} pipeline", [(s.name, count / s.median) for s in members], pipe)
        )
    return plots.rates(path, "W3: classification, random-weight BERT", "texts/s", panels, note)


def padding_share_of_batches(lengths: list[int], batch_size: int) -> float:
    """Share of padding when inputs are padded to the longest of each batch, in arrival order."""
    computed = sum(
        len(lengths[i : i + batch_size]) * max(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
    )
    return 1 - sum(lengths) / computed


def table(systems: list[System], count: int, reference: np.ndarray, flops: float, rates: dict[str, float]) -> str:
    lines = [
        f"{'system':<28} {'texts/s':>8} {'vs 1-by-1':>9} {'vs pipe':>8} {'(cpu)':>6} {'padding':>8} {'floor':>6} "
        f"{'max|diff|':>10}",
    ]
    for group in ("fp32", "bf16"):
        members = [s for s in systems if s.group == group]
        one_by_one = next((s for s in members if s.name.startswith("one forward")), systems[0])
        pipe = next(s for s in members if s.name.startswith("pipeline"))
        lines.append(f"-- {group} (GEMM {rates[group] / 1e9:.0f} GFLOP/s measured now)")
        for s in members:
            floor = flops / rates[group] / s.median  # share of the GEMM floor reached
            diff = float(np.abs(s.outputs - reference).max())
            lines.append(
                f"{s.name:<28} {count / s.median:>8.2f} {one_by_one.median / s.median:>8.2f}x "
                f"{pipe.median / s.median:>7.2f}x {pipe.median_cpu / s.median_cpu:>5.2f}x {s.padding_share():>8.1%} "
                f"{floor:>6.0%} {diff:>10.1e}"
            )
    lines.append(
        "(vs: wall-time ratios, 1-by-1 = the fp32 one-forward-per-text run; (cpu): the same ratio to the pipeline in "
        "process CPU time, less skewed by a shared machine's load; padding: share of the token rows through the "
        "linear layers that were padding; floor: FLOPs of the real tokens / GEMM rate measured in this run, as a "
        "share of the wall time; max|diff|: scores vs the fp32 pipeline)"
    )
    return "\n".join(lines)


WORKLOADS: dict[str, Callable[[argparse.Namespace], dict[str, float]]] = {"w3": w3, "w4": w4}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=sorted(WORKLOADS))
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer inputs, one repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=64, help="inputs each system runs once before timing")
    p.add_argument("--w3-texts", type=int, default=None, help="default 2000 (200 with --quick)")
    p.add_argument("--w3-layers", type=int, default=12)
    p.add_argument("--w3-budget", type=int, default=8192, help="max_batch_tokens of the executor")
    p.add_argument("--w3-max-requests", type=int, default=64, help="max_running_requests of the executor")
    add_w4_arguments(p)
    plots.add_plot_argument(p)
    return p


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    summary: dict[str, float] = {}
    for name in args.workload:
        summary.update(WORKLOADS[name](args))
        print()
    print(" ".join(f"{key}={value:.3f}" for key, value in summary.items()))


if __name__ == "__main__":
    main()

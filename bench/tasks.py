"""Task benchmarks from the handbook's benchmarks.md, one function per workload: W3 (classification).

W3: a random-weight BERT-base-shaped classifier (12 layers, hidden 768, 12 heads, intermediate 3072, 3 labels;
`--w3-layers` for a smaller one), texts of uniform 8..256 tokens (seed 1234; a WordPiece vocabulary in which
every word is one token, so lengths are exact). Systems, all in this process, round-robin per repeat:
  one forward per text           tokenizer + model per text (no padding, no batching)
  pipeline batch_size=32         transformers `pipeline("text-classification", top_k=None)`: pads each batch
  pagedq packed                  ClassificationExecutor driven directly (add all, step until done), packed
  pagedq padded                  the same executor on its padded, length-bucketed fallback path
and, reported separately, the pipeline and pagedq packed in bf16. The peer users would pick instead, ONNX
Runtime (bench/peers_ort.py: the same model exported in the run, sorted batches of 32 padded to their longest):
  onnxruntime fp32 (optimized)   ORT_ENABLE_ALL, with or without ORT's BERT fusions (the faster, said which)
  onnxruntime int8 dynamic       quantize_dynamic, QInt8 weights (the fastest graph/per-channel choice)
  pagedq int8                    pagedq.worker.engine.cpu.quantization's int8, when that module exists
(no onnxruntime installed: the ORT rows are skipped with a line saying so). Scores of every system are checked
against the fp32 pipeline (max abs difference); ORT fp32 logits against transformers' forward (1e-4), ORT int8's
against ORT fp32 (label agreement). "x peer": each row against the fastest ORT row. The GEMM floor: FLOPs of
the real tokens / measured GEMM rate of the row's precision (int8: ORT's MatMulInteger or torch._int_mm).

Run: `python bench/tasks.py --workload w3` (2,000 texts, 3 repeats), `--quick` (200 texts, 1 repeat);
`--w3-precisions fp32,int8` leaves the bf16 rows out (emulated and slow on a CPU without bf16 instructions).
Plots texts/s per system with the ratio to the pipeline (W4: tokens/s, ratio to static batches; bench/plots.py)
to bench/plots/w3.png and w4.png (`--plot`).
Ends with one line of key=value pairs from every workload run, e.g. `w3_vs_pipeline=.. w3_padding_share=..
w3_bf16_vs_fp32=.. w3_vs_ort_best=.. (the fastest pagedq row / the fastest ORT row) w3_fp32_vs_ort_fp32=..`.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _host  # noqa: F401  (first: the worker's allocator settings, before torch)
import numpy as np
import peers_ort
import plots
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, pipeline
from transformers.utils import logging as hf_logging
from w4_translation import add_arguments as add_w4_arguments  # W4 lives in its own module (bench/w4_translation.py)
from w4_translation import w4

from pagedq.shared.models import ClassifyRequest, TaskType
from pagedq.shared.registry import ModelSpec
from pagedq.worker.demo.corpus import ENGLISH_WORDS
from pagedq.worker.demo.tokenizers import build_wordpiece
from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel
from pagedq.worker.engine.tasks.classify import ClassificationExecutor

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
    precisions = {p.strip() for p in args.w3_precisions.split(",")}
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16) if "bf16" in precisions else None
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
    ]
    if bf16 is not None:
        systems += [
            pipeline_system(bf16, "bf16"),
            executor_system("pagedq packed bf16", loaded(bf16, torch.bfloat16), True, "bf16"),
        ]
    int8_model, int8_note = pagedq_int8(fp32) if "int8" in precisions else (None, "pagedq int8: not asked for")
    print(int8_note)
    if int8_model is not None:
        int8_loaded = loaded(int8_model, torch.float32)
        packing = packs(int8_loaded, engine_config)
        systems.append(executor_system(PAGEDQ_INT8, int8_loaded, packing, "int8"))
    repeats = 1 if args.quick else args.repeats
    print(
        f"W3: {count} texts of {min(lengths)}..{max(lengths)} tokens (mean {np.mean(lengths):.0f}), BERT "
        f"{args.w3_layers} layers x 768 ({sum(p.numel() for p in fp32.parameters()) / 1e6:.0f}M params), "
        f"budget {args.w3_budget} tokens / {args.w3_max_requests} requests, {torch.get_num_threads()} threads, "
        f"{repeats} repeat(s) after a warm-up on {args.warmup} texts; load average before: {load_average()}"
    )
    peers = ort_peers(fp32, tokenizer, texts, lengths, args.threads)
    systems += peers.systems
    measure(systems, texts, args.warmup, repeats)
    reference = systems[1].outputs
    floor_flops = sum(lengths) * w3_flops_per_token(fp32.config, float(np.mean(lengths)))
    rates = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    if any(s.group == "int8" for s in systems):
        rates["int8"], int8_source = int8_gemm_rate(args.threads)
        print(f"int8 GEMM rate: {int8_source}")
    print(table(systems, count, reference, floor_flops, rates))
    for line in peers.checks():
        print(line)
    print(f"packed: {stats['pagedq packed']['steps']:.0f} steps; load average after: {load_average()}")
    note = f"{'--quick: ' if args.quick else ''}{count} texts, BERT {args.w3_layers} x 768, {repeats} timed run(s)"
    print(plot_w3(systems, count, plots.path_for(args.plot, "w3"), note))
    by_name = {s.name: s for s in systems}
    ours, pipe = by_name["pagedq packed"], by_name["pipeline batch_size=32 fp32"]
    summary = {
        "w3_vs_pipeline": pipe.median / ours.median,
        "w3_vs_pipeline_cpu": pipe.median_cpu / ours.median_cpu,
        "w3_vs_one_by_one": systems[0].median / ours.median,
        "w3_padding_share": ours.padding_share(),
    }
    if PAGEDQ_BF16 in by_name:
        summary["w3_bf16_vs_fp32"] = ours.median / by_name[PAGEDQ_BF16].median
    best_peer = best_ort(systems)
    if best_peer is not None:
        best_ours = min((s for s in systems if s.name.startswith("pagedq")), key=lambda s: s.median)
        print(f"best pagedq row: {best_ours.name}; best ONNX Runtime row: {best_peer.name}")
        summary["w3_vs_ort_best"] = best_peer.median / best_ours.median
        summary["w3_fp32_vs_ort_fp32"] = by_name[ORT_FP32].median / ours.median
    return summary


# ---- W3 peers: ONNX Runtime (bench/peers_ort.py) and pagedq's own int8 ---------------------------------------
ORT_FP32, ORT_INT8 = "onnxruntime fp32 (optimized)", "onnxruntime int8 dynamic"
PAGEDQ_BF16, PAGEDQ_INT8 = "pagedq packed bf16", "pagedq int8"
ORT_CHECK_TEXTS = 96  # texts whose ORT fp32 logits are compared with transformers' forward (3 batches of 32)
ORT_TOLERANCE = 1e-4  # |logit| difference allowed between ORT fp32 and transformers' fp32 forward


@dataclass
class OrtPeers:
    """The ONNX Runtime rows of the W3 table, and the accuracy lines printed under it."""

    systems: list[System]
    checks: Callable[[], list[str]]


def ort_peers(model: Any, tokenizer: Any, texts: list[str], lengths: list[int], threads: int) -> OrtPeers:
    """Export `model` to ONNX and build the fp32 and int8 sessions (bench/peers_ort.py); none without ORT."""
    skipped = peers_ort.missing()
    if skipped:
        print(skipped)
        return OrtPeers([], lambda: [])
    with tempfile.TemporaryDirectory() as tmp:  # the sessions hold the graphs in memory once made
        peers = peers_ort.build(model, tokenizer, Path(tmp), threads, texts[:64])
    logits: dict[str, np.ndarray] = {}
    share = peers_ort.padding_share(lengths)

    def system(name: str, classifier: peers_ort.OrtClassifier, group: str) -> System:
        def run(inputs: list[str]) -> np.ndarray:
            logits[name] = classifier.logits(inputs)
            return torch.softmax(torch.from_numpy(logits[name]), -1).numpy()

        return System(name, run, lambda: share, group)

    def checks() -> list[str]:
        sample = texts[:ORT_CHECK_TEXTS]
        fp32 = peers_ort.agreement(peers.fp32.logits(sample), peers_ort.transformers_logits(model, tokenizer, sample))
        verdict = "within" if fp32.max_abs <= ORT_TOLERANCE else "EXCEEDS"
        int8 = peers_ort.agreement(logits[ORT_INT8], logits[ORT_FP32])
        return [
            fp32.line(f"{ORT_FP32} vs transformers' forward (same padded batches)")
            + f"; {verdict} the tolerance {ORT_TOLERANCE:.0e}",
            int8.line(f"{ORT_INT8} vs {ORT_FP32}"),
        ]

    return OrtPeers([system(ORT_FP32, peers.fp32, "fp32"), system(ORT_INT8, peers.int8, "int8")], checks)


def best_ort(systems: list[System]) -> System | None:
    peers = [s for s in systems if s.name.startswith("onnxruntime")]
    return min(peers, key=lambda s: s.median) if peers else None


def pagedq_int8(model: Any) -> tuple[Any | None, str]:
    """A copy of `model` with its linear layers int8 (pagedq.worker.engine.cpu.quantization), if it exists."""
    name = "pagedq.worker.engine.cpu.quantization"
    quantize = None
    if importlib.util.find_spec(name) is not None:
        quantization = importlib.import_module(name)
        quantize = getattr(quantization, "quantize_int8", None)
    if quantize is None:
        return None, f"pagedq int8 skipped: {name}.quantize_int8 is not there"
    int8 = quantize(copy.deepcopy(model))
    summary = quantization.quantization_summary(int8)
    return int8, f"{PAGEDQ_INT8}: {summary.describe() if summary else name}"


def packs(lm: LoadedModel, config: EngineConfig) -> bool:
    """Whether the executor packs this model; if its load-time self-check refuses, say why (the padded path runs)."""
    try:
        ClassificationExecutor(lm, config, packing=True)
    except ValueError as refused:
        print(f"{lm.spec.name} int8: packing refused, the padded (bucketed) path runs: {refused}")
        return False
    return True


def int8_gemm_rate(threads: int) -> tuple[float, str]:
    """The faster int8 GEMM here (ONNX Runtime's MatMulInteger, torch._int_mm): op/s and a line naming both."""
    measured: dict[str, float] = {}
    if not peers_ort.missing():
        measured["ORT MatMulInteger"] = peers_ort.int8_gemm_rate(threads)
    try:
        a = torch.randint(-128, 127, (4096, 768), dtype=torch.int8)
        b = torch.randint(-128, 127, (768, 3072), dtype=torch.int8)
        times = []
        for _ in range(6):
            start = time.perf_counter()
            torch._int_mm(a, b)
            times.append(time.perf_counter() - start)
        measured["torch._int_mm"] = 2 * 4096 * 768 * 3072 / statistics.median(times[1:])
    except RuntimeError:
        pass
    line = ", ".join(f"{name} {rate / 1e9:.0f} Gop/s" for name, rate in measured.items())
    return max(measured.values()), f"{line}; the floor uses the faster"


def plot_w3(systems: list[System], count: int, path: Path, note: str) -> str:
    """texts/s per system, one panel per precision (fp32 | bf16 | int8), each as ratios to its group's pipeline
    (int8, which has none: to ONNX Runtime's int8)."""
    panels = []
    for group in groups(systems):
        members = [s for s in systems if s.group == group]
        base = next((s.name for s in members if s.name.startswith("pipeline")), ORT_INT8)
        base = base if base in {s.name for s in members} else members[0].name
        panels.append(plots.Panel(f"{group}; ratio: to {base}", [(s.name, count / s.median) for s in members], base))
    return plots.rates(path, "W3: classification, random-weight BERT", "texts/s", panels, note)


def groups(systems: list[System]) -> list[str]:
    return [g for g in ("fp32", "bf16", "int8") if any(s.group == g for s in systems)]


def padding_share_of_batches(lengths: list[int], batch_size: int) -> float:
    """Share of padding when inputs are padded to the longest of each batch, in arrival order."""
    computed = sum(
        len(lengths[i : i + batch_size]) * max(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
    )
    return 1 - sum(lengths) / computed


def table(systems: list[System], count: int, reference: np.ndarray, flops: float, rates: dict[str, float]) -> str:
    lines = [
        f"{'system':<30} {'texts/s':>8} {'vs 1-by-1':>9} {'vs pipe':>8} {'(cpu)':>6} {'x peer':>7} {'padding':>8} "
        f"{'floor':>6} {'max|diff|':>10}",
    ]
    peer = best_ort(systems)
    fp32_pipe = next(s for s in systems if s.name.startswith("pipeline") and s.group == "fp32")
    for group in groups(systems):
        members = [s for s in systems if s.group == group]
        one_by_one = next((s for s in members if s.name.startswith("one forward")), systems[0])
        pipe = next((s for s in members if s.name.startswith("pipeline")), fp32_pipe)
        unit = "Gop/s" if group == "int8" else "GFLOP/s"
        lines.append(f"-- {group} (GEMM {rates[group] / 1e9:.0f} {unit} measured now; vs pipe: to {pipe.name})")
        for s in members:
            floor = flops / rates[group] / s.median  # share of the GEMM floor reached
            diff = float(np.abs(s.outputs - reference).max())
            x_peer = f"{peer.median / s.median:>6.2f}x" if peer else f"{'-':>7}"
            lines.append(
                f"{s.name:<30} {count / s.median:>8.2f} {one_by_one.median / s.median:>8.2f}x "
                f"{pipe.median / s.median:>7.2f}x {pipe.median_cpu / s.median_cpu:>5.2f}x {x_peer} "
                f"{s.padding_share():>8.1%} {floor:>6.0%} {diff:>10.1e}"
            )
    lines.append(
        "(vs: wall-time ratios, 1-by-1 = the fp32 one-forward-per-text run; (cpu): the same ratio to the pipeline in "
        "process CPU time, less skewed by a shared machine's load; x peer: the best ONNX Runtime row's time / this "
        "row's (above 1: faster than it); padding: share of the token rows through the linear layers that were "
        "padding; floor: FLOPs of the real tokens / GEMM rate of the row's precision measured in this run, as a "
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
    p.add_argument("--w3-precisions", default="fp32,bf16,int8", help="rows beyond fp32, e.g. fp32,int8 (bf16 where the "
                   "CPU has no bf16 instructions is emulated and slow)")  # fmt: skip
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

"""W1, W3 and W4 on a CUDA GPU (issue 13: "where a GPU is available, run the three workloads there too").

The workloads' own models and inputs (bench/engine.py's W1 Llama, bench/tasks.py's W3 BERT-base classifier,
bench/w4_translation.py's W4 Marian), more of them by default than on a CPU (a GPU runs the CPU sizes in well
under a second), every system on one CUDA device in this process (the CTranslate2 peers in their own):
  W1   transformers static batches of 16 and its continuous batching (`generate_batch` manager), bf16 -- what a
       transformers user runs on a GPU; pagedq fp32 and bf16 (the worker's default on CUDA); CTranslate2
       `Generator` float16 and int8_float16 on CUDA (sorted, chunked, decoded to each chunk's longest target as
       on the CPU: bench/peers_ct2.py), where its CUDA build loads on this machine
  W3   transformers `pipeline("text-classification", batch_size=32)` fp32 and bf16; pagedq packed fp32 and
       bf16 (ClassificationExecutor). ONNX Runtime runs here only with its CUDA execution provider
       (onnxruntime-gpu): without it the run says so and has no W3 peer
  W4   `generate` on static batches of 16, bf16; pagedq fp32 and bf16, greedy and beam 4; CTranslate2
       `Translator` float16 and int8_float16 on CUDA where it loads
Checks, on the same device: pagedq fp32 greedy (W1, W4 greedy and beam 4) against one `generate` per request
in fp32, token for token, on the first `--check` requests; pagedq bf16 against pagedq fp32 and against
transformers' own bf16 rows (sequences identical, share of tokens before the first difference); W3 scores
against the fp32 pipeline (max |difference|, label agreement).
Timing: each system warmed up once, then `--repeats` timed runs round-robin, the median kept; every system's
outputs come back as Python lists, so its time includes the device's work. "GEMM floor": the run's model FLOPs
at the bf16 / fp32 matmul rate measured on the device in the run, as a share of the row's time.

Run (on a machine with CUDA): `python bench/cuda.py` (W1 256 requests, W3 2,000 texts, W4 256 sentences),
`--quick` (64 / 400 / 64). `--device cpu` runs the same code on the CPU (a smoke test of the script, not a
measurement). Plots to bench/plots/cuda_w1.png, cuda_w3.png, cuda_w4.png (`--plot`).
Ends with one line: cuda_w1_vs_hf_cb=.. cuda_w1_vs_ct2_best=.. cuda_w1_bf16_vs_fp32=.. cuda_w3_vs_pipeline=..
cuda_w3_bf16_vs_fp32=.. cuda_w4_greedy_vs_static=.. cuda_w4_greedy_vs_ct2_best=.. cuda_w4_beam4_vs_static=..
cuda_w4_beam4_vs_ct2_best=.. (pagedq's fastest row over the baseline / the faster CT2 row).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _host  # noqa: F401  (first: the worker's allocator settings, before torch)
import engine as w1_bench
import numpy as np
import peers_ct2
import plots
import tasks as w3_bench
import torch
import w4_translation as w4_bench
from peers_ct2 import agreement_line
from transformers import BertTokenizer, pipeline
from transformers.utils import logging as hf_logging

from pagedq.shared.models import TaskType
from pagedq.shared.registry import ModelSpec
from pagedq.worker.demo.tokenizers import build_wordpiece
from pagedq.worker.engine.core.executor import EngineConfig, LoadedModel
from pagedq.worker.engine.decoder_only.engine import LLMEngine

# row suffix -> CT2 compute_type: on CUDA the peer's half-precision types; on the CPU (`--device cpu`, the smoke
# test) its CPU types, so that the smoke test runs the peer's code too
CT2_COMPUTE_TYPES = {
    "cuda": {"fp16": "float16", "int8+fp16": "int8_float16"},
    "cpu": {"fp32": "float32", "int8": "int8"},
}


@dataclass
class System:
    """One way of running a workload's inputs: `run()` returns one output per input (token ids, or scores)."""

    name: str
    run: Callable[[], Any]
    warm: Callable[[], Any]
    units: Callable[[Any], int]  # tokens (W1, W4) or texts (W3) in its outputs
    precision: str = "bf16"  # the GEMM rate its floor share uses
    seconds: list[float] = field(default_factory=list)
    outputs: Any = None

    @property
    def rate(self) -> float:
        return self.units(self.outputs) / statistics.median(self.seconds)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(systems: list[System], repeats: int, device: torch.device) -> None:
    """Warm every system up, then time them round-robin (`repeats` runs each)."""
    for system in systems:
        system.warm()
    for _ in range(repeats):
        for system in systems:
            sync(device)
            start = time.perf_counter()
            system.outputs = system.run()
            sync(device)
            system.seconds.append(time.perf_counter() - start)


def gemm_rate(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of an n x n x n matmul on `device` now (median of 10 after a warm-up; n 8192 on CUDA, 1024 on CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    times = []
    for _ in range(11):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[1:])


def tokens_of(outputs: list[list[int]]) -> int:
    return sum(len(o) for o in outputs)


def table(title: str, systems: list[System], unit: str, baseline: str, flops: float, rates: dict[str, float]) -> str:
    by_name = {s.name: s for s in systems}
    base = by_name[baseline].rate
    peers = [s for s in systems if s.name.startswith("ctranslate2")]
    peer = max(peers, key=lambda s: s.rate, default=None)
    heads = ["system", unit, f"x {baseline}", *(["x best peer"] if peer else []), "GEMM floor"]
    lines = [title, " | ".join(heads), " | ".join("---" for _ in heads)]
    for s in systems:
        floor = flops / rates[s.precision] / statistics.median(s.seconds)
        cells = [s.name, f"{s.rate:.0f}" if s.rate >= 100 else f"{s.rate:.1f}", f"{s.rate / base:.2f}"]
        cells += [f"{s.rate / peer.rate:.2f}"] if peer else []
        lines.append(" | ".join([*cells, f"{floor:.1%}"]))
    return "\n".join(lines)


def best(systems: list[System], prefix: str) -> System | None:
    return max((s for s in systems if s.name.startswith(prefix)), key=lambda s: s.rate, default=None)


def ratios(systems: list[System], baseline: str, key: str) -> dict[str, float]:
    """pagedq's fastest row over the row named `baseline` (`key`=ratio) and over the faster CT2 row."""
    ours, by_name = best(systems, "pagedq"), {s.name: s for s in systems}
    assert ours is not None
    prefix = key.rsplit("_vs_", 1)[0]
    out = {key: ours.rate / by_name[baseline].rate}
    peer = best(systems, "ctranslate2")
    if peer is not None:
        out[f"{prefix}_vs_ct2_best"] = ours.rate / peer.rate
    return out


# ---- CTranslate2 on CUDA ---------------------------------------------------------------------------------


def ct2_peers(kind: str, model: Any, device: torch.device) -> tuple[dict[str, Any], str]:
    """CTranslate2 float16 and int8_float16 on CUDA (float32 and int8 on the CPU), each in its own process;
    none (and why) where it cannot."""
    if not peers_ct2.available():
        return {}, peers_ct2.SKIPPED
    import ctranslate2

    convert = peers_ct2.convert_llama if kind == "generator" else peers_ct2.convert_marian
    peers: dict[str, Any] = {}
    compute_types = CT2_COMPUTE_TYPES[device.type]
    try:
        if device.type == "cuda" and ctranslate2.get_cuda_device_count() == 0:
            return {}, f"ctranslate2 {ctranslate2.__version__} sees no CUDA device here (its CUDA build or libraries)"
        with peers_ct2.temp_dir() as tmp:
            path, tokens = convert(copy.deepcopy(model).float().cpu(), Path(tmp))
            threads = torch.get_num_threads()
            for suffix, compute_type in compute_types.items():
                peers[f"ctranslate2 {suffix}"] = peers_ct2.start(kind, path, compute_type, threads, tokens, device.type)
        one = peers_ct2.Batching("examples", 1)
        for peer in peers.values():  # CT2 loads cuBLAS on its first call, not at load: one tiny call each
            if kind == "generator":
                peer.call("generate", [([3, 4, 5], 2)], one)
            else:
                peer.call("translate", [[5, 6, w4_bench.EOS]], [2], 1, one, w4_bench.EOS)
    except Exception as failed:  # noqa: BLE001  (a peer that cannot run on this machine is reported, not fatal)
        for peer in peers.values():
            peer.close()
        return {}, f"ctranslate2 on {device.type} failed: {type(failed).__name__}: {failed}"
    return peers, f"ctranslate2 {ctranslate2.__version__} on {device.type}: {', '.join(compute_types.values())}"


# ---- W1 --------------------------------------------------------------------------------------------------


def w1(args: argparse.Namespace, device: torch.device, rates: dict[str, float]) -> dict[str, float]:
    reqs = w1_bench.w1_requests(args.w1_requests)
    fp32 = w1_bench.w1_model().to(device)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    tokens = sum(n for _, n in reqs)
    warm = reqs[:4]
    config = EngineConfig(max_batch_tokens=args.budget, max_running_requests=len(reqs))
    num_blocks = len(reqs) * 24 + 64  # 384 tokens / 16 per request and slack: no preemption
    engines = {
        "pagedq fp32": LLMEngine(copy.deepcopy(fp32), config=config, namespace="fp32", num_blocks=num_blocks),
        "pagedq bf16": LLMEngine(copy.deepcopy(bf16), config=config, namespace="bf16", num_blocks=num_blocks),
    }
    static_model, cb_model = copy.deepcopy(bf16), copy.deepcopy(bf16)
    blocks = len(reqs) * 2 + 8  # transformers CB: page_size 256, at most 384 tokens per request

    def cb(subset: list[tuple[list[int], int]]) -> list[list[int]]:
        return w1_bench.run_hf_cb(cb_model, subset, blocks, args.budget)

    systems = [
        System("transformers static batches of 16 bf16", lambda: w1_bench.run_static(static_model, reqs),
               lambda: w1_bench.run_static(static_model, warm), tokens_of),
        System("transformers continuous batching bf16", lambda: cb(reqs), lambda: cb(warm), tokens_of),
    ]  # fmt: skip
    for name, engine in engines.items():
        systems.append(
            System(name, lambda e=engine: w1_bench.run_pagedq(e, reqs), lambda e=engine: w1_bench.run_pagedq(e, warm),
                   tokens_of, "fp32" if name.endswith("fp32") else "bf16")
        )  # fmt: skip
    peers, note = ct2_peers("generator", fp32, device)
    print(note)
    batching = peers_ct2.Batching("examples", args.ct2_batch)
    for name, peer in peers.items():
        systems.append(System(name, lambda p=peer: p.call("generate", reqs, batching),
                              lambda p=peer: p.call("generate", warm, batching), tokens_of,
                              "fp32" if name.endswith("fp32") else "bf16"))  # fmt: skip
    print(f"W1: {len(reqs)} requests, {tokens} generated tokens, 56M Llama, budget {args.budget} tokens")
    measure(systems, args.repeats, device)
    flops = w1_bench.w1_flops(fp32.config, reqs)
    print(table("W1 generation (greedy)", systems, "tok/s", "transformers continuous batching bf16", flops, rates))
    by_name = {s.name: s for s in systems}
    reference = w1_bench.run_sequential(fp32, reqs[: args.check])
    ours32, ours16 = by_name["pagedq fp32"].outputs, by_name["pagedq bf16"].outputs
    print(agreement_line("pagedq fp32", ours32[: args.check], reference, "generate fp32 (one request at a time)"))
    print(agreement_line("pagedq bf16", ours16, ours32, "pagedq fp32"))
    print(agreement_line("transformers CB bf16", by_name["transformers continuous batching bf16"].outputs, ours32,
                         "pagedq fp32"))  # fmt: skip
    for name in peers:
        print(agreement_line(name, by_name[name].outputs, ours32, "pagedq fp32"))
        peers[name].close()
    plot(systems, "transformers continuous batching bf16", "W1: generation, 56M Llama, greedy", "tok/s", args, "w1")
    out = ratios(systems, "transformers continuous batching bf16", "cuda_w1_vs_hf_cb")
    out["cuda_w1_bf16_vs_fp32"] = by_name["pagedq bf16"].rate / by_name["pagedq fp32"].rate
    out["cuda_w1_fp32_exact"] = sum(a == b for a, b in zip(ours32, reference, strict=False)) / len(reference)
    return out


# ---- W3 --------------------------------------------------------------------------------------------------


def w3(args: argparse.Namespace, device: torch.device, rates: dict[str, float]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_wordpiece(BertTokenizer, Path(tmp))
    texts = w3_bench.w3_texts(tokenizer, args.w3_texts)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    fp32 = w3_bench.w3_model(len(tokenizer), args.w3_layers).to(device)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    spec = ModelSpec(name="w3", task=TaskType.CLASSIFY, source="w3")
    config = EngineConfig(max_batch_tokens=args.w3_budget, max_running_requests=len(texts))
    label2id = fp32.config.label2id

    def executor(model: Any, dtype: torch.dtype) -> Callable[[list[str]], np.ndarray]:
        loaded = LoadedModel(spec, copy.deepcopy(model), tokenizer, device, dtype)
        return lambda inputs: w3_bench.run_executor(loaded, config, True, inputs)[0]

    def pipe(model: Any) -> Callable[[list[str]], np.ndarray]:
        classify = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None, batch_size=32,
                            device=device)  # fmt: skip
        return lambda inputs: w3_bench.scores_of_pipeline(classify(inputs), label2id)

    runs = {
        "transformers pipeline batch_size=32 fp32": (pipe(fp32), "fp32"),
        "transformers pipeline batch_size=32 bf16": (pipe(bf16), "bf16"),
        "pagedq packed fp32": (executor(fp32, torch.float32), "fp32"),
        "pagedq packed bf16": (executor(bf16, torch.bfloat16), "bf16"),
    }
    systems = [
        System(name, lambda r=run: r(texts), lambda r=run: r(texts[:64]), len, precision)
        for name, (run, precision) in runs.items()
    ]
    print(ort_cuda_note())
    print(f"W3: {len(texts)} texts of {min(lengths)}..{max(lengths)} tokens, BERT {args.w3_layers} x 768, "
          f"budget {args.w3_budget} tokens")  # fmt: skip
    measure(systems, args.repeats, device)
    flops = sum(lengths) * w3_bench.w3_flops_per_token(fp32.config, float(np.mean(lengths)))
    print(table("W3 classification", systems, "texts/s", "transformers pipeline batch_size=32 fp32", flops, rates))
    reference = systems[0].outputs
    for s in systems[1:]:
        diff = float(np.abs(s.outputs - reference).max())
        same = float((s.outputs.argmax(1) == reference.argmax(1)).mean())
        print(f"{s.name} vs the fp32 pipeline: max |score difference| {diff:.1e}, labels agree {same:.1%}")
    plot(systems, "transformers pipeline batch_size=32 fp32", "W3: classification, BERT-base", "texts/s", args, "w3")
    by_name = {s.name: s for s in systems}
    return {
        "cuda_w3_vs_pipeline": best(systems, "pagedq").rate / max(  # type: ignore[union-attr]
            by_name["transformers pipeline batch_size=32 fp32"].rate,
            by_name["transformers pipeline batch_size=32 bf16"].rate,
        ),
        "cuda_w3_bf16_vs_fp32": by_name["pagedq packed bf16"].rate / by_name["pagedq packed fp32"].rate,
    }


def ort_cuda_note() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime not installed: no W3 peer"
    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        return "onnxruntime has CUDAExecutionProvider, but this benchmark does not time it yet"
    listed = ", ".join(providers)
    return f"onnxruntime {onnxruntime.__version__} here has no CUDA execution provider ({listed}): no W3 peer"


# ---- W4 --------------------------------------------------------------------------------------------------


def w4(args: argparse.Namespace, device: torch.device, rates: dict[str, float]) -> dict[str, float]:
    sentences, targets = w4_bench.w4_sentences(args.w4_sentences)
    inputs = (sentences, targets)
    head = (sentences[: args.check], targets[: args.check])
    reference_model = w4_bench.w4_model().to(device)  # generate runs on an untouched copy
    bf16_reference = copy.deepcopy(reference_model).to(torch.bfloat16)
    models = {"pagedq fp32": copy.deepcopy(reference_model)}
    models["pagedq bf16"] = copy.deepcopy(models["pagedq fp32"]).to(torch.bfloat16)
    run_args = argparse.Namespace(w4_budget=args.budget, w4_max_requests=4 * len(sentences), w4_kv_gib=args.w4_kv_gib,
                                  quick=False)  # fmt: skip
    peers, note = ct2_peers("translator", reference_model, device)
    print(note)
    print(f"W4: {len(sentences)} sentences, Marian 6+6 x 512, outputs of {min(targets)}..{max(targets)} tokens")
    summary: dict[str, float] = {}
    all_systems = []
    for beams, label in ((1, "greedy"), (4, "beam4")):
        runs = {"generate, batches of 16 bf16": w4_bench.static_batches(bf16_reference, beams)}
        runs |= {name: w4_bench.EngineRun(m, run_args, beams) for name, m in models.items()}
        batching = peers_ct2.Batching("examples", args.ct2_batch)
        for name, peer in peers.items():
            runs[name] = lambda s, t, p=peer, b=beams, c=batching: p.call("translate", s, t, b, c, w4_bench.EOS)
        systems = [
            System(name, lambda r=run: r(*inputs), lambda r=run: r(sentences[:2], targets[:2]), tokens_of,
                   "fp32" if name.endswith("fp32") else "bf16")
            for name, run in runs.items()
        ]  # fmt: skip
        measure(systems, args.repeats, device)
        flops = w4_bench.w4_flops(reference_model.config, sentences, targets, beams)
        print(table(f"W4 translation, {label}", systems, "tok/s", "generate, batches of 16 bf16", flops, rates))
        by_name = {s.name: s for s in systems}
        reference = w4_bench.one_by_one(reference_model, beams)(*head)
        ours32 = by_name["pagedq fp32"].outputs
        print(agreement_line("pagedq fp32", ours32[: args.check], reference, f"generate fp32 (one at a time), {label}"))
        print(agreement_line("pagedq bf16", by_name["pagedq bf16"].outputs, ours32, "pagedq fp32"))
        print(agreement_line("generate bf16", by_name["generate, batches of 16 bf16"].outputs, ours32, "pagedq fp32"))
        for name in peers:
            print(agreement_line(name, by_name[name].outputs, ours32, "pagedq fp32"))
        summary |= ratios(systems, "generate, batches of 16 bf16", f"cuda_w4_{label}_vs_static")
        summary[f"cuda_w4_{label}_fp32_exact"] = sum(
            a == b for a, b in zip(ours32, reference, strict=False)
        ) / len(reference)
        all_systems.append((label, systems))
    for peer in peers.values():
        peer.close()
    panels = [plots.Panel(label, [(s.name, s.rate) for s in rows], rows[0].name) for label, rows in all_systems]
    print(plots.rates(plots.path_for(args.plot, "cuda_w4"), f"W4 on {device_name(device)}: translation, Marian",
                      "generated tokens/s", panels, note_of(args)))  # fmt: skip
    return summary


# ---- report ----------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def note_of(args: argparse.Namespace) -> str:
    return f"{'--quick: ' if args.quick else ''}median of {args.repeats}"


def plot(systems: list[System], baseline: str, title: str, unit: str, args: argparse.Namespace, key: str) -> None:
    panel = plots.Panel(f"ratio: to {baseline}", [(s.name, s.rate) for s in systems], baseline)
    path = plots.path_for(args.plot, f"cuda_{key}")
    print(plots.rates(path, f"{title.split(':')[0]} on {device_name(args.device_obj)}:{title.split(':', 1)[1]}",
                      unit, [panel], note_of(args)))  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (a smoke test of the script)")
    p.add_argument("--quick", action="store_true", help="W1 64 requests, W3 400 texts, W4 64 sentences, 1 repeat")
    p.add_argument("--workloads", default="w1,w3,w4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--w1-requests", type=int, default=None, help="default 256 (64 with --quick)")
    p.add_argument("--w3-texts", type=int, default=None, help="default 2000 (400 with --quick)")
    p.add_argument("--w3-layers", type=int, default=12)
    p.add_argument("--w3-budget", type=int, default=16384, help="max_batch_tokens of the classifier")
    p.add_argument("--w4-sentences", type=int, default=None, help="default 256 (64 with --quick)")
    p.add_argument("--w4-kv-gib", type=float, default=4.0)
    p.add_argument("--budget", type=int, default=8192, help="max_batch_tokens of the W1 / W4 engines and HF CB")
    p.add_argument("--ct2-batch", type=int, default=32, help="CTranslate2 chunk size (examples)")
    p.add_argument("--check", type=int, default=8, help="requests checked against one generate each (fp32)")
    plots.add_plot_argument(p)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        args.repeats = 1
    args.w1_requests = args.w1_requests or (64 if args.quick else 256)
    args.w3_texts = args.w3_texts or (400 if args.quick else 2000)
    args.w4_sentences = args.w4_sentences or (64 if args.quick else 256)
    device = args.device_obj = torch.device(args.device)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*generation flags.*")
    rates = {"fp32": gemm_rate(torch.float32, device), "bf16": gemm_rate(torch.bfloat16, device)}
    print(f"{device_name(device)}, torch {torch.__version__}; matmul rates now: fp32 {rates['fp32'] / 1e12:.3g}, "
          f"bf16 {rates['bf16'] / 1e12:.3g} TFLOP/s; TF32 matmuls {torch.backends.cuda.matmul.allow_tf32}")  # fmt: skip
    summary: dict[str, float] = {}
    chosen = {w.strip() for w in args.workloads.split(",")}
    for key, workload in (("w1", w1), ("w3", w3), ("w4", w4)):
        if key in chosen:
            summary |= workload(args, device, rates)
            print(flush=True)
    print(" ".join(f"{k}={v:.2f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()

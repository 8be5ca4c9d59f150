"""Engine benchmark: W1 (generation) and W2 (shared-context QA) from the handbook's benchmarks.md.

W1: random 56M-param Llama (hidden 512, 8 layers, 8 heads / 4 KV heads, vocab 32000, untied), 64 requests
(seed 1234) with prompts of 16..256 tokens and 16..128 new tokens, greedy, EOS ignored. Systems, all in this
process: one `generate` per request; static batches of 16 (left padding); transformers' continuous batching
(`continuous_batching_context_manager` + per-request `max_new_tokens`, `num_blocks`/`max_batch_tokens` set);
pagedq fp32; pagedq bf16; pagedq int8 (pagedq.worker.engine.cpu.quantization, when present); pagedq int8 with
bf16 K/V pages (`kv_cache_dtype="bfloat16"`, pagedq.worker.engine.paged.kv_dtype). Greedy outputs of pagedq fp32
(and HF CB) are checked against `generate`, the int8 rows against pagedq fp32.
Peers (bench/peers_ct2.py): CTranslate2 `Generator` fp32 and int8 on the same model converted in the run,
each in its own process, as users run it (bench/peer_process.py says why; its CPU time is that process's).
CT2 has no continuous batching and no per-request length in a batch: it gets the output lengths in advance
(generous to it): requests sorted by prompt length, cut into chunks (the fastest of a few chunk sizes, tried
on the int8 model, or `--ct2-batching`), each chunk decoded to its longest target with min_length = max_length
(EOS never stops it), each request keeping only its own tokens (only those are counted). CT2 fp32 greedy is
checked against `generate` token for token, int8 against CT2 fp32. "x best peer": a row's tok/s over the
faster CT2 row's. "GEMM floor": the run's model FLOPs (every prompt and fed token through every layer, the LM
head on generated tokens, attention over each token's context) at the GEMM rate of the row's precision
measured in the run, as a share of the measured time.
W2: 4 contexts of ~1000 tokens x 32 questions of ~30 tokens, 32-token answers; pagedq with prefix caching
on vs off; hit rate against the best possible (every full context block after each context's first request).

Run: `python bench/engine.py` (full), `python bench/engine.py --quick` (a smoke run of a few minutes less).
Plots tok/s per system with the ratio to the baseline (bench/plots.py) to bench/plots/w1.png and w2.png (`--plot`).
Ends with one line: w1_vs_hf_cb=.. w1_vs_sequential=.. w1_bf16_vs_fp32=.. w1_vs_ct2_best=.. w1_fp32_vs_ct2_fp32=..
w2_prefix_speedup=.. w2_hit_rate=..
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _host  # noqa: F401  (first: the worker's allocator settings, before torch)
import peers_ct2
import plots
import torch
from peer_process import PeerProcess
from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM

from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.decoder_only.engine import LLMEngine
from pagedq.worker.engine.decoding.sampling import SamplingParams

VOCAB = 32000
STATIC_BATCH = 16


@dataclass
class Result:
    name: str
    tokens: int
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time (all threads)
    outputs: list[list[int]] | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens / statistics.median(self.seconds)

    @property
    def tok_cpu_s(self) -> float:
        """Tokens per CPU-second: less sensitive than wall time to other load on a shared machine."""
        return self.tokens / statistics.median(self.cpu_seconds)


def w1_model() -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def w1_requests(n: int, seed: int = 1234) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, VOCAB) for _ in range(rng.randint(16, 256))], rng.randint(16, 128)) for _ in range(n)]


# ---- baselines ------------------------------------------------------------------------------------


@torch.inference_mode()
def run_sequential(model: Any, reqs: list[tuple[list[int], int]]) -> list[list[int]]:
    outs = []
    for prompt, n in reqs:
        ids = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=n, min_new_tokens=0,
                             do_sample=False)  # fmt: skip
        outs.append(ids[0, len(prompt) :].tolist())
    return outs


@torch.inference_mode()
def run_static(model: Any, reqs: list[tuple[list[int], int]], batch: int = STATIC_BATCH) -> list[list[int]]:
    outs = []
    for i in range(0, len(reqs), batch):
        group = reqs[i : i + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in group], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group], device=model.device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(n for _, n in group),
                             do_sample=False, pad_token_id=0)  # fmt: skip
        outs.extend(gen[j, width : width + n].tolist() for j, (_, n) in enumerate(group))
    return outs


@torch.inference_mode()
def run_hf_cb(model: Any, reqs: list[tuple[list[int], int]], num_blocks: int, max_batch_tokens: int) -> list[list[int]]:
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in reqs), eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=num_blocks, max_batch_tokens=max_batch_tokens, page_size=256)
    results: dict[str, list[int]] = {}
    with model.continuous_batching_context_manager(
        generation_config=gen, continuous_batching_config=cb, block=True, timeout=30, warmup=False
    ) as manager:
        for i, (prompt, n) in enumerate(reqs):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n)
        while len(results) < len(reqs):
            out = manager.get_result(timeout=1)
            if out is not None and out.is_finished():
                results[out.request_id] = list(out.generated_tokens)
    return [results[f"r{i}"] for i in range(len(reqs))]


def run_pagedq(engine: LLMEngine, reqs: list[tuple[list[int], int]], ignore_eos: bool = True) -> list[list[int]]:
    """All requests at once; records per-step KV waste (unused slots / allocated slots) in `engine.bench_waste`."""
    for i, (prompt, n) in enumerate(reqs):
        engine.add_request(f"b{i}", prompt, SamplingParams(max_new_tokens=n, ignore_eos=ignore_eos))
    done: dict[str, list[int]] = {}
    waste = []
    bs = engine.config.block_size
    while len(done) < len(reqs):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.output_token_ids
        running = engine.scheduler.running
        if running:
            allocated = sum(len(engine.kv.req_blocks.get(r.sequence.seq_id, ())) for r in running) * bs
            waste.append(sum(engine.kv.waste_slots(r.sequence) for r in running) / max(allocated, 1))
    engine.bench_waste = waste  # type: ignore[attr-defined]
    return [done[f"b{i}"] for i in range(len(reqs))]


@dataclass
class System:
    """One way of serving a workload: `run` returns greedy outputs; `warm` runs a small subset first."""

    name: str
    run: Callable[[], list[list[int]]]
    warm: Callable[[], Any]
    rounds: int
    engine: LLMEngine | None = None
    key: str = ""  # the results' key ("fp32", "ct2_int8", ...)
    child_cpu: Callable[[], float] | None = None  # CPU seconds so far of the process it runs in, if not this one


def pagedq_system(
    name: str, model: Any, reqs: list, rounds: int, num_blocks: int, caching: bool = True, key: str = ""
) -> System:
    config = EngineConfig(max_batch_tokens=4096, max_running_requests=64, enable_prefix_caching=caching,
                          kv_cache_dtype=peers_ct2.kv_cache_dtype_of(name))  # fmt: skip
    engine = LLMEngine(model, config=config, namespace=name, num_blocks=num_blocks)

    def run() -> list[list[int]]:
        engine.kv.pool.reset_prefix_cache()  # every timed run starts cold
        return run_pagedq(engine, reqs)

    return System(name, run, lambda: run_pagedq(engine, reqs[:4]), rounds, engine, key or name.removeprefix("pagedq "))


PAGEDQ_ROWS = ("fp32", "bf16", "int8", "int8_kv_bf16")  # the results' keys of pagedq's rows


def measure(systems: list[System], tokens: int) -> dict[str, Result]:
    """Warm every system, then time them round-robin (a noisy shared machine hits all of them alike)."""
    for system in systems:
        system.warm()
    results = {s.name: Result(s.name, tokens) for s in systems}
    for i in range(max(s.rounds for s in systems)):
        for system in systems:
            if i >= system.rounds:
                continue
            res, engine = results[system.name], system.engine
            before = engine.stats() if engine else None
            cpu_of = system.child_cpu or time.process_time
            start, cpu = time.perf_counter(), cpu_of()
            res.outputs = system.run()
            res.seconds.append(time.perf_counter() - start)
            res.cpu_seconds.append(cpu_of() - cpu)
            if engine:
                res.extra = engine_extra(engine, before)
    return results


def engine_extra(engine: LLMEngine, before: Any) -> dict[str, float]:
    """Steps, mean batch tokens, KV waste and prefix hits of the latest run (stats are cumulative)."""
    after = engine.stats()
    steps = after.num_steps - before.num_steps
    batched = after.mean_batch_tokens * after.num_steps - before.mean_batch_tokens * before.num_steps
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    waste = engine.bench_waste  # type: ignore[attr-defined]
    return {
        "steps": steps,
        "mean_batch_tokens": batched / max(steps, 1),
        "kv_waste": statistics.mean(waste) if waste else 0.0,
        "prefix_hit_rate": hits / max(after.prefix_cache_queries - before.prefix_cache_queries, 1),
        "prefix_hits": hits,
    }


# ---- workloads ------------------------------------------------------------------------------------


def w1(args: argparse.Namespace, model: Any) -> dict[str, Result]:
    reqs = w1_requests(args.requests)
    warm = reqs[:2]
    systems = []
    if not args.skip_baselines:
        ref = copy.deepcopy(model)  # own config: the engine and HF CB switch attention implementations
        cb_model = copy.deepcopy(model)
        blocks = len(reqs) * 2 + 8  # page_size 256: at most 384 tokens per request
        n, tok = args.baseline_repeats, args.hf_batch_tokens
        systems += [
            System("sequential generate", lambda: run_sequential(ref, reqs), lambda: run_sequential(ref, warm), n,
                   key="sequential"),
            System("static batches of 16", lambda: run_static(ref, reqs), lambda: run_static(ref, warm), n,
                   key="static"),
            System("transformers continuous batching", lambda: run_hf_cb(cb_model, reqs, blocks, tok),
                   lambda: run_hf_cb(cb_model, warm, blocks, tok), n, key="hf_cb"),
        ]  # fmt: skip
    num_blocks = len(reqs) * 24 + 64  # 384 tokens / 16 per request, plus slack: no preemption
    systems.append(pagedq_system("pagedq fp32", copy.deepcopy(model), reqs, args.repeats, num_blocks))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    systems.append(pagedq_system("pagedq bf16", bf16, reqs, args.repeats, num_blocks))
    int8, why = peers_ct2.pagedq_int8(model)
    print(why)
    if int8 is not None:
        try:
            systems.append(pagedq_system("pagedq int8", int8, reqs, args.repeats, num_blocks))
            systems.append(pagedq_system("pagedq int8" + peers_ct2.KV_BF16_ROW, copy.deepcopy(int8), reqs, args.repeats,
                                         num_blocks, key="int8_kv_bf16"))  # fmt: skip
        except ValueError as refused:  # the engine's load-time self-check (UnsupportedModel)
            print(f"pagedq int8 skipped: the engine refused the int8 model: {refused}")
    systems += ct2_systems(args, model, reqs)
    res = measure(systems, sum(n for _, n in reqs))
    return {s.key: res[s.name] for s in systems}


W1_BATCHINGS = [peers_ct2.Batching("examples", n) for n in (4, 8, 16)] + [peers_ct2.Batching("tokens", 2048)]


def ct2_systems(args: argparse.Namespace, model: Any, reqs: list[tuple[list[int], int]]) -> list[System]:
    """CTranslate2 fp32 and int8 (module docstring), or none, with a line saying why."""
    if args.skip_peers:
        return []
    if not peers_ct2.available():
        print(peers_ct2.SKIPPED)
        return []
    with peers_ct2.temp_dir() as tmp:  # a loaded Generator holds its weights: the files can go
        path, tokens = peers_ct2.convert_llama(model, Path(tmp))
        generators = {  # each in its own process, as users run it (peers_ct2's docstring)
            p: peers_ct2.start("generator", path, ct, args.threads, tokens) for p, ct in peers_ct2.COMPUTE_TYPES.items()
        }

    def run(generator: PeerProcess, batching: peers_ct2.Batching, subset: list[tuple[list[int], int]]
            ) -> list[list[int]]:
        return generator.call("generate", subset, batching)  # type: ignore[no-any-return]

    if args.ct2_batching:
        kind, size = args.ct2_batching.split(":")
        batching = peers_ct2.Batching(kind, int(size))
    else:
        run(generators["int8"], W1_BATCHINGS[0], reqs[:2])  # warm-up
        batching, tried = peers_ct2.best_batching(lambda b: run(generators["int8"], b, reqs), W1_BATCHINGS)
        print("ctranslate2 int8 batching, one run each: " + "; ".join(f"{k} {v:.1f} s" for k, v in tried.items()))
    args.ct2_note = (
        f"ctranslate2 rows: {batching} (both precisions), each chunk decoded to its longest target (min_length ="
        f" max_length, EOS never stops it), each request's own tokens kept and counted; intra_threads="
        f"{args.threads}, inter_threads=1; each in its own process"
    )
    return [
        System(f"ctranslate2 {p}", lambda g=g: run(g, batching, reqs), lambda g=g: run(g, batching, reqs[:2]),
               args.repeats, key=f"ct2_{p}", child_cpu=g.cpu_seconds)
        for p, g in generators.items()
    ]  # fmt: skip


def w1_flops(config: Any, reqs: list[tuple[list[int], int]]) -> float:
    """Model FLOPs of W1's tokens: every prompt token and every fed generated token (prompt + n - 1) through
    every layer's linear layers, attention (QK^T and PV) over each token's context, the LM head on the n
    generated tokens. Embedding lookups and norms are not counted."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    linear = 2 * layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    total = 0.0
    for prompt, n in reqs:
        fed = len(prompt) + n - 1
        total += fed * linear + 4 * layers * h * fed * (fed + 1) / 2 + 2 * h * config.vocab_size * n
    return total


def w2(args: argparse.Namespace, model: Any) -> tuple[dict[str, Result], float]:
    rng = random.Random(99)
    contexts = [[rng.randrange(3, VOCAB) for _ in range(args.w2_context)] for _ in range(4)]
    reqs = [(ctx + [rng.randrange(3, VOCAB) for _ in range(rng.randint(24, 36))], 32)
            for ctx in contexts for _ in range(args.w2_questions)]  # fmt: skip
    rng.shuffle(reqs)
    tokens = sum(n for _, n in reqs)
    best = (args.w2_questions - 1) * len(contexts) * (args.w2_context // 16) * 16
    num_blocks = 64 * ((args.w2_context + 36 + 32) // 16 + 1) + 64  # 64 running, never preempted
    systems = [
        pagedq_system("pagedq prefix cache on", copy.deepcopy(model), reqs, args.repeats, num_blocks, True),
        pagedq_system("pagedq prefix cache off", copy.deepcopy(model), reqs, args.repeats, num_blocks, False),
    ]
    on, off = measure(systems, tokens).values()
    on.extra["same_as_off"] = sum(a == b for a, b in zip(on.outputs or [], off.outputs or [], strict=True))
    return {"on": on, "off": off}, on.extra["prefix_hits"] / best


# ---- report ---------------------------------------------------------------------------------------


def table(rows: list[Result], baselines: dict[str, Result], floors: dict[str, str] | None = None) -> str:
    """One line per system; with `floors` (W1) also "x best peer" (over the faster CT2 row) and each row's
    GEMM floor share."""
    last = list(baselines)[-1]
    peer = max((r for r in rows if r.name.startswith("ctranslate2")), key=lambda r: r.tok_s, default=None)
    heads = ["system", "tok/s", *[f"x {k}" for k in baselines], "tok/cpu-s", f"x {last} (cpu)"]
    heads += ["x best peer"] if peer else []
    heads += ["GEMM floor"] if floors is not None else []
    heads += ["steps", "batch tok", "KV waste", "prefix hits"]
    lines = [" | ".join(heads), " | ".join("---" for _ in heads)]
    for r in rows:
        ratios = [f"{r.tok_s / b.tok_s:.2f}" for b in baselines.values()]
        e = r.extra
        extra = ["-"] * 4
        if e:
            extra = [f"{e['steps']:.0f}", f"{e['mean_batch_tokens']:.0f}"]
            extra += [f"{e['kv_waste']:.1%}", f"{e['prefix_hit_rate']:.1%}"]
        cpu = [f"{r.tok_cpu_s:.0f}", f"{r.tok_cpu_s / baselines[last].tok_cpu_s:.2f}"]
        cpu += [f"{r.tok_s / peer.tok_s:.2f}"] if peer else []
        cpu += [floors.get(r.name, "-")] if floors is not None else []
        lines.append(" | ".join([r.name, f"{r.tok_s:.0f}", *ratios, *cpu, *extra]))
    return "\n".join(lines)


def plot_w1(res: dict[str, Result], path: Path, note: str) -> str:
    """tok/s per system, as ratios to transformers continuous batching (to pagedq fp32 without baselines)."""
    baseline = res["hf_cb"] if "hf_cb" in res else res["fp32"]
    panel = plots.Panel("ratio: to " + baseline.name, [(r.name, r.tok_s) for r in res.values()], baseline.name)
    return plots.rates(path, "W1: generation, 56M-param Llama, greedy", "generated tokens/s", [panel], note)


def plot_w2(w2res: dict[str, Result], path: Path, note: str) -> str:
    on, off = w2res["on"], w2res["off"]
    panel = plots.Panel("ratio: to the cache off", [(on.name, on.tok_s), (off.name, off.tok_s)], off.name)
    return plots.rates(path, "W2: shared-context QA, prefix caching", "generated tokens/s", [panel], note)


def ct2_checks(model: Any, res: dict[str, Result], reqs: list[tuple[list[int], int]], args: argparse.Namespace
               ) -> dict[str, float]:  # fmt: skip
    """Print CT2's agreement (fp32 with `generate`, int8 with CT2 fp32); pagedq against CT2's best row."""
    if "ct2_fp32" not in res:
        return {}
    if "sequential" in res:
        reference, against = res["sequential"].outputs or [], "generate"
    else:  # --skip-baselines: generate on the first few requests, untimed
        reference, against = run_sequential(copy.deepcopy(model), reqs[: args.ct2_check]), "generate (first few)"
    fp32, int8 = res["ct2_fp32"].outputs or [], res["ct2_int8"].outputs or []
    print("greedy, " + peers_ct2.agreement_line("ctranslate2 fp32", fp32[: len(reference)], reference, against))
    print("greedy, " + peers_ct2.agreement_line("ctranslate2 int8", int8, fp32, "ctranslate2 fp32"))
    for key in ("int8", "int8_kv_bf16"):
        if key in res:
            ours = res[key].outputs or []
            print("greedy, " + peers_ct2.agreement_line(res[key].name, ours, res["fp32"].outputs or [], "pagedq fp32"))
    best_peer = max((res[k] for k in ("ct2_fp32", "ct2_int8")), key=lambda r: r.tok_s)
    ours = max((r for k, r in res.items() if k in PAGEDQ_ROWS), key=lambda r: r.tok_s)
    print(f"best pagedq row: {ours.name}; best peer: {best_peer.name}")
    return {
        "w1_vs_ct2_best": ours.tok_s / best_peer.tok_s,
        "w1_fp32_vs_ct2_fp32": res["fp32"].tok_s / res["ct2_fp32"].tok_s,
    }


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-repeats", type=int, default=1, help="repeats of the (slow) transformers baselines")
    p.add_argument("--hf-batch-tokens", type=int, default=1024)
    p.add_argument("--w2-context", type=int, default=1000)
    p.add_argument("--w2-questions", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ct2-check", type=int, default=8, help="requests generate checks CT2 on with --skip-baselines")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--skip-w2", action="store_true")
    p.add_argument("--skip-peers", action="store_true", help="no CTranslate2 rows")
    p.add_argument(
        "--ct2-batching",
        default="",
        help="CT2 chunks, e.g. examples:8 or tokens:2048 (default: the fastest of a few, tried on the int8 model)",
    )
    p.add_argument("--quick", action="store_true", help="16 requests, 1 repeat, W2 with 8 questions per context")
    plots.add_plot_argument(p)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        args.requests, args.repeats, args.w2_questions = 16, 1, 8
    torch.set_num_threads(args.threads)
    model = w1_model()
    print(f"W1: {args.requests} requests, {sum(x.numel() for x in model.parameters()) / 1e6:.0f}M params, "
          f"{args.threads} threads, median of {args.repeats} (baselines {args.baseline_repeats})")  # fmt: skip
    rates_before = peers_ct2.gemm_rates()  # and after the systems: the faster of the two (this VM's speed drifts)
    res = w1(args, model)
    baselines = {k: res[k] for k in ("sequential", "static", "hf_cb") if k in res} or {"fp32": res["fp32"]}
    reqs = w1_requests(args.requests)
    rates = {k: max(v, rates_before.get(k, 0.0)) for k, v in peers_ct2.gemm_rates().items()}
    flops = w1_flops(model.config, reqs)
    floors = {
        r.name: peers_ct2.floor_share(flops, peers_ct2.precision_of(r.name), rates, statistics.median(r.seconds))
        for r in res.values()
    }
    print(table(list(res.values()), baselines, floors))
    if hasattr(args, "ct2_note"):
        print(args.ct2_note)
    print(f"{peers_ct2.rates_line(rates)}; the run's model FLOPs {flops / 1e9:.0f} G; load average {load_average()}")
    summary = {"w1_bf16_vs_fp32": res["bf16"].tok_s / res["fp32"].tok_s}
    summary |= ct2_checks(model, res, reqs, args)
    run = f"{'--quick: ' if args.quick else ''}{args.requests} requests, median of {args.repeats}"
    print(plot_w1(res, plots.path_for(args.plot, "w1"), run))
    if "sequential" in res:
        same = sum(a == b for a, b in zip(res["fp32"].outputs or [], res["sequential"].outputs or [], strict=True))
        cb_same = sum(a == b for a, b in zip(res["hf_cb"].outputs or [], res["sequential"].outputs or [], strict=True))
        print(f"greedy == generate: pagedq fp32 {same}/{args.requests}, transformers CB {cb_same}/{args.requests}")
        summary = {"w1_vs_hf_cb": res["fp32"].tok_s / res["hf_cb"].tok_s,
                   "w1_vs_sequential": res["fp32"].tok_s / res["sequential"].tok_s, **summary,
                   "w1_vs_hf_cb_cpu": res["fp32"].tok_cpu_s / res["hf_cb"].tok_cpu_s}  # fmt: skip
    if not args.skip_w2:
        w2res, hit_rate = w2(args, model)
        print(f"\nW2: 4 contexts x {args.w2_questions} questions, context {args.w2_context} tokens")
        print(table([w2res["on"], w2res["off"]], {"cache off": w2res["off"]}))
        same = w2res["on"].extra["same_as_off"]
        total = 4 * args.w2_questions
        print(f"prefix hits / best possible: {hit_rate:.1%}; greedy outputs equal with/without cache: {same}/{total}")
        run = f"{'--quick: ' if args.quick else ''}4 contexts x {args.w2_questions} questions, median of {args.repeats}"
        print(plot_w2(w2res, plots.path_for(args.plot, "w2"), run))
        summary |= {"w2_prefix_speedup": w2res["on"].tok_s / w2res["off"].tok_s, "w2_hit_rate": hit_rate}
    print(" ".join(f"{k}={v:.2f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()

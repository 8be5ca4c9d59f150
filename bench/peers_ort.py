"""ONNX Runtime: the peer users would pick for W3 (classification), built in the run from the benchmark's own model.

What a user following ONNX Runtime's documentation for BERT on a CPU would do, and what this module does:
  export      torch.onnx.export of the same random-weight BertForSequenceClassification (the TorchScript exporter,
              opset 20, its newest; dynamic axes batch and sequence; inputs input_ids, attention_mask,
              token_type_ids; eager attention: the graph ONNX Runtime's BERT fusions recognise. The dynamo exporter
              works too, but its attention is not fused by them: measured, 0 Attention nodes.)
  fp32        two candidates, the faster kept (`fastest`): the plain export, and the export through
              `onnxruntime.transformers.optimizer` (model_type bert: EmbedLayerNormalization, Attention,
              SkipLayerNormalization, BiasGelu fused), each in a session with ORT_ENABLE_ALL
  int8        `onnxruntime.quantization.quantize_dynamic` of both graphs (the fused one's Attention becomes
              QAttention): weights QInt8 (activations are uint8 in dynamic quantization: U8S8, what the docs advise
              for x86); reduce_range only without VNNI (the docs: it avoids saturation there); per-tensor and
              per-channel; the fastest of the four kept
  running     inputs sorted by length, batches of 32 padded (right) to the batch's longest, attention_mask passed,
              intra_op_num_threads = the benchmark's threads, logits back in the inputs' order
Without onnxruntime/onnx (the `bench` extra) `missing()` returns the line the benchmark prints and skips the peers.
"""

from __future__ import annotations

import copy
import importlib
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SKIPPED = "onnxruntime not installed: peers skipped (pip install 'pagedq[bench]')"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 20  # the newest the TorchScript exporter writes; ONNX Runtime >= 1.17 runs it
BATCH_SIZE = 32  # ONNX Runtime's BERT examples and the pipeline baseline use 32


def missing() -> str | None:
    """None when ONNX Runtime and onnx import, else the line saying the peers are skipped."""
    for name in ("onnxruntime", "onnx"):
        try:
            importlib.import_module(name)
        except ImportError:
            return SKIPPED
    return None


def has_vnni() -> bool:
    """AVX-512 VNNI or AVX-VNNI: int8 dot products without the U8S8 saturation reduce_range works around."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# ---- building the graphs ------------------------------------------------------------------------------------
def export(model: Any, path: Path) -> Path:
    """The classifier as ONNX: a copy with eager attention (the same weights; the graph ORT's fusions expect)."""
    eager = copy.deepcopy(model).eval()
    eager.config._attn_implementation = "eager"
    example = torch.full((2, 16), 5, dtype=torch.long)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on transformers' mask code (shapes stay dynamic)
        torch.onnx.export(
            eager,
            (example, torch.ones_like(example), torch.zeros_like(example)),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUTS),
            output_names=["logits"],
            dynamic_axes={**dynamic, "logits": {0: "batch"}},
        )
    return path


def optimize_bert(path: Path, out: Path, config: Any) -> tuple[Path, dict[str, int]]:
    """ORT's transformer optimizer for BERT (fused attention, LayerNorm, GELU); returns the fused-op counts."""
    from onnxruntime.transformers import optimizer

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    fused = optimizer.optimize_model(
        str(path), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
    )
    fused.save_model_to_file(str(out))
    counts = {op: n for op, n in fused.get_fused_operator_statistics().items() if n}
    return out, counts


def quantize_int8(path: Path, out: Path, per_channel: bool) -> Path:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs every node it skips (to the root logger)
    try:
        quantize_dynamic(
            str(path),
            str(out),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=not has_vnni(),
            extra_options={"DefaultTensorType": TensorProto.FLOAT},  # shape inference stops at the fused contrib ops
        )
    finally:
        root.setLevel(level)  # the caller's logging as it was
    return out


# ---- running ------------------------------------------------------------------------------------------------
def batches(lengths: Sequence[int], batch_size: int = BATCH_SIZE) -> list[list[int]]:
    """Indices of the inputs sorted by length (stable), cut into batches of `batch_size`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_share(lengths: Sequence[int], batch_size: int = BATCH_SIZE) -> float:
    """Share of padding in the token rows when sorted batches are padded to their longest."""
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches(lengths, batch_size))
    return 1 - sum(lengths) / computed


def padded(ids: Sequence[Sequence[int]], batch: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
    """The feeds of one batch: input_ids right-padded to its longest, its attention_mask, token_type_ids 0."""
    width = max(len(ids[i]) for i in batch)
    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, i in enumerate(batch):
        input_ids[row, : len(ids[i])] = ids[i]
        mask[row, : len(ids[i])] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtClassifier:
    """Texts in, logits out (the inputs' order): tokenized together, run in sorted, padded batches of 32."""

    def __init__(self, path: Path, tokenizer: Any, threads: int, batch_size: int = BATCH_SIZE) -> None:
        self.session = session(path, threads)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.bytes = path.stat().st_size

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(texts))["input_ids"]
        out: np.ndarray | None = None
        for batch in batches([len(x) for x in ids], self.batch_size):
            logits = self.session.run(["logits"], padded(ids, batch, self.tokenizer.pad_token_id))[0]
            if out is None:
                out = np.empty((len(ids), logits.shape[-1]), dtype=np.float32)
            out[batch] = logits
        assert out is not None, "no texts"
        return out


def transformers_logits(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = BATCH_SIZE) -> np.ndarray:
    """The reference: transformers' own forward on the same sorted, padded batches."""
    ids = tokenizer(list(texts))["input_ids"]
    out = np.empty((len(ids), model.config.num_labels), dtype=np.float32)
    with torch.inference_mode():
        for batch in batches([len(x) for x in ids], batch_size):
            feeds = {k: torch.from_numpy(v) for k, v in padded(ids, batch, tokenizer.pad_token_id).items()}
            out[batch] = model(**feeds).logits.float().numpy()
    return out


def fastest(
    candidates: dict[str, OrtClassifier], texts: Sequence[str], rounds: int = 1
) -> tuple[str, dict[str, float]]:
    """The candidate with the least median time over `texts` (after one warm-up run each, round-robin)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for classifier in candidates.values():
        classifier.logits(texts)
    for _ in range(rounds):
        for name, classifier in candidates.items():
            start = time.perf_counter()
            classifier.logits(texts)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return min(medians, key=medians.__getitem__), medians


@dataclass
class Peers:
    """The two ORT systems the benchmark times, and how they were chosen (lines to print)."""

    fp32: OrtClassifier
    int8: OrtClassifier
    notes: list[str]


def build(
    model: Any, tokenizer: Any, workdir: Path, threads: int, sample: Sequence[str], log: Callable[[str], None] = print
) -> Peers:
    """Export `model`, make the fp32 and int8 candidates, keep the fastest of each on `sample` (say which)."""
    notes: list[str] = []
    start = time.perf_counter()
    plain = export(model, workdir / "model.onnx")
    fused, counts = optimize_bert(plain, workdir / "model_fused.onnx", model.config)
    notes.append(
        f"exported (TorchScript exporter, opset {OPSET}) and fused by onnxruntime.transformers.optimizer: "
        + ", ".join(f"{op} {n}" for op, n in counts.items())
        + f" ({time.perf_counter() - start:.0f} s)"
    )
    fp32 = {
        "ORT_ENABLE_ALL": OrtClassifier(plain, tokenizer, threads),
        "transformers optimizer + ORT_ENABLE_ALL": OrtClassifier(fused, tokenizer, threads),
    }
    fp32_name, fp32_times = fastest(fp32, sample)
    notes.append(f"fp32 kept: {fp32_name} ({_times(fp32_times, len(sample))})")
    graphs = {"plain": plain, "fused": fused}  # both quantized: the fused graph's Attention becomes QAttention
    int8 = {
        f"{graph} {kind}": OrtClassifier(
            quantize_int8(path, workdir / f"model_int8_{graph}_{kind}.onnx", per_channel), tokenizer, threads
        )
        for graph, path in graphs.items()
        for kind, per_channel in (("per-tensor", False), ("per-channel", True))
    }
    int8_name, int8_times = fastest(int8, sample)
    notes.append(
        f"int8 kept: quantize_dynamic (QInt8 weights, reduce_range={not has_vnni()}) of the {int8_name} graph "
        f"({_times(int8_times, len(sample))})"
    )
    for line in notes:
        log(f"onnxruntime: {line}")
    return Peers(fp32[fp32_name], int8[int8_name], notes)


def _times(medians: dict[str, float], count: int) -> str:
    return ", ".join(f"{name} {count / t:.1f} texts/s" for name, t in medians.items())


# ---- checks -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Agreement:
    max_abs: float  # largest |logit difference|
    labels: float  # share of inputs whose argmax label is the same
    count: int
    distinct: int  # labels the reference predicts: a random-weight model may give one label to every input

    def line(self, what: str) -> str:
        return (
            f"{what}: max |logit diff| {self.max_abs:.1e}, labels agree {self.labels:.1%} of {self.count} "
            f"(the reference predicts {self.distinct} distinct label(s))"
        )


def agreement(logits: np.ndarray, reference: np.ndarray) -> Agreement:
    return Agreement(
        float(np.abs(logits - reference).max()),
        float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        len(reference),
        len(np.unique(reference.argmax(-1))),
    )


def int8_gemm_rate(threads: int, tokens: int = 4096, hidden: int = 768, inner: int = 3072) -> float:
    """Op/s of ONNX Runtime's MatMulInteger (uint8 x int8 -> int32) of an FFN shape: the kernel its int8 uses."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])],
        "gemm",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [tokens, hidden]),
            helper.make_tensor_value_info("b", TensorProto.INT8, [hidden, inner]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [tokens, inner])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    gemm = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        "a": rng.integers(0, 255, (tokens, hidden), dtype=np.uint8),
        "b": rng.integers(-128, 127, (hidden, inner), dtype=np.int8),
    }
    times = []
    for _ in range(6):
        start = time.perf_counter()
        gemm.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 2 * tokens * hidden * inner / statistics.median(times[1:])

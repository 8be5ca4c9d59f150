"""CTranslate2, the peer users would pick for W1 (generation) and W4 (translation): the handbook's "Peers".

The benchmark's own random-weight transformers model is saved with `save_pretrained`, next to an offline
word-level tokenizer over its vocabulary (token i is the string `t<i>`, the model's special ids keep their
usual names), and converted by CTranslate2's own `TransformersConverter`, as a user would with
`ct2-transformers-converter`. The fp32 model is loaded with `compute_type="float32"` or `"int8"` (int8 weights
quantized at load; on CPU int8 and int8_float32 are the same kernels). Inputs go in as the same token ids
pagedq gets (mapped to their token strings, the token-level API), and `sequences_ids` come back.

CTranslate2 has no continuous batching and no per-request output length inside one batch, so it is given the
lengths in advance (generous to it): requests are sorted by length and cut into chunks (of examples or of a
token budget); each chunk is decoded to its longest target (`min_length` = `max_length`, so an end token never
stops it early) and each request keeps only its own tokens. `intra_threads` = the benchmark's threads,
`inter_threads` = 1. Without ctranslate2 installed, `available()` is False and the benchmarks print `SKIPPED`.

Each CTranslate2 model runs in its own process (`start`: a `Peer` in a bench/peer_process.PeerProcess), as
its users run it: its bundled libgomp slows torch's OpenMP threads in any process it has run in (measured
there), which would charge pagedq for a process no deployment has.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peer_process import PeerProcess

SKIPPED = "ctranslate2 not installed: peers skipped (pip install 'pagedq[bench]')"
COMPUTE_TYPES = {"fp32": "float32", "int8": "int8"}  # row suffix -> CT2 compute_type


def available() -> bool:
    return importlib.util.find_spec("ctranslate2") is not None


# ---- conversion -----------------------------------------------------------------------------------------


def vocabulary(size: int, specials: dict[int, str]) -> list[str]:
    """One string per id: `t<i>`, except the special ids (e.g. {0: "</s>"}) the converter looks up by name."""
    return [specials.get(i, f"t{i}") for i in range(size)]


def save_tokenizer(tokens: list[str], specials: dict[str, str], directory: Path) -> None:
    """A word-level fast tokenizer over `tokens` (built offline), saved where `AutoTokenizer` finds it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=specials["unk_token"]))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=word_level, **specials).save_pretrained(directory)


def convert(model: Any, tokens: list[str], specials: dict[str, str], directory: Path) -> Path:
    """Save `model` (+ tokenizer) under directory/hf and convert it to a CTranslate2 fp32 model in directory/ct2."""
    import ctranslate2

    hf, ct2 = directory / "hf", directory / "ct2"
    model.save_pretrained(hf)
    save_tokenizer(tokens, specials, hf)
    converter = ctranslate2.converters.TransformersConverter(str(hf))
    return Path(converter.convert(str(ct2), quantization="float32", force=True))


def convert_llama(model: Any, directory: Path) -> tuple[Path, list[str]]:
    """A Llama: <unk> 0, <s> 1, </s> 2 (W1 never uses them: its prompts are ids 3.. and EOS is ignored)."""
    tokens = vocabulary(model.config.vocab_size, {0: "<unk>", 1: "<s>", 2: "</s>"})
    specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    return convert(model, tokens, specials, directory), tokens


def convert_marian(model: Any, directory: Path) -> tuple[Path, list[str]]:
    """A Marian: </s> and <pad> at the config's ids, <unk> at 1 (OPUS-MT's). The converter drops the last
    token, <pad> (CT2 starts the decoder from a zero embedding instead, which is what <pad>'s row is)."""
    config = model.config
    assert config.pad_token_id == config.vocab_size - 1 and config.eos_token_id != 1
    tokens = vocabulary(config.vocab_size, {config.eos_token_id: "</s>", 1: "<unk>", config.pad_token_id: "<pad>"})
    specials = {"unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<pad>"}
    return convert(model, tokens, specials, directory), tokens


def load(kind: str, path: Path, compute_type: str, threads: int, device: str = "cpu") -> Any:
    """A `ctranslate2.Generator` or `Translator` on `device` ("cpu": one batch at a time on `threads` threads;
    "cuda": the first GPU)."""
    import ctranslate2

    cls = {"generator": ctranslate2.Generator, "translator": ctranslate2.Translator}[kind]
    return cls(str(path), device=device, compute_type=compute_type, inter_threads=1, intra_threads=threads)


class Peer:
    """What a peer process holds: one loaded `Generator` or `Translator` and the token strings of its ids."""

    def __init__(
        self, kind: str, path: Path, compute_type: str, threads: int, tokens: list[str], device: str = "cpu"
    ) -> None:
        self.model, self.tokens = load(kind, path, compute_type, threads, device), tokens

    def generate(self, reqs: Sequence[tuple[list[int], int]], batching: Batching) -> list[list[int]]:
        return generate(self.model, self.tokens, reqs, batching)

    def translate(
        self, sentences: Sequence[list[int]], targets: Sequence[int], beams: int, batching: Batching, eos: int
    ) -> list[list[int]]:
        return translate(self.model, self.tokens, sentences, targets, beams, batching, eos)


def start(
    kind: str, path: Path, compute_type: str, threads: int, tokens: list[str], device: str = "cpu"
) -> PeerProcess:
    """A `Peer` loaded in its own process (it has read `path` when this returns: the files may go)."""
    return PeerProcess(Peer, kind, path, compute_type, threads, tokens, device)


# ---- batching -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batching:
    """How requests are cut into chunks after sorting: `size` examples, or (kind "tokens") as many as keep
    chunk size x longest input within `size` tokens. `key` sorts: "input" (CT2's own order) or "target"."""

    kind: str
    size: int
    key: str = "input"

    def __str__(self) -> str:
        return f"sorted by {self.key} length, chunks of {self.size} {self.kind}"

    def chunks(self, lengths: Sequence[int], targets: Sequence[int]) -> list[list[int]]:
        keys = lengths if self.key == "input" else targets
        order = sorted(range(len(lengths)), key=lambda i: (keys[i], lengths[i], targets[i]))
        chunks: list[list[int]] = [[]]
        for i in order:
            chunk = chunks[-1]
            longest = max([lengths[j] for j in chunk] + [lengths[i]])
            full = len(chunk) >= self.size if self.kind == "examples" else (len(chunk) + 1) * longest > self.size
            if chunk and full:
                chunks.append([])
            chunks[-1].append(i)
        return [c for c in chunks if c]


def generate(
    generator: Any, tokens: list[str], reqs: Sequence[tuple[list[int], int]], batching: Batching
) -> list[list[int]]:
    """W1 on a `ctranslate2.Generator`: greedy, each chunk decoded to its longest target (min = max length, so
    no end token stops it), the prompt forwarded at once (`include_prompt_in_result=False`, the docs' advice
    for long inputs); each request keeps its own `n` tokens."""
    outputs: list[list[int]] = [[] for _ in reqs]
    for chunk in batching.chunks([len(reqs[i][0]) for i in range(len(reqs))], [n for _, n in reqs]):
        longest = max(reqs[i][1] for i in chunk)
        results = generator.generate_batch(
            [[tokens[t] for t in reqs[i][0]] for i in chunk], max_length=longest, min_length=longest,
            include_prompt_in_result=False, beam_size=1,
        )  # fmt: skip
        for i, result in zip(chunk, results, strict=True):
            outputs[i] = result.sequences_ids[0][: reqs[i][1]]
    return outputs


def translate(
    translator: Any, tokens: list[str], sentences: Sequence[list[int]], targets: Sequence[int], beams: int,
    batching: Batching, eos: int,
) -> list[list[int]]:  # fmt: skip
    """W4 on a `ctranslate2.Translator`: each chunk decoded to its longest target less one; each sentence keeps
    its own `target - 1` tokens and `eos` is appended: generate's forced_eos_token_id makes the last token </s>
    whatever the model says (log-prob 0, so beams keep their order), which CT2 cannot force, so that step is
    not decoded (generous to CT2 by one step per sentence). The W4 model's </s> is biased away and
    min = max length, so no hypothesis ends early either."""
    ids = {token: i for i, token in enumerate(tokens)}  # translation results carry token strings only
    outputs: list[list[int]] = [[] for _ in sentences]
    for chunk in batching.chunks([len(s) for s in sentences], targets):
        longest = max(targets[i] for i in chunk) - 1
        results = translator.translate_batch(
            [[tokens[t] for t in sentences[i]] for i in chunk], beam_size=beams, max_decoding_length=longest,
            min_decoding_length=longest, max_input_length=0,
        )  # fmt: skip
        for i, result in zip(chunk, results, strict=True):
            outputs[i] = [ids[t] for t in result.hypotheses[0][: targets[i] - 1]] + [eos]
    return outputs


def best_batching(run: Callable[[Batching], Any], candidates: Sequence[Batching]) -> tuple[Batching, dict[str, float]]:
    """Time one run per candidate (after the caller's warm-up); the fastest, and seconds per candidate."""
    seconds = {}
    for candidate in candidates:
        start = time.perf_counter()
        run(candidate)
        seconds[str(candidate)] = time.perf_counter() - start
    best = min(candidates, key=lambda c: seconds[str(c)])
    return best, seconds


# ---- checks and floors ----------------------------------------------------------------------------------


def agreement(outputs: Sequence[list[int]], reference: Sequence[list[int]]) -> tuple[int, float]:
    """(sequences identical, share of reference tokens before each sequence's first difference)."""
    same = sum(a == b for a, b in zip(outputs, reference, strict=False))
    agreed = 0
    for a, b in zip(outputs, reference, strict=False):
        agreed += next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return same, agreed / max(sum(len(b) for b in reference[: len(outputs)]), 1)


def agreement_line(name: str, outputs: Sequence[list[int]], reference: Sequence[list[int]], against: str) -> str:
    same, share = agreement(outputs, reference)
    checked = min(len(outputs), len(reference))
    return f"{name} vs {against}: {same}/{checked} sequences identical, {share:.1%} of tokens before a difference"


def gemm_rate(dtype: torch.dtype, tokens: int = 4096, hidden: int = 512, inner: int = 2048) -> float:
    """FLOP/s of an FFN-shaped matmul (the W1/W4 models' width) on this machine now, median of 5 after one
    warm-up, as bench/tasks.py measures it. int8: the faster of `torch._int_mm` and pagedq's own int8 layer
    (oneDNN's int8 GEMM; activation quantization included), when that exists."""
    calls: list[Callable[[], Any]] = []
    if dtype == torch.int8:
        a = torch.randint(-127, 127, (tokens, hidden), dtype=dtype)
        b = torch.randint(-127, 127, (hidden, inner), dtype=dtype)
        calls.append(lambda: torch._int_mm(a, b))
        quantize, _ = _int8_quantizer()
        if quantize is not None:
            layer = quantize(torch.nn.Sequential(torch.nn.Linear(hidden, inner)))
            x = torch.randn(tokens, hidden)
            calls.append(lambda: layer(x))
    else:
        x, y = torch.randn(tokens, hidden, dtype=dtype), torch.randn(hidden, inner, dtype=dtype)
        calls.append(lambda: torch.mm(x, y))
    best = 0.0
    with torch.inference_mode():
        for call in calls:
            times = []
            for _ in range(6):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            best = max(best, 2 * tokens * hidden * inner / statistics.median(times[1:]))
    return best


def gemm_rates() -> dict[str, float]:
    """GEMM FLOP/s per precision for each row's floor: fp32, bf16 (as bench/tasks.py) and int8."""
    rates = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    try:
        rates["int8"] = gemm_rate(torch.int8)
    except RuntimeError:  # no int8 matmul in this torch build: int8 rows get no floor share
        pass
    return rates


def rates_line(rates: dict[str, float]) -> str:
    return "GEMM rates now: " + ", ".join(f"{p} {r / 1e9:.0f} GFLOP/s" for p, r in rates.items())


def floor_share(floor_flops: float, precision: str, rates: dict[str, float], seconds: float) -> str:
    """The GEMM floor's share of the measured time: (FLOPs / the precision's GEMM rate) / seconds."""
    rate = rates.get(precision)
    return f"{floor_flops / rate / seconds:.1%}" if rate else "-"


# ---- pagedq int8, the row compared with CT2 int8 ---------------------------------------------------------

QUANTIZATION = "pagedq.worker.engine.cpu.quantization"


def _int8_quantizer() -> tuple[Callable[[Any], Any] | None, str]:
    if importlib.util.find_spec(QUANTIZATION) is None:
        return None, f"pagedq int8 skipped: {QUANTIZATION} is not there"
    quantize = getattr(importlib.import_module(QUANTIZATION), "quantize_int8", None)
    return quantize, "" if quantize else f"pagedq int8 skipped: {QUANTIZATION}.quantize_int8 is not there"


def pagedq_int8(model: Any) -> tuple[Any | None, str]:
    """A copy of fp32 `model` with its linear layers int8 (pagedq's quantization), or None and why not."""
    quantize, why = _int8_quantizer()
    if quantize is None:
        return None, why
    int8 = quantize(copy.deepcopy(model))
    summary = importlib.import_module(QUANTIZATION).quantization_summary(int8)
    return int8, f"pagedq int8: {summary.describe() if summary else QUANTIZATION}"


KV_BF16_ROW = ", bf16 KV"  # the suffix of a pagedq row whose engine stores bf16 K/V (`kv_cache_dtype`)


def kv_cache_dtype_of(name: str) -> str:
    """The `kv_cache_dtype` a pagedq row's engine runs with: "bfloat16" for a "..., bf16 KV" row, else "auto"."""
    return "bfloat16" if name.endswith(KV_BF16_ROW) else "auto"


def precision_of(name: str) -> str:
    """The precision a row's name ends with ("pagedq bf16" -> "bf16"), before any comma ("pagedq int8, bf16 KV"
    computes in int8); fp32 when it names none."""
    last = name.split(",")[0].split()[-1]
    return last if last in ("fp32", "bf16", "int8") else "fp32"


def temp_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="pagedq-ct2-")

"""The native passes of int8 linear layers (worker/engine/cpu/native/int8_linear.c): the activations' per-token
quantization and the products' epilogue, each one pass instead of torch's four or five. They must give torch's
eager arithmetic bit for bit (the engine's results, its self-checks and the fp32 emulation rely on it), on
every build (AVX-512, AVX2, plain C), for any row count, width, stride and bias, and a row of NaN must stay
that row's problem. Also the kernel probe, which a moment of a stolen CPU once sent to the fp32 emulation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pagedq.worker.engine.cpu import quantization
from pagedq.worker.engine.cpu.quantization import EMULATED, INT_MM, ONEDNN, ONEDNN_U8, Int8Linear, quantize_rows


def _lib() -> object:
    lib = quantization._native_passes()
    assert lib is not None, "the native int8 passes did not build (a C compiler is part of the worker's install)"
    return lib


def _activations(rows: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width + 3, generator=g)[:, 1 : width + 1]  # a strided view: rows width + 3 apart
    x[:, min(2, width - 1)] *= 40  # an outlier channel
    if rows > 2:
        x[1] = 0  # an all-zero row (the scale's floor)
    return x


@pytest.mark.parametrize("rows", [1, 3, 17, 300])
@pytest.mark.parametrize("width", [7, 96, 2048])
def test_quantizing_rows_natively_equals_torch(rows: int, width: int) -> None:
    lib = _lib()
    x = _activations(rows, width, seed=rows * 31 + width)
    want_q, want_scale = quantize_rows(x)
    q = torch.empty(rows, width, dtype=torch.int8)
    scale = torch.empty(rows)
    lib.pagedq_quantize_rows(x.data_ptr(), rows, width, x.stride(0), quantization._EPS, 0, q.data_ptr(),  # type: ignore[attr-defined]
                             scale.data_ptr(), torch.get_num_threads())  # fmt: skip
    assert torch.equal(scale, want_scale)
    assert torch.equal(q, want_q.to(torch.int8))
    assert q.abs().max() == 127


def _exact_here(kernel: str) -> None:
    if kernel not in quantization._exact_kernels():
        if kernel == INT_MM:
            pytest.fail("torch._int_mm is not exact here")
        pytest.skip(f"{kernel} is not exact on this CPU (no VNNI): the int_mm cases cover the passes")


@pytest.mark.parametrize("kernel", [INT_MM, ONEDNN_U8])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("rows", "width", "out"), [(1, 96, 5), (3, 7, 40), (17, 512, 2049), (300, 2048, 300)])
def test_an_int8_layer_with_native_passes_equals_its_eager_passes(
    rows: int, width: int, out: int, bias: bool, kernel: str
) -> None:
    """The whole layer: `torch._int_mm` (int32 products, scaled in the native epilogue, in place), or oneDNN's
    u8 x s8 GEMM (activations quantized to uint8 q + 128, the column scale fused, fp32 products)."""
    _exact_here(kernel)
    g = torch.Generator().manual_seed(rows + width)
    layer = Int8Linear(torch.randn(out, width, generator=g) * 0.05, torch.randn(out, generator=g) if bias else None)
    x = _activations(rows, width, seed=7)
    with torch.inference_mode():
        native = layer._native(_lib(), x, kernel)  # type: ignore[arg-type]
        eager = layer._eager(x, kernel)
    assert native.shape == (rows, out) and native.dtype == torch.float32
    assert torch.equal(native, eager)


@pytest.mark.parametrize("width", [64, 1024])
def test_every_exact_kernel_gives_the_emulations_bits(width: int) -> None:
    """Which kernel a layer runs (chosen per shape) does not change its results: up to 1040 input features every
    exact kernel's products, scaled, equal the fp32 emulation's bit for bit."""
    g = torch.Generator().manual_seed(width)
    layer = Int8Linear(torch.randn(300, width, generator=g) * 0.05, torch.randn(300, generator=g))
    x = _activations(9, width, seed=13)
    # oneDNN s8 is left out: a reference kernel on some VNNI CPUs, too slow at this size (its own test below)
    kernels = [k for k in quantization._exact_kernels() if k not in (EMULATED, ONEDNN)]
    with torch.inference_mode():
        emulated = layer._eager(x, EMULATED)
        for kernel in kernels:
            assert torch.equal(layer._native(_lib(), x, kernel), emulated), kernel  # type: ignore[arg-type]
    assert INT_MM in kernels


def test_the_float_epilogue_of_the_fused_onednn_kernel_equals_torch() -> None:
    """oneDNN's int8 GEMM applies the column scale itself: the native pass then takes fp32 products, times
    the row scales, plus the bias (what `_eager` does after `_onednn_linear`)."""
    g = torch.Generator().manual_seed(3)
    products = torch.randn(33, 2500, generator=g) * 100
    row_scale, bias = torch.rand(33, generator=g), torch.randn(2500, generator=g)
    want = products.clone()
    want.t().mul_(row_scale)
    want.add_(bias)
    got = products.clone()
    _lib().pagedq_dequantize(got.data_ptr(), False, 33, 2500, None, row_scale.data_ptr(), bias.data_ptr(),  # type: ignore[attr-defined]
                             got.data_ptr(), torch.get_num_threads())  # fmt: skip
    assert torch.equal(got, want)


def test_the_onednn_kernel_with_native_passes_equals_its_eager_passes() -> None:
    """Where oneDNN's fused int8 GEMM is exact (a VNNI CPU; its kernel may be the slow reference one: small
    shapes), both paths give the same bits."""
    if ONEDNN not in quantization._candidates():
        pytest.skip("oneDNN's fused int8 GEMM is not exact on this CPU (no VNNI): the int_mm tests cover the passes")
    g = torch.Generator().manual_seed(5)
    layer = Int8Linear(torch.randn(24, 40, generator=g) * 0.05, torch.randn(24, generator=g))
    layer._prepared(ONEDNN)
    x = _activations(6, 40, seed=9)
    with torch.inference_mode():
        assert torch.equal(layer._native(_lib(), x, ONEDNN), layer._eager(x, ONEDNN))  # type: ignore[arg-type]


@pytest.mark.parametrize("kernel", [INT_MM, ONEDNN, EMULATED])
def test_an_added_vector_is_the_bias_of_a_layer_without_one(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`layer(x, add=b)` (an LM head plus the BART family's final_logits_bias, added by the dequantize pass)
    gives the bits of `layer(x) + b`; a layer with a bias, or a wrong vector, is refused."""
    if kernel != EMULATED and kernel not in quantization._candidates():
        pytest.skip(f"{kernel} is not exact on this CPU")
    monkeypatch.setattr(quantization, "_layer_kernel", lambda *_: kernel)
    monkeypatch.setattr(quantization, "_forced_emulation", kernel == EMULATED)
    g = torch.Generator().manual_seed(6)
    layer = Int8Linear(torch.randn(300, 48, generator=g) * 0.05, None)
    add = torch.randn(300, generator=g)
    x = _activations(7, 48, seed=3)
    with torch.inference_mode():
        assert torch.equal(layer(x, add=add), layer(x) + add)
        with pytest.raises(ValueError, match="without a bias"):
            Int8Linear(torch.randn(300, 48, generator=g), torch.randn(300, generator=g))(x, add=add)
        with pytest.raises(ValueError, match="fp32"):
            layer(x, add=add.double())


def test_a_row_of_nan_fails_alone() -> None:
    """A request whose activations hold NaN gets NaN; the other rows of the batch keep their results."""
    layer = Int8Linear(torch.randn(64, 96) * 0.05, torch.randn(64))
    x = _activations(5, 96, seed=11).contiguous()
    clean = x.clone()
    x[3, 17] = float("nan")
    with torch.inference_mode():
        got = layer._native(_lib(), x, INT_MM)  # type: ignore[arg-type]
        want = layer._native(_lib(), clean, INT_MM)  # type: ignore[arg-type]
    assert got[3].isnan().all()
    assert torch.equal(torch.cat([got[:3], got[4:]]), torch.cat([want[:3], want[4:]]))


_BUILD_CHECK = textwrap.dedent(
    """
    import torch
    from pagedq.worker.engine.cpu import quantization as Q
    lib = Q._native_passes()
    assert lib is not None
    g = torch.Generator().manual_seed(0)
    for rows, width, out in ((1, 7, 5), (5, 96, 40), (40, 1000, 2049)):
        layer = Q.Int8Linear(torch.randn(out, width, generator=g) * 0.05, torch.randn(out, generator=g))
        x = torch.randn(rows, width + 2, generator=g)[:, 1 : width + 1] * 3
        with torch.inference_mode():
            assert torch.equal(layer._native(lib, x, Q.INT_MM), layer._eager(x, Q.INT_MM)), (rows, width, out)
    print("ok")
    """
)


@pytest.mark.skipif(not os.uname().machine.startswith(("x86_64", "amd64")), reason="x86 targets")
@pytest.mark.parametrize("march", ["haswell", "x86-64"], ids=["avx2", "plain-c"])
def test_the_avx2_and_plain_c_builds_equal_torch(march: str, tmp_path: Path) -> None:
    """The C fallbacks (no AVX-512) build and give the same bits, checked here whatever this CPU has."""
    env = {**os.environ, "PAGEDQ_NATIVE_MARCH": march, "PAGEDQ_NATIVE_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _BUILD_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_probe_looks_again_while_the_emulation_looks_fastest(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel slowed for a moment (a shared VM's stolen core) is timed again, and wins once it runs at its
    speed; a reference kernel hundreds of times slower than the emulation is timed once and dropped."""
    products = {EMULATED: lambda: None, ONEDNN: lambda: None, INT_MM: lambda: None}
    timings = {EMULATED: [1.0, 1.0, 1.0], ONEDNN: [900.0], INT_MM: [20.0, 30.0, 0.5]}
    calls: list[str] = []

    def timed(fn: object, repeats: int = 5, give_up: float = float("inf")) -> float:
        name = next(n for n, f in products.items() if f is fn)
        calls.append(name)
        return timings[name][calls.count(name) - 1]

    monkeypatch.setattr(quantization, "_candidates", lambda: products)
    monkeypatch.setattr(quantization, "_best_seconds", timed)
    monkeypatch.setattr(quantization.time, "sleep", lambda s: None)
    monkeypatch.delenv("PAGEDQ_INT8_KERNEL", raising=False)
    quantization._probe.cache_clear()
    quantization._best_kernel.cache_clear()
    try:
        assert quantization._best_kernel() == INT_MM
    finally:
        quantization._probe.cache_clear()
        quantization._best_kernel.cache_clear()
    assert calls.count(ONEDNN) == 1 and calls.count(INT_MM) == 3 and calls.count(EMULATED) == 3


def test_each_layer_runs_the_fastest_kernel_for_its_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """int_mm wins on small layers and oneDNN's u8 GEMM on an LM head (measured, `_layer_kernel`): each layer is
    timed among the kernels within 10x of the process's best, so a reference kernel is never run on a big
    shape."""
    monkeypatch.setattr(quantization, "_probe", lambda: {EMULATED: 1.0, ONEDNN: 500.0, ONEDNN_U8: 0.6, INT_MM: 0.4})
    monkeypatch.setattr(quantization, "_best_kernel", lambda: INT_MM)
    timed: list[tuple[int, tuple[str, ...]]] = []

    def timings(candidates: dict[str, object], what: str) -> dict[str, float]:
        big = "58101" in what
        timed.append((58101 if big else 512, tuple(candidates)))
        return {EMULATED: 30.0, ONEDNN_U8: 3.0, INT_MM: 5.0} if big else {EMULATED: 0.2, ONEDNN_U8: 0.09, INT_MM: 0.05}

    monkeypatch.setattr(quantization, "_candidates", lambda rows, i, o, kernels: dict.fromkeys(kernels))
    monkeypatch.setattr(quantization, "_timings", timings)
    quantization._layer_kernel.cache_clear()
    try:
        assert quantization._layer_kernel(512, 512) == INT_MM
        assert quantization._layer_kernel(512, 58101) == ONEDNN_U8
    finally:
        quantization._layer_kernel.cache_clear()
    assert [kernels for _, kernels in timed] == [(EMULATED, ONEDNN_U8, INT_MM)] * 2

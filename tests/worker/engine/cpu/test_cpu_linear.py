"""Pre-packed oneDNN linear layers (worker/engine/cpu/linear.py): same results as `F.linear`, re-packed
when the weight changes, the model's parameters and state dict untouched."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from pagedq.worker.engine.cpu import linear as cpu_linear
from pagedq.worker.engine.cpu.host_memory import keep_freed_memory
from pagedq.worker.engine.cpu.linear import PackedLinear, unpack_linears

pytestmark = pytest.mark.skipif(not cpu_linear._op_available(), reason="torch built without oneDNN")


def prepack_linears(model: nn.Module) -> int:
    """The small layers of these tests packed, and every call through oneDNN (the size gates are off)."""
    return cpu_linear.prepack_linears(model, min_weight=0)


@pytest.fixture(autouse=True)
def _every_call_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "MIN_PACKED_FLOPS", 0)
    monkeypatch.setattr(cpu_linear, "MIN_PACKED_FLOPS_BF16", 0)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32, bias=False), nn.LayerNorm(32)).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_outputs_equal_linear_within_rounding(dtype: torch.dtype) -> None:
    model, ref = _mlp().to(dtype), _mlp().to(dtype)
    if dtype not in cpu_linear._PACKABLE:  # a CPU without oneDNN's bf16 path: bf16 layers stay as they are
        assert prepack_linears(model) == 0
        with torch.inference_mode():
            torch.testing.assert_close(model(torch.ones(2, 64, dtype=dtype)), ref(torch.ones(2, 64, dtype=dtype)))
        return
    assert prepack_linears(model) == 2
    assert [type(m) for m in model.modules() if isinstance(m, nn.Linear)] == [PackedLinear, PackedLinear]
    x = torch.randn(3, 17, 64, dtype=dtype)
    with torch.inference_mode():
        got, want = model(x), ref(x)
    assert model[0]._packed is not None  # the oneDNN path ran, not the fallback
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert model.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plus_adds_a_bias_as_the_model_does_or_in_one_rounding(dtype: torch.dtype) -> None:
    """`plus(x, add)` (a seq2seq head's `final_logits_bias`): fp32 the bits of `layer(x) + add`; bf16 the
    product and the sum rounded once (oneDNN's epilogue), so within the model's own two roundings of it (half
    a bf16 step of the product and one of the sum) and no further from the exact sum than they are."""
    torch.manual_seed(1)
    layer = nn.Linear(64, 300, bias=False).to(dtype)
    add = (torch.randn(300) * 4).to(dtype)
    x = torch.randn(9, 64).to(dtype)
    with torch.inference_mode():
        product = layer(x)
        eager = product + add
        layer.__class__ = PackedLinear
        packed = layer(x) + add
        got = layer.plus(x, add)
    exact = x.double() @ layer.weight.double().T + add.double()
    if dtype == torch.float32:
        assert torch.equal(got, packed)
        return
    if dtype not in cpu_linear._PACKABLE:
        assert torch.equal(got, eager)
        return
    def step(t: torch.Tensor) -> torch.Tensor:  # one bf16 step at each value's magnitude
        return 2.0 ** (torch.floor(torch.log2(t.double().abs().clamp_min(2**-60))) - 7)

    assert bool(((got.double() - eager.double()).abs() <= step(product) / 2 + step(eager)).all())
    assert float((got.double() - exact).abs().max()) <= float((packed.double() - exact).abs().max())
    assert not torch.equal(got, packed)  # one rounding, not two: the fused path ran


def test_repacks_when_the_weight_changes() -> None:
    model = _mlp()
    prepack_linears(model)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        model(x)
    with torch.no_grad():
        model[0].weight.mul_(2)  # in place: the version counter moves
    ref = copy.deepcopy(model)  # the copy drops the packed weight
    unpack_linears(ref)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    model[0].weight = nn.Parameter(torch.randn(96, 64))  # replaced
    ref[0].weight = nn.Parameter(model[0].weight.detach().clone())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    model = model.to(torch.bfloat16)  # dtype conversion replaces the data
    with torch.inference_mode():
        assert model(x.bfloat16()).dtype == torch.bfloat16


def test_autograd_and_mixed_dtypes_fall_back_to_linear() -> None:
    layer = nn.Linear(8, 4)
    prepack_linears(layer)
    x = torch.randn(2, 8, requires_grad=True)
    layer(x).sum().backward()  # training still works: F.linear with autograd
    assert x.grad is not None and layer._packed is None
    with torch.inference_mode():
        out = layer(torch.randn(2, 8, dtype=torch.float64).to(torch.float32))
    assert out.shape == (2, 4) and layer._packed is not None
    with torch.inference_mode():  # input dtype differs from the weight's: F.linear raises as usual
        with pytest.raises(RuntimeError):
            layer(torch.randn(2, 8, dtype=torch.bfloat16))


def test_only_plain_cpu_linears_are_switched() -> None:
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4), nn.Linear(4, 4).double())
    assert prepack_linears(model) == 1
    assert [type(m) for m in model] == [PackedLinear, Custom, nn.Linear]
    unpack_linears(model)
    assert type(model[0]) is nn.Linear and "_packed" not in model[0].__dict__


def test_small_layers_and_small_calls_stay_on_mkl(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN's fixed cost per call makes small products slower packed: they keep F.linear."""
    monkeypatch.setattr(cpu_linear, "MIN_PACKED_FLOPS", 1 << 21)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 1024), nn.Linear(1024, 1024))
    assert cpu_linear.prepack_linears(model) == 1  # only the [1024 x 1024] weight reaches MIN_PACKED_WEIGHT
    big = model[2]
    with torch.inference_mode():
        big(torch.randn(1, 1024))  # 1 x 1024 x 1024 = 2^20 < MIN_PACKED_FLOPS: F.linear
        assert big._packed is None
        x = torch.randn(4, 1024)
        torch.testing.assert_close(big(x), nn.functional.linear(x, big.weight, big.bias), rtol=1e-5, atol=1e-5)
        assert big._packed is not None


def test_allocator_settings_apply_on_glibc() -> None:
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory() and keep_freed_memory()


_FAULTS = """
import resource, sys
import pagedq.worker  # what `celery -A pagedq.worker.app` imports first
import torch
def step():  # a beam step's logits: [256, 58101] fp32, 60 MB, mmap'd by glibc whatever its threshold
    torch.empty(256, 58101).fill_(1.0)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize("setting", [None, "0"])
def test_large_tensors_fault_in_huge_pages_in_a_worker_process(setting: str | None) -> None:
    """Importing the worker package before torch asks torch's allocator for transparent huge pages: five
    60 MB blocks fault in 2 MiB at a time instead of 4 KiB (~72,600 faults); THP_MEM_ALLOC_ENABLE=0 wins."""
    import os
    import platform
    import subprocess
    import sys

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if platform.system() != "Linux" or not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages on this host")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, timeout=120,
                         check=True)  # fmt: skip
    faults = int(out.stdout.split()[-1])
    if setting is None:
        assert faults < 20_000, f"{faults} minor faults for five 60 MB blocks"
    else:
        assert faults > 50_000, f"{faults}: the explicit 0 was overridden"


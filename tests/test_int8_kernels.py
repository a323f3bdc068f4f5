"""The LLM.int8() benchmark on CPU, and the Triton kernel against the reference (CUDA only)."""

from __future__ import annotations

import math

import pytest
import torch

from gemvlab.kernels.linear_bench import benchmark_linears
from gemvlab.quant.int8 import QTensor, quantize, quantized_matmul


def test_benchmark_rows_on_cpu() -> None:
    shapes = [(1, 64, 48), (8, 64, 48)]
    rows = benchmark_linears(shapes, ["dense", "gemvlab", "bnb"], device="cpu",
                             dtype=torch.float32, threshold=6.0, outlier_dims=3,
                             outlier_value=8.0, warmup=1, repeats=3, seed=0, progress=False)
    assert [(r["impl"], r["m"]) for r in rows] == [
        (impl, m) for m, _, _ in shapes for impl in ("dense", "gemvlab", "bnb")]
    for row in rows:
        if row["skipped"]:
            assert row["impl"] == "bnb" and row["median_us"] is None
            continue
        assert row["p10_us"] <= row["median_us"] <= row["p90_us"]
        assert row["median_us"] > 0 and row["gbps"] > 0 and row["tflops"] > 0
        assert math.isfinite(row["rel_err"]) and row["max_abs_err"] >= 0
        assert row["device_name"] and row["eager_us"] is None
    by_impl = {(r["impl"], r["m"]): r for r in rows}
    for m, k, n in shapes:
        assert by_impl["dense", m]["rel_err"] < 1e-6
        assert by_impl["gemvlab", m]["rel_err"] < 1e-2
        assert by_impl["dense", m]["weight_bytes"] == 4 * n * k
        assert by_impl["gemvlab", m]["weight_bytes"] == n * k + 4 * n


def test_benchmark_is_seeded() -> None:
    """Same seed, same inputs: the error columns repeat exactly."""
    kwargs = dict(device="cpu", dtype=torch.float32, threshold=6.0, outlier_dims=2,
                  outlier_value=10.0, warmup=0, repeats=1, seed=3, progress=False)
    first, second = (benchmark_linears([(4, 32, 16)], ["gemvlab"], **kwargs) for _ in range(2))
    assert first[0]["rel_err"] == second[0]["rel_err"]


def test_unknown_impl_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown impls"):
        benchmark_linears([(1, 8, 8)], ["fp8"], device="cpu", dtype=torch.float32,
                          threshold=6.0, outlier_dims=0, outlier_value=0.0, warmup=0,
                          repeats=1, seed=0, progress=False)


def _case(m: int, k: int, n: int, dtype: torch.dtype, outliers: int,
          seed: int) -> tuple[torch.Tensor, QTensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    x = torch.randn(m, k, generator=gen)
    cols = torch.randperm(k, generator=gen)[:outliers]
    x[:, cols] = (torch.randint(0, 2, (m, outliers), generator=gen) * 2 - 1) * 9.0
    return x.to(dtype), quantize(w, per_row=True, zeropoint=False)


def _check_against_reference(m: int, k: int, n: int, outliers: int,
                             dtype: torch.dtype) -> None:
    from gemvlab.kernels.int8_triton import llm_int8_linear

    x, qw = _case(m, k, n, dtype, outliers, seed=m * k + n + outliers)
    # The reference runs on the CPU: int8.int8_mm's CUDA path has a transposition bug.
    ref = quantized_matmul(x, qw, per_row=True, zeropoint=False, threshold=6.0)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    out.copy_(llm_int8_linear(x.cuda(), qw.q.cuda(), qw.scale.reshape(-1).cuda(), 6.0).cpu())
    assert out.dtype == dtype and not out.isnan().any()
    eps = torch.finfo(dtype).eps
    err = (out.double() - ref).abs()
    assert (err <= 2 * eps * ref.abs() + 1e-3 * ref.abs().max()).all(), err.max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need CUDA")
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (7, 100, 37), (16, 4096, 512),
                                   (33, 200, 130), (300, 1024, 700), (1, 1000, 4099),
                                   (600, 256, 130)])
@pytest.mark.parametrize("outliers", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference(m: int, k: int, n: int, outliers: int,
                                  dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    _check_against_reference(m, k, n, outliers, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need CUDA")
@pytest.mark.parametrize("m", [1, 2, 3, 6, 13, 16])
@pytest.mark.parametrize("k,n", [(333, 77), (768, 40), (4096, 96)])
@pytest.mark.parametrize("outliers", ["none", "few", "half", "all"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_decode_matches_reference(m: int, k: int, n: int, outliers: str,
                                         dtype: torch.dtype) -> None:
    """Decode sizes (M <= SMALL_M): ragged K and N, K off the 512-wide tile, and outlier lists
    from empty to every column (then the int8 part is all zeros)."""
    pytest.importorskip("triton")
    count = {"none": 0, "few": 4, "half": k // 2, "all": k}[outliers]
    _check_against_reference(m, k, n, count, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need CUDA")
@pytest.mark.parametrize("m", [1, 5, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_codes_are_quantize_codes(m: int, dtype: torch.dtype) -> None:
    """With W = 127 I and s_w = 1 the output is 127 s_x q_x, so every int8 code of x shows:
    they must be those of ``quantize``, ties to even included (rows whose absmax is 127 have
    s_x = 1, so x = j + 0.5 is a tie)."""
    pytest.importorskip("triton")
    from gemvlab.kernels.int8_triton import llm_int8_linear

    k = 64
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    x[::2, 1] = 127.0
    x[:, 2:10] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -125.5, 3.5])
    x[:, 10] = 300.0  # the one outlier column at threshold 200
    x = x.to(dtype)
    regular = x.float().masked_fill(torch.arange(k) == 10, 0.0)
    xq = quantize(regular, per_row=True, zeropoint=False)
    q_w = (127 * torch.eye(k)).to(torch.int8)
    y = llm_int8_linear(x.cuda(), q_w.cuda(), torch.ones(k).cuda(), 200.0).cpu().double()
    codes = torch.round(y / (127 * xq.scale.double()))
    codes[:, 10] = 0
    assert torch.equal(codes.to(torch.int8), xq.q)
    assert torch.equal(y[:, 10], (x[:, 10].double() * 127).to(dtype).double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need CUDA")
@pytest.mark.parametrize("m", [5, 24])
def test_triton_bias_and_threshold_off(m: int) -> None:
    pytest.importorskip("triton")
    from gemvlab.kernels.int8_triton import llm_int8_linear

    x, qw = _case(m, 96, 40, torch.float16, 4, seed=1)
    bias = torch.randn(40)
    ref = quantized_matmul(x, qw, per_row=True, zeropoint=False, threshold=None) + bias.double()
    out = llm_int8_linear(x.cuda(), qw.q.cuda(), qw.scale.cuda(), 0.0, bias=bias.cuda()).cpu()
    assert torch.allclose(out.double(), ref, rtol=2e-3, atol=2e-3)

"""Packed RTN and GLVQ codes: exact packing, decode GEMVs against the float reference (CPU, and
the Triton kernels on CUDA only), and the decode benchmark and its stage at tiny sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gemvlab.kernels.decode_bench import (
    benchmark_decode,
    benchmark_model_decode,
    random_group_quant,
    random_lattice_quant,
)
from gemvlab.kernels.lattice_gemv import (
    PackedGLVQ,
    PackedLinear,
    PackedRTN,
    glvq_gemv,
    pack_codes,
    pack_glvq,
    pack_rtn,
    plane_widths,
    rtn_gemv,
    unpack_codes,
)
from gemvlab.quant.glvq import GLVQConfig, LatticeQuant, glvq_quantize
from gemvlab.quant.groupwise import GroupQuant, rtn_quantize
from tests.conftest import run_stage

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need CUDA")
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
              "max_position_embeddings": 512}


def _weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * 0.02, torch.randn(256, k, generator=gen)


def _glvq(bits: int, n: int = 24, k: int = 64) -> LatticeQuant:
    """Real GLVQ codes of a small random layer, H = 2/T X^T X of random inputs."""
    w, x = _weights(n, k, seed=bits)
    cfg = GLVQConfig(bits=bits, d=8, group_size=32, steps=2, salience_share=0.0)
    return glvq_quantize(w, 2 / x.shape[0] * x.T @ x, cfg)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip_is_exact_and_takes_b_bits_per_code(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (5, 96), generator=torch.Generator().manual_seed(bits))
    planes = pack_codes(codes, bits)
    assert sum(p.numel() * 4 for p in planes) == 5 * 96 * bits // 8
    assert all(p.dtype == torch.int32 for p in planes)
    assert torch.equal(unpack_codes(planes, bits), codes.int())


def test_planes_and_refusals() -> None:
    assert [plane_widths(b) for b in (2, 3, 4, 7)] == [(2,), (2, 1), (4,), (4, 2, 1)]
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_codes(torch.zeros(2, 48, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="0..3"):
        pack_codes(torch.full((2, 32), 4), 2)
    mixed = LatticeQuant(torch.zeros(2, 64, dtype=torch.int8), torch.eye(8).half()[None], None,
                         torch.ones(2, 2).half(), torch.tensor([2, 3]), 32)
    with pytest.raises(ValueError, match="one bit width"):
        pack_glvq(mixed)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 3])
def test_cpu_rtn_gemv_matches_dequantize(bits: int, m: int) -> None:
    w, _ = _weights(40, 128, seed=m)
    q = rtn_quantize(w, bits, 32)
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(bits))
    ref = x.double() @ q.dequantize().double().T
    assert _rel(rtn_gemv(x, pack_rtn(q)), ref) < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cpu_glvq_gemv_matches_dequantize(bits: int) -> None:
    q = _glvq(bits)
    x = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(bits))
    y = glvq_gemv(x, pack_glvq(q))
    assert y.shape == (2, 1, 24)
    assert _rel(y.reshape(2, 24), x.reshape(2, 64).double() @ q.dequantize().double().T) < 1e-5


@pytest.mark.parametrize("variant", ["no_companding", "shared"])
def test_cpu_glvq_gemv_variants(variant: str) -> None:
    """No mu (no clamp, no expm1), and one G and one mu for the whole layer."""
    q = random_lattice_quant(16, 128, 3, 8, 32, torch.Generator().manual_seed(0))
    q = (LatticeQuant(q.codes, q.G, None, q.scale, q.bits, 32) if variant == "no_companding"
         else LatticeQuant(q.codes, q.G[:1], q.mu[:1], q.scale, q.bits, 32))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    assert _rel(glvq_gemv(x, pack_glvq(q)), x.double() @ q.dequantize().double().T) < 1e-5


def test_packed_linear_adds_the_bias() -> None:
    q = random_group_quant(8, 64, 2, 32, torch.Generator().manual_seed(0))
    bias = torch.randn(8)
    x = torch.randn(4, 64)
    ref = x.double() @ q.dequantize().double().T + bias.double()
    assert _rel(PackedLinear(pack_rtn(q), bias)(x), ref) < 1e-5


def test_benchmark_decode_rows_on_cpu() -> None:
    shapes = [(1, 64, 24), (2, 128, 16)]
    rows = benchmark_decode(shapes, [2, 3], ["dense", "rtn", "glvq"], device="cpu",
                            dtype=torch.float32, d=8, group_size=32, warmup=1, repeats=3, seed=0,
                            quantize_max_weights=64 * 24, progress=False)
    keys = [(r["m"], r["impl"], r["bits"]) for r in rows]
    assert keys == [(m, impl, b) for m, _, _ in shapes
                    for impl, bits in (("dense", [32]), ("rtn", [2, 3]), ("glvq", [2, 3]))
                    for b in bits]
    for row in rows:
        assert row["p10_us"] <= row["median_us"] <= row["p90_us"] and row["gbps"] > 0
        assert row["rel_err"] < 1e-5 and row["eager_us"] is None
        assert row["codes"] == ("float" if row["impl"] == "dense"
                                else "quantized" if row["m"] == 1 else "random")
    by = {(r["m"], r["impl"], r["bits"]): r["weight_bytes"] for r in rows}
    assert by[1, "dense", 32] == 4 * 24 * 64
    assert by[1, "rtn", 3] == 24 * 64 * 3 // 8 + 3 * 24 * 2  # codes, fp16 scale, uint8 zero
    # codes, fp16 scale, one 8x8 fp16 G and one fp16 mu per group
    assert by[2, "glvq", 2] == 16 * 128 // 4 + 2 * 16 * 4 + 4 * (2 * 64 + 2)
    with pytest.raises(ValueError, match="unknown impls"):
        benchmark_decode([(1, 32, 8)], [2], ["awq"], device="cpu", dtype=torch.float32, d=8,
                         group_size=32, warmup=0, repeats=1, seed=0, progress=False)


def test_benchmark_model_decode_on_cpu() -> None:
    rows = benchmark_model_decode("llama", TINY_LLAMA, [2], ["dense", "rtn", "glvq"],
                                  device="cpu", dtype=torch.float32, d=8, group_size=32,
                                  prompt_tokens=4, new_tokens=2, warmup=0, repeats=1, seed=0,
                                  progress=False)
    assert [(r["impl"], r["bits"]) for r in rows] == [("dense", 32), ("rtn", 2), ("glvq", 2)]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["decode_s"]) for r in rows)
    dense, rtn, glvq = (r["linear_bytes"] for r in rows)
    assert max(rtn, glvq) < dense / 8


def test_bench_stage_lattice_writes_speed_and_token_metrics(tmp_path) -> None:
    shape = ",".join(f"{k}:{v}" for k, v in TINY_LLAMA.items())
    proc = run_stage("bench", "experiment=llm_int8", "experiment.stage=bench", "bench=glvq_cpu",
                     "bench.shapes=[[1,64,24]]", "bench.bits=[2]", "bench.group_size=32",
                     "bench.repeats=2", f"bench.model.shape={{{shape}}}",
                     "bench.model.new_tokens=2", "bench.model.repeats=1",
                     f"paths.results={tmp_path}", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for impl, bits in (("dense", 32), ("rtn", 2), ("glvq", 2)):
        assert metrics[f"speed/{impl}/{bits}b/1x64x24/median_us"] > 0
        assert metrics[f"speed/{impl}/{bits}b/1x64x24/rel_err"] < 1e-5
        assert metrics[f"speed/{impl}/{bits}b/model/tokens_per_s"] > 0
    assert metrics["decode_ratio/glvq_over_rtn/2b/1x64x24"] > 0
    assert metrics["tokens_ratio/glvq_over_rtn/2b"] > 0


def _triton_case(impl: str, m: int, n: int, k: int, g: int, bits: int,
                 variant: str = "full") -> tuple[GroupQuant | LatticeQuant, PackedRTN | PackedGLVQ]:
    gen = torch.Generator().manual_seed(m * n + k + bits)
    if impl == "rtn":
        q = random_group_quant(n, k, bits, g, gen)
        return q, pack_rtn(q)
    q = random_lattice_quant(n, k, bits, 8, g, gen)
    if variant == "no_companding":
        q = LatticeQuant(q.codes, q.G, None, q.scale, q.bits, g)
    elif variant == "shared":
        q = LatticeQuant(q.codes, q.G[:1], q.mu[:1], q.scale, q.bits, g)
    return q, pack_glvq(q)


@CUDA
@pytest.mark.parametrize("impl", ["rtn", "glvq"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n,k,g", [(1, 40, 128, 32), (3, 77, 256, 64), (1, 4099, 1024, 128),
                                     (2, 300, 11008, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_matches_reference(impl: str, bits: int, m: int, n: int, k: int, g: int,
                                  dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    q, packed = _triton_case(impl, m, n, k, g, bits)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(dtype)
    ref = x.double() @ q.dequantize().double().T
    gemv = rtn_gemv if impl == "rtn" else glvq_gemv
    y = gemv(x.cuda(), packed.to("cuda")).cpu()
    assert y.dtype == dtype and y.shape == (m, n)
    assert _rel(y, ref) < (2e-3 if dtype == torch.float16 else 1e-5)


@CUDA
@pytest.mark.parametrize("variant", ["no_companding", "shared"])
def test_triton_glvq_variants(variant: str) -> None:
    pytest.importorskip("triton")
    q, packed = _triton_case("glvq", 2, 96, 256, 64, 3, variant)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(0))
    ref = x.double() @ q.dequantize().double().T
    assert _rel(glvq_gemv(x.cuda(), packed.to("cuda")).cpu(), ref) < 1e-5


@CUDA
def test_triton_on_real_glvq_codes() -> None:
    pytest.importorskip("triton")
    q = _glvq(3)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)).half()
    ref = x.double() @ q.dequantize().double().T
    assert _rel(glvq_gemv(x.cuda(), pack_glvq(q).to("cuda")).cpu(), ref) < 2e-3

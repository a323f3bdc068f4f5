"""The decode-step operator benchmark (NeuPIMs GPU-model calibration) and its bench stage, at
tiny shapes on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gemvlab.config import compose
from gemvlab.errors import GemvlabError
from gemvlab.kernels.decode_ops_bench import measure_decode_ops
from gemvlab.stage import dispatch, execute

D_MODEL, HEADS, D_FF = 32, 4, 64
ARGS = {"d_model": D_MODEL, "heads": HEADS, "d_ff": D_FF, "batches": [1, 3],
        "contexts": [8, 16], "attn_batches": [1, 2], "device": "cpu", "dtype": torch.float32,
        "warmup": 1, "repeats": 3, "seed": 0}
GEMMS = ("qkv", "proj", "ffn1", "ffn2")
MEASURES = ("median_us", "p10_us", "p90_us", "flops", "bytes")


def _ops(batches: list[int], contexts: list[int], attn_batches: list[int]) -> list[str]:
    """``<op>/b<B>`` of every combination the benchmark should time."""
    return ([f"{op}/b{b}" for op in GEMMS for b in batches]
            + [f"attn_c{c}/b{b}" for c in contexts for b in attn_batches])


@pytest.fixture(scope="module")
def metrics() -> dict[str, float]:
    return measure_decode_ops(**ARGS)


def test_every_op_and_batch_has_every_measure(metrics: dict[str, float]) -> None:
    ops = _ops(ARGS["batches"], ARGS["contexts"], ARGS["attn_batches"])
    expected = {f"gpu/{op}/{m}" for op in ops for m in MEASURES}
    assert set(metrics) == expected
    assert all(isinstance(v, float) for v in metrics.values())


def test_flops_and_bytes_follow_the_shapes(metrics: dict[str, float]) -> None:
    # ffn2 at B=3: x [3, 64] @ W [64, 32] in fp32 (4 bytes).
    b, k, n = 3, D_FF, D_MODEL
    assert metrics["gpu/ffn2/b3/flops"] == 2 * 3 * 64 * 32
    assert metrics["gpu/ffn2/b3/bytes"] == (b * k + k * n + b * n) * 4 == 9344
    # qkv at B=1: x [1, 32] @ W [32, 96].
    assert metrics["gpu/qkv/b1/flops"] == 2 * 1 * 32 * 96
    assert metrics["gpu/qkv/b1/bytes"] == (32 + 32 * 96 + 96) * 4
    # attention at ctx 16, B=2, 4 heads of 8: K and V [2, 4, 16, 8] read, q and out [2, 4, 1, 8].
    assert metrics["gpu/attn_c16/b2/flops"] == 4 * 2 * 4 * 16 * 8
    assert metrics["gpu/attn_c16/b2/bytes"] == (2 * 2 * 4 * 16 * 8 + 2 * 2 * 4 * 8) * 4


def test_times_are_positive_and_ordered(metrics: dict[str, float]) -> None:
    for op in _ops(ARGS["batches"], ARGS["contexts"], ARGS["attn_batches"]):
        p10, med, p90 = (metrics[f"gpu/{op}/{m}"] for m in ("p10_us", "median_us", "p90_us"))
        assert 0 < p10 <= med <= p90, op


def test_element_size_follows_the_dtype() -> None:
    half = measure_decode_ops(**{**ARGS, "dtype": torch.bfloat16, "batches": [1],
                                 "contexts": [8], "attn_batches": [1], "repeats": 1})
    assert half["gpu/proj/b1/bytes"] == (32 + 32 * 32 + 32) * 2


def test_on_row_sees_every_combination() -> None:
    seen: list[str] = []
    measure_decode_ops(**{**ARGS, "repeats": 1, "warmup": 0}, on_row=seen.append)
    assert seen == _ops(ARGS["batches"], ARGS["contexts"], ARGS["attn_batches"])


@pytest.mark.parametrize(("change", "message"), [
    ({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"), ({"d_model": 0}, "d_model"),
    ({"heads": 0}, "heads"), ({"d_ff": -4}, "d_ff"), ({"heads": 5}, "divisible by heads"),
    ({"batches": []}, "batches is empty"), ({"batches": [1, 0]}, "batches"),
    ({"contexts": [0]}, "contexts"), ({"attn_batches": [-2]}, "attn_batches")])
def test_bad_arguments_are_refused(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        measure_decode_ops(**{**ARGS, **change})


def _cfg(tmp_path: Path, bench: str, *overrides: str):
    return compose(["experiment=llm_int8", "experiment.stage=bench", f"bench={bench}",
                    "logger=none", f"paths.results={tmp_path}", *overrides])


def test_bench_stage_decode_ops_writes_every_key(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "neupims_cpu")
    execute("bench", dispatch("bench"), cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    b = cfg.bench
    ops = _ops(list(b.batches), list(b.contexts), list(b.attn_batches))
    for op in ops:
        for m in MEASURES:
            assert f"gpu/{op}/{m}" in metrics, op
        assert metrics[f"gpu/{op}/median_us"] > 0
    assert metrics["gpu/ffn1/b8/flops"] == 2 * 8 * 64 * 256


def test_bench_stage_decode_ops_bad_shape_is_a_clear_error(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "neupims_cpu", "bench.shape.heads=5")
    with pytest.raises(GemvlabError, match="divisible by heads"):
        execute("bench", dispatch("bench"), cfg, tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_bench_stage_neupims_gpu_without_a_gpu_says_so(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "neupims_gpu")
    assert cfg.bench.shape.d_model == 4096 and cfg.bench.kind == "decode_ops"
    with pytest.raises(GemvlabError, match="needs a CUDA GPU.*bench=neupims_cpu"):
        execute("bench", dispatch("bench"), cfg, tmp_path / "run")

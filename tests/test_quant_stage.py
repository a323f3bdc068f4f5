"""Int8 layers in a model, outlier features, and the quantize and bench stages end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from gemvlab.manifest import write_manifest
from gemvlab.quant.int8 import quantize, quantized_matmul
from gemvlab.quant.linear import (
    Int8Linear,
    Int8Scheme,
    decomposition_share,
    quantize_linears,
    weight_bytes,
)
from gemvlab.quant.outliers import collect_hits, outlier_report
from tests.conftest import PROSE, run_stage, tiny_overrides
from tests.tiny import make_llama

LLM_INT8 = Int8Scheme(act="token", weight="channel", zeropoint=False, threshold=6.0)


def test_int8_linear_is_the_quantized_matmul_plus_bias():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    layer = Int8Linear(linear, LLM_INT8)
    x = torch.randn(2, 3, 16)
    x[..., 5] = 9.0  # an outlier dim, decomposed into float
    want = quantized_matmul(x.reshape(-1, 16), quantize(linear.weight, per_row=True,
                                                        zeropoint=False),
                            per_row=True, zeropoint=False, threshold=6.0)
    got = layer(x)
    assert got.shape == (2, 3, 8)
    assert torch.equal(got.reshape(-1, 8), want.float() + linear.bias)
    assert layer.q.dtype == torch.int8 and layer.q.shape == (8, 16)
    torch.testing.assert_close(got, linear(x), atol=0.05, rtol=0.05)
    assert decomposition_share(layer) == pytest.approx(1 / 16)


def test_quantize_linears_skips_the_head_and_counts_bytes_by_hand():
    model = make_llama(vocab_size=40)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert quantize_linears(model, LLM_INT8, skip=["lm_head"]) == len(linears) - 1
    assert isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)
    # hidden 32, intermediate 64, 2 layers, 2 heads of 16, 1 kv head: per layer q 32x32, k and v
    # 16x32, o 32x32, gate and up 64x32, down 32x64. int8 codes 1 byte + one fp32 scale per row.
    rows = 32 + 16 + 16 + 32 + 64 + 64 + 32
    codes = 32 * 32 + 16 * 32 * 2 + 32 * 32 + 64 * 32 * 2 + 32 * 64
    sizes = weight_bytes(model, skip=["lm_head"])
    assert sizes["linear_bytes"] == 2 * (codes + 4 * rows)
    assert sizes["linear_bytes_16bit"] == 2 * 2 * codes
    with torch.no_grad():
        out = model(input_ids=torch.arange(10).unsqueeze(0)).logits
    assert torch.isfinite(out).all()


def test_outlier_report_by_hand():
    # 4 layers, 10 positions, 5 dims (40 layer-position pairs). Dim 1 hits in layers 0 and 2,
    # at positions 0..2 and 0..1: 5 of 40 pairs (12.5%), 3 positions in some layer (30%).
    # Dim 3 hits once, in layer 1 only (25% of layers, 2.5% of pairs): too rare.
    # Dim 4 hits every position of layer 3 only: 10 of 40 pairs, but 25% of layers.
    hits = torch.zeros(4, 10, 5, dtype=torch.bool)
    hits[0, :3, 1] = hits[2, :2, 1] = True
    hits[1, 4, 3] = True
    hits[3, :, 4] = True
    report = outlier_report(hits, min_layer_share=0.25, min_position_share=0.1)
    assert report.dims == [1, 4]
    assert report.layer_share == pytest.approx(0.75)
    assert report.position_share == pytest.approx(1.0)
    assert report.per_layer == [[1], [3], [1], [4]]
    assert outlier_report(hits, 0.5, 0.1).dims == [1]
    assert outlier_report(hits, 0.25, 0.2).dims == [4]


def test_collect_hits_finds_a_planted_outlier_dim():
    model = make_llama(vocab_size=40)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[7] = 500.0  # dim 7 is huge at every attention input
    ids = torch.arange(12).reshape(2, 6)
    hits, largest = collect_hits(model, [ids[:1], ids[1:]], ["q_proj", "gate_proj"], 6.0)
    assert hits.shape == (2, 12, 32)
    report = outlier_report(hits)
    assert report.dims == [7] and report.layer_share == 1.0 and report.position_share == 1.0
    assert largest >= 6.0
    with pytest.raises(ValueError, match="outliers.modules"):
        collect_hits(model, [ids], ["no_such_proj"], 6.0)


@pytest.fixture
def quant_tree(tree):
    """The tiny tree with the model already fetched and an Austen calibration split."""
    calib = tree["resources"] / "data" / "austen" / "calibration.jsonl"
    calib.write_text(json.dumps({"id": "c0", "text": PROSE}) + "\n")
    folder = tree["resources"] / "models" / "tiny"
    shutil.copytree(tree["model_src"], folder)
    write_manifest(folder, {"name": "tiny"}, sorted(p for p in folder.iterdir()))
    return tree


def _metrics(tree, *overrides: str) -> tuple[dict, Path]:
    run = tree["results"] / "_".join(o.replace("=", "-") for o in overrides)
    proc = run_stage("quantize", "experiment=llm_int8", *tiny_overrides(tree), *overrides,
                     f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((run / "metrics.json").read_text()), run


def test_quantize_stage_writes_ppl_bytes_and_the_outlier_analysis(quant_tree):
    metrics, run = _metrics(quant_tree, "method=fp32", "analysis=outliers",
                            "analysis.threshold=0.5")
    assert metrics["layers_quantized"] == 0 and metrics["ppl_austen"] > 1
    assert metrics["hidden"] == 32 and metrics["layers"] == 2
    assert 0 <= metrics["outlier_layer_share"] <= 1
    saved = json.loads((run / "outliers.json").read_text())
    assert len(saved["per_layer"]) == 2 and saved["threshold"] == 0.5


def test_quantize_stage_llm_int8_stays_close_to_fp32(quant_tree):
    fp32, _ = _metrics(quant_tree, "method=fp32")
    int8, _ = _metrics(quant_tree, "method=llm_int8_absmax")
    assert int8["layers_quantized"] == 14
    assert int8["linear_bytes"] < 0.6 * int8["linear_bytes_16bit"]
    assert abs(int8["ppl_austen"] / fp32["ppl_austen"] - 1) < 0.02
    assert "outlier_share_of_dims" in int8


def test_quantize_stage_rejects_an_unknown_method_kind(quant_tree):
    proc = run_stage("quantize", "experiment=llm_int8", *tiny_overrides(quant_tree),
                     "method.kind=int3")
    assert proc.returncode == 1
    assert "method.kind=int3 is unknown" in proc.stderr.strip().splitlines()[-1]


def test_bench_stage_on_cpu_writes_speed_metrics(tmp_path):
    proc = run_stage("bench", "experiment=llm_int8", "experiment.stage=bench", "bench=int8_cpu",
                     "bench.shapes=[[1,64,48],[4,64,48]]", "bench.repeats=2",
                     "bench.warmup=1", f"paths.results={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    for impl in ("dense", "gemvlab"):
        assert metrics[f"speed/{impl}/1x64x48/median_us"] > 0
    assert metrics["speed/gemvlab/4x64x48/rel_err"] < 0.05


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_bench_stage_on_cuda_without_a_gpu_says_so(tmp_path):
    proc = run_stage("bench", "experiment=llm_int8", "experiment.stage=bench", "bench=int8_gpu",
                     f"paths.results={tmp_path}")
    assert proc.returncode == 1
    assert "needs a CUDA GPU" in proc.stderr.strip().splitlines()[-1]


def _weight_only(tree, *overrides: str) -> dict:
    run = tree["results"] / "_".join(o.replace("=", "-") for o in overrides)
    proc = run_stage("quantize", "experiment=glvq", *tiny_overrides(tree), *overrides,
                     f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("method", ["rtn", "gptq", "glvq"])
def test_quantize_stage_weight_only_methods(quant_tree, method):
    calib = [] if method == "rtn" else ["method.calibration.tokens=64",
                                        "method.calibration.seq_len=32"]
    extra = ["method.steps=2"] if method == "glvq" else []
    fp32 = _weight_only(quant_tree, "method=fp32", "+method.bits=32")
    four = _weight_only(quant_tree, f"method={method}", "method.bits=4", "method.group_size=16",
                        *calib, *extra)
    # Per block q 32x32, k and v 16x32, o 32x32, gate and up 64x32, down 32x64: 9216 weights.
    assert four["layers_quantized"] == 14 and four["quantized_weights"] == 2 * 9216
    assert four["calibration_tokens"] == (0 if method == "rtn" else 64)
    if method != "glvq":  # 4-bit codes, an fp16 scale and a 4-bit zero point per 16 weights
        assert four["bits_per_weight"] == pytest.approx(4 + 20 / 16)
    assert four["linear_bytes"] == pytest.approx(four["bits_per_weight"] * 2 * 9216 / 8)
    assert abs(four["ppl_austen"] / fp32["ppl_austen"] - 1) < 0.05


def test_quantize_stage_refuses_more_calibration_than_the_split_has(quant_tree):
    proc = run_stage("quantize", "experiment=glvq", *tiny_overrides(quant_tree), "method=gptq",
                     "method.group_size=16", "method.calibration.tokens=100000")
    assert proc.returncode == 1
    assert "method.calibration.tokens=100000" in proc.stderr.strip().splitlines()[-1]

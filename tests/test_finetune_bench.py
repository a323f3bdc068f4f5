"""The finetuning step benchmark (OFTv2's efficiency comparison) and its bench stage, on a tiny
random Llama on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gemvlab.config import REPO_ROOT, compose
from gemvlab.finetune import step_bench
from gemvlab.finetune.runs import step_metrics
from gemvlab.finetune.step_bench import (
    BLOCK_SIZE,
    LORA_RANK,
    TARGETS,
    benchmark_steps,
    measure_step,
)
from gemvlab.stage import dispatch, execute

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
        "max_position_embeddings": 64, "tie_word_embeddings": True}
MODEL = {"name": "tiny", "model_type": "llama", "shape": TINY}
RUN = {"batch": 1, "seq_len": 16, "device": "cpu", "dtype": "float32", "warmup": 0,
       "repeats": 2, "seed": 0}
PEFT015 = REPO_ROOT / ".whl" / "peft015"


def _linear_dims() -> list[tuple[int, int]]:
    """(in, out) of the seven adapted linear types of one tiny decoder layer."""
    h, i, kv = TINY["hidden_size"], TINY["intermediate_size"], 2 * TINY["head_dim"]
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return [dims[t] for t in TARGETS]


def _measure(impl: str) -> dict:
    return measure_step({**MODEL, **RUN, "impl": impl})


@pytest.mark.parametrize("impl", ["lora", "oft", "oftv2", "peft_lora", "peft_oft"])
def test_step_row_has_finite_times_and_memory(impl: str) -> None:
    row = _measure(impl)
    assert row["oom"] == 0 and row["impl"] == impl and row["model"] == "tiny"
    assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0
    assert 0 < row["p10_ms"] <= row["step_ms"] <= row["p90_ms"]
    assert row["peak_mem_mb"] >= row["base_mem_mb"] > 0
    assert row["trainable_params"] > 0


def test_lora_trainable_params_match_peft_and_the_formula() -> None:
    layers = TINY["num_hidden_layers"]
    expected = layers * sum(LORA_RANK * (k + n) for k, n in _linear_dims())
    assert _measure("lora")["trainable_params"] == expected
    assert _measure("peft_lora")["trainable_params"] == expected


def test_oft_trainable_params_match_peft() -> None:
    """peft stores each 32 x 32 skew-symmetric block by its strict upper triangle (496
    numbers); OFT and OFTv2 learn the same rotation, so their counts agree."""
    blocks = TINY["num_hidden_layers"] * sum(k // BLOCK_SIZE for k, _ in _linear_dims())
    expected = blocks * BLOCK_SIZE * (BLOCK_SIZE - 1) // 2
    assert _measure("peft_oft")["trainable_params"] == expected
    assert _measure("oft")["trainable_params"] == expected
    assert _measure("oftv2")["trainable_params"] == expected


def test_benchmark_steps_skips_peft015_without_its_folder(tmp_path: Path) -> None:
    (row,) = benchmark_steps([MODEL], ["peft015_oft"], peft015_path=str(tmp_path / "none"),
                             progress=False, **RUN)
    assert row["skipped"] == 1 and "install_peft015.sh" in row["reason"]
    assert str(tmp_path / "none") in row["reason"]


@pytest.mark.skipif(not (PEFT015 / "peft").is_dir(),
                    reason="peft 0.15.2 not installed (bash scripts/install_peft015.sh)")
def test_peft015_row_imports_peft_0_15() -> None:
    """peft 0.15.2 learns each block as a full 32 x 32 matrix (skew-symmetrised in the
    forward) and a scale per output feature, so it counts more than peft 0.21 and ours."""
    (row,) = benchmark_steps([MODEL], ["peft015_oft"], peft015_path=str(PEFT015),
                             progress=False, **RUN)
    assert row["peft_version"] == "0.15.2"
    assert row["step_ms"] > 0
    per_layer = sum(k // BLOCK_SIZE * BLOCK_SIZE**2 + n for k, n in _linear_dims())
    assert row["trainable_params"] == TINY["num_hidden_layers"] * per_layer


def test_out_of_memory_is_a_row_not_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*args: object) -> float:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")

    monkeypatch.setattr(step_bench, "_step", no_memory)
    row = _measure("oftv2")
    assert row["oom"] == 1 and "out of memory" in row["reason"]
    assert "step_ms" not in row and row["trainable_params"] > 0


def test_step_metrics_keys_and_ratios_skip_oom_and_skipped_rows() -> None:
    rows = [{"model": "m", "impl": "oft", "step_ms": 30.0, "p10_ms": 29.0, "p90_ms": 31.0,
             "peak_mem_mb": 300.0, "trainable_params": 10, "oom": 0},
            {"model": "m", "impl": "oftv2", "step_ms": 10.0, "p10_ms": 9.0, "p90_ms": 11.0,
             "peak_mem_mb": 200.0, "trainable_params": 10, "oom": 0},
            {"model": "m", "impl": "lora", "peak_mem_mb": 900.0, "oom": 1, "reason": "OOM"},
            {"model": "m", "impl": "peft015_oft", "skipped": 1, "reason": "not installed"}]
    metrics = step_metrics(rows)
    assert metrics["step/oft/m/step_ms"] == 30.0
    assert metrics["ratio/oft_over_oftv2/m/time"] == 3.0
    assert metrics["ratio/oft_over_oftv2/m/memory"] == 1.5
    assert metrics["step/lora/m/oom"] == 1.0 and "step/lora/m/peak_mem_mb" not in metrics
    assert not any(k.startswith(("ratio/oftv2_over_lora", "step/peft015_oft")) for k in metrics)


def test_bench_stage_finetune_writes_step_and_ratio_metrics(tmp_path: Path) -> None:
    """Each row in its own process; a peft015 row without its folder is left out, not fatal."""
    cfg = compose(["experiment=llm_int8", "experiment.stage=bench", "bench=oftv2_cpu",
                   "logger=none", f"paths.results={tmp_path}",
                   "bench.impls=[lora,oftv2,peft015_oft]", f"bench.peft015_path={tmp_path}/no",
                   "bench.batch=1", "bench.seq_len=16", "bench.warmup=0", "bench.repeats=2"])
    cfg.bench.models = OmegaConf.create({"tiny": MODEL})
    execute("bench", dispatch("bench"), cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for impl in ("lora", "oftv2"):
        assert metrics[f"step/{impl}/tiny/step_ms"] > 0
        assert metrics[f"step/{impl}/tiny/peak_mem_mb"] > 0
        assert metrics[f"step/{impl}/tiny/oom"] == 0
    assert metrics["ratio/oftv2_over_lora/tiny/time"] > 0
    assert metrics["ratio/oftv2_over_lora/tiny/memory"] > 0
    assert not any("peft015" in key for key in metrics)

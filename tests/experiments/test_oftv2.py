"""oftv2: LoRA and OFTv2 trained two steps, QOFT on an NF4 base."""

from __future__ import annotations

from tests.experiments.smoke import Setup, run_smoke


def test_oftv2_smoke(setup: Setup):
    run = run_smoke("oftv2", setup)
    f = run.table("quality")
    assert sorted(f["method"]) == ["lora", "oftv2"] and (f["steps_planned"] == 2).all()
    assert f["loss_final"].notna().all()
    assert (f["trainable_params"] > 0).all() and run.perplexity_ok(f["ppl_austen"], 1000)
    z = run.table("zeroshot")
    assert set(z["method"]) == {"lora", "oftv2"} and (z["n"] == 4).all()
    qt = run.table("quantized")
    assert list(qt["method"]) == ["qoft"] and (qt["train_peak_mem_mb"] > 0).all()
    assert "| oftv2_perplexity_vs_lora |" in run.claims

"""commvq: codebooks collected and trained, every quantizer on three tasks, decode speed."""

from __future__ import annotations

from tests.experiments.smoke import Setup, run_smoke


def test_commvq_smoke(setup: Setup):
    run = run_smoke("commvq", setup)
    q = run.table("quality")
    assert sorted(q["setting"]) == ["commvq1", "commvq2", "fp16", "kivi1", "kivi2"]
    assert run.perplexity_ok(q["ppl"], 10000)
    mem = run.table("memory").set_index("setting")
    assert mem.loc["fp16", "reduction_vs_fp16"] == 0
    assert (mem.drop("fp16")["quantized_tokens"] > 0).all()   # the window is smaller here
    assert mem.loc["commvq1", "kv_bytes"] < mem.loc["commvq2", "kv_bytes"] \
        < mem.loc["fp16", "kv_bytes"]
    mse = run.table("mse")
    assert set(mse["setting"]) == {"commvq1", "commvq2", "kivi1", "kivi2"}
    layers = run.layers(*set(mse["model"]))
    assert (mse["value"] > 0).all() and len(mse) == 4 * (layers + 1)   # each layer, and all
    pk = run.table("passkey")
    assert pk["correct"].dropna().isin([0, 1]).all()
    ratio = run.table("decode_ratio")
    assert (ratio["naive_over_commutative"] > 0).all()
    assert "| reduction_87_5pct_at_2bit |" in run.claims

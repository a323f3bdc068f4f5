"""llm_int8: every method on SmolLM2 and absmax on Gemma 3 (the cpu plan runs every method on
both), the outlier analysis, the CPU benchmark."""

from __future__ import annotations

from tests.experiments.smoke import Setup, run_smoke


def test_llm_int8_smoke(setup: Setup):
    run = run_smoke("llm_int8", setup)
    q = run.table("perplexity")
    planned = {(r.config["model"]["name"], r.config["method"]["name"])
               for r in run.workflow.plan["llm_int8"] if r.stage == "quantize"}
    # One row per planned model and method (the threshold ablation is not in this table).
    rows = sorted(zip(q["model"], q["method"], strict=True))
    assert rows == sorted(planned)
    assert {model for model, _ in rows} == {"smollm2-135m", "gemma3-270m"}
    assert {m for model, m in rows if model == "smollm2-135m"} == {m for _, m in planned}
    assert run.perplexity_ok(q["ppl_austen"], 10000)
    assert (run.table("outliers")["hidden"] > 0).all()
    speed = run.table("speed")
    assert set(speed["device"]) == {"cpu"} and (speed["median_us"] > 0).all()
    assert "| llm_int8_best_of_int8 |" in run.claims

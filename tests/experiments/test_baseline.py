"""baseline: both packaged models evaluated (perplexity, lm-eval), and the determinism rerun."""

from __future__ import annotations

from tests.experiments.smoke import Setup, run_smoke


def test_baseline_smoke(setup: Setup):
    run = run_smoke("baseline", setup)
    assert "| ppl_identical_on_rerun |" in run.claims
    ppl = run.table("perplexity")
    assert sorted(ppl["model"].unique()) == ["gemma3-270m", "smollm2-135m"]
    assert run.perplexity_ok(ppl["ppl_austen"], 1000)
    lm = run.table("lm_eval")
    assert set(lm["task"]) == {"piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande",
                               "lambada"}
    assert (lm["n"] == 4).all()

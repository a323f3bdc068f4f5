"""keyformer: every policy at every budget on three tasks, attention mass, kvpress, speed."""

from __future__ import annotations

from tests.experiments.smoke import Setup, run_smoke


def test_keyformer_smoke(setup: Setup):
    run = run_smoke("keyformer", setup)
    acc = run.table("accuracy")
    assert set(acc["task"]) == {"summarization", "coqa", "perplexity"}
    assert (acc.groupby("task").size() == 21).all()
    assert run.perplexity_ok(acc.loc[acc["task"] == "perplexity", "ppl"], 10000)
    full = acc[(acc["policy"] == "full") & (acc["task"] == "summarization")]
    assert (full["rougeL"] == 1.0).all()          # the full summary against itself
    assert (acc["kept_tokens"] <= acc["prompt_tokens"].fillna(acc["kept_tokens"])).all()
    mass = run.table("attention_mass")
    assert len(mass) == run.layers(*set(mass["model"])) + 1     # each layer, and all
    assert mass["keys_for_mass"].dropna().between(0, 1).all()
    peer = run.table("peer")
    assert {"ours_streaming", "kvpress_streaming_llm", "streaming_pair"} <= set(peer["impl"])
    kv_speed = run.table("speed")
    assert (kv_speed.loc[kv_speed["device"] == "cpu", "step_ms"] > 0).all()
    assert "| keyformer_ge_h2o_summarization |" in run.claims

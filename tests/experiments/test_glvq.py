"""glvq: RTN, GPTQ and GLVQ once each at 2 bits, with their exact bits per weight."""

from __future__ import annotations

from tests.experiments.smoke import Setup, run_smoke


def test_glvq_smoke(setup: Setup):
    run = run_smoke("glvq", setup)
    g = run.table("perplexity")
    assert sorted(g["method"]) == ["glvq", "gptq", "rtn"] and (g["bits_per_weight"] > 2).all()
    # No upper bound: 2 bits break SmolLM2-135M under every method, at smoke (7e6 to 3e7 on the
    # real model) as at cpu scale (committed: RTN 3e5, GPTQ 1e5, GLVQ 1152).
    assert run.perplexity_ok(g["ppl_austen"], float("inf"))
    assert "| ordering_2bit |" in run.claims

"""glvq: RTN, GPTQ and GLVQ once each at 2 bits, with their exact bits per weight."""

from __future__ import annotations

from tests.experiments.smoke import Setup, run_smoke


def test_glvq_smoke(setup: Setup):
    run = run_smoke("glvq", setup)
    g = run.table("perplexity")
    assert sorted(g["method"]) == ["glvq", "gptq", "rtn"] and (g["bits_per_weight"] > 2).all()
    assert run.perplexity_ok(g["ppl_austen"], 10000)
    assert "| ordering_2bit |" in run.claims

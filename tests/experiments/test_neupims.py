"""neupims: every system at two batches, an ablation, the calibration, the simulator's speed."""

from __future__ import annotations

from tests.experiments.smoke import Setup, run_smoke


def test_neupims_smoke(setup: Setup):
    run = run_smoke("neupims", setup)
    t = run.table("throughput")
    assert sorted(t["system"].unique()) == ["gpu", "neupims", "npu", "npu_pim"]
    assert (t["tokens"] == t["batch"] * t["iterations"]).all() and (t["tokens_per_s"] > 0).all()
    sp = run.table("speedup")
    assert set(sp["baseline"]) == {"gpu", "npu", "npu_pim"} and len(sp) == 6
    ab = run.table("ablation")
    assert list(ab["interleave"]) == [False, False]
    cal = run.table("calibration_error")
    assert set(cal["split"]) == {"fit", "heldout"} and (cal["median_abs_rel_err"] >= 0).all()
    assert "| speedup_1_6x_over_naive |" in run.claims

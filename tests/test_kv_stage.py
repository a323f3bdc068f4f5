"""The kv_evict_eval stage's config handling: the policies and budgets it plans, and its errors."""

from __future__ import annotations

import pytest

from gemvlab.config import compose
from gemvlab.errors import GemvlabError
from gemvlab.kv.evict.runs import policies, settings
from tests.conftest import run_stage


def test_the_experiment_plans_every_policy_at_every_budget_and_full_once():
    built, budgets = policies(compose(["experiment=keyformer"]).method)
    assert [p.name for p in built] == ["full", "window", "streaming", "h2o", "keyformer"]
    planned = settings(built, budgets)
    assert len(planned) == 1 + 4 * len(budgets)
    assert [label for p, _, label in planned if p.name == "full"] == ["100"]
    keyformer = next(p for p in built if p.name == "keyformer")
    assert (keyformer.score, keyformer.recent_share, keyformer.tau_init, keyformer.tau_end) == (
        "gumbel", 0.3, 1.0, 2.0)


@pytest.mark.parametrize("overrides, message", [
    (["method=fp32"], "method=kv_policies"),
    (["method.budgets=[0.5,1.5]"], "shares of the prompt"),
    (["+method.policies.h2o.window=3"], "method.policies"),
    (["method.policies.h2o.score=magic"], "method.policies"),
])
def test_bad_method_configs_stop_with_one_clear_line(overrides, message):
    cfg = compose(["experiment=keyformer", *overrides])
    with pytest.raises(GemvlabError, match=message):
        policies(cfg.method)


def test_an_eval_without_a_kv_task_is_refused():
    proc = run_stage("kv_evict_eval", "experiment=keyformer", "eval=perplexity", "scale=smoke")
    assert proc.returncode == 1
    assert "has no KV task" in proc.stderr and "eval=kv_summarization" in proc.stderr

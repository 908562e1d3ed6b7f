"""The account-clustered guardrails benchmark (`benchmarks/guardrails_accounts.py`), run for real on a small pool:
whole rollouts through `evaluate_guardrails` and `step` on requests that carry their accounts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import guardrails_accounts as bench


@pytest.mark.slow
def test_healthy_retrain_is_promoted_and_a_recall_drop_rolled_back_on_clustered_traffic(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = bench.main(["--rollouts", "2", "--specs", "fast", "--cases", "identical,recall_drop_20",
                         "--pool-rows", "50000"])  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    assert result["benchmark"] == "guardrails_accounts" and result["rollouts"] == 2 and result["interval_s"] == 5.0
    healthy, bad = result["cases"]["identical"]["fast"], result["cases"]["recall_drop_20"]["fast"]
    for summary in (healthy, bad):
        assert {"rollouts", "rolled_back", "rate", "ci95", "median_decision_s"} <= set(summary)
        assert summary["rollouts"] == 2 and len(summary["ci95"]) == 2
    assert healthy["rolled_back"] == 0 and healthy["promoted"] == 2
    assert bad["rolled_back"] == 2 and bad["promoted"] == 0
    # fast's 15 % tolerance leaves a 20 % drop unresolved in its 200 s shadow: the deadline names the guardrail
    assert bad["by_deadline"] == 0 or bad["undecided_at_deadline"].get("online-recall") == bad["by_deadline"]
    # the traffic the guardrails judged really is clustered: a heavy account recurs, and its labels go together
    window = bad["shadow_window"]
    assert window["busiest_account_requests"] >= 50
    assert window["label_design_effect"] > 1.05


@pytest.mark.slow
def test_accounts_recur_with_correlated_labels_and_the_ablation_gives_each_request_its_own_account() -> None:
    traffic = bench.build_traffic(50_000)
    case = bench.Case(traffic.pool.retrain, bench.BASE_ERROR, 1.0)
    rows = np.random.default_rng(0).integers(0, len(traffic.account), 40_000)
    measured = bench.clustering(traffic, case, rows)
    assert measured.top_account >= 100
    assert measured.label_deff > 1.1
    stream = bench.Stream("canary", 0.5, traffic, case, np.random.default_rng(1), 200.0, 2.0, 0.0, False, "x")
    stream.upto(10.0)
    assert stream.frame["account_id"].is_unique
    sticky = bench.Stream("canary", 0.5, traffic, case, np.random.default_rng(1), 200.0, 2.0, 0.0, True, "y")
    sticky.upto(60.0)
    served = sticky.frame
    arms = served[served["status"] == "ok"].groupby("account_id")["variant"].nunique()
    assert arms.max() == 1  # sticky routing: an account's requests all go to one arm
    assert served["account_id"].value_counts().max() > 1


def test_a_deadline_given_on_the_command_line_replaces_the_phase_s_and_an_unknown_phase_is_refused() -> None:
    from monitoring.rollout.spec import default_spec

    longer = bench.with_deadlines(default_spec(), ["shadow=3600"])
    assert {p.name: p.max_duration_s for p in longer.phases}["shadow"] == 3600
    assert {p.name: p.max_duration_s for p in longer.phases}["canary-5"] == 3600  # the others unchanged
    with pytest.raises(SystemExit, match="no phase shadoww"):
        bench.with_deadlines(default_spec(), ["shadoww=3600"])

"""Scenario files, the verdict on a finished rollout, the traffic plan and the slot's deliberate defects:
pure code, no stack."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mlops.scenarios.judge import Observed, judge, max_challenger_weight, outcome_of
from mlops.scenarios.spec import ScenarioError, available, load_scenario, parse_scenario, resolve
from mlops.traffic import REQUEST_FIELDS, TrafficPlan, transactions
from serving.slot import Defect, SlotState, _degrade

PHASES = [
    {"name": "shadow", "kind": "shadow", "weight": 0.0},
    {"name": "canary-10", "kind": "canary", "weight": 0.1},
    {"name": "canary-100", "kind": "canary", "weight": 1.0},
]


def decision(at: float, to_status: str, phase_index: int = 0, reason: str = "r", from_status: str = "x") -> dict:
    return {"at": at, "from_status": from_status, "to_status": to_status, "phase_index": phase_index, "reason": reason}


def rolled_back(*decisions: dict, errors: int = 0) -> Observed:
    return Observed("rolled_back", list(decisions), PHASES, errors)


def scenario(outcome: str = "rolled_back", **expect: object) -> object:
    return parse_scenario({"name": "s", "expect": {"outcome": outcome, **expect}})


# --- files ----------------------------------------------------------------------------------------


def test_every_shipped_scenario_file_is_valid_and_named_after_its_file() -> None:
    names = available()
    assert len(names) >= 8
    ordered = [s.name for s in resolve("all")]
    assert sorted(ordered) == names
    assert ordered[-2:] == ["no-drift", "drift-retrain"]  # clean traffic first, the retrained champion last
    for name in names:
        assert load_scenario(Path("scenarios") / f"{name}.yaml").name == name


def test_a_bad_scenario_names_every_problem_with_its_location() -> None:
    with pytest.raises(ScenarioError) as error:
        parse_scenario(
            {
                "name": "Bad Name",
                "challenger": {"defect": {"slowness": 3}},
                "traffic": {"rps": -1},
                "expect": {"outcome": "exploded"},
            }
        )
    message = str(error.value)
    for fragment in ("name", "challenger.defect", "slowness", "traffic.rps", "expect.outcome"):
        assert fragment in message


def test_an_unknown_drift_kind_in_the_traffic_is_refused() -> None:
    with pytest.raises(ScenarioError, match="unknown drift kind 'sideways'"):
        parse_scenario({"name": "s", "traffic": {"drift": "sideways"}, "expect": {"outcome": "promoted"}})


def test_an_unknown_scenario_name_lists_the_known_ones() -> None:
    with pytest.raises(ScenarioError, match=r"known: .*healthy-promotion"):
        resolve("no-such-scenario")


def test_a_scenario_file_whose_name_differs_from_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.yaml"
    path.write_text("name: two\nexpect: {outcome: promoted}\n")
    with pytest.raises(ScenarioError, match="must match the file name"):
        load_scenario(path)


def test_a_kill_is_planned_for_one_status_or_once_in_each_of_a_list() -> None:
    one = parse_scenario(
        {"name": "s", "chaos": {"kill": "controller", "when": "shadow"}, "expect": {"outcome": "promoted"}}
    )
    assert one.chaos is not None and one.chaos.when == ["shadow"]
    assert load_scenario(Path("scenarios/controller-restart.yaml")).chaos.when == [
        "shadow",
        "canary",
        "promoted_watching",
    ]
    with pytest.raises(ScenarioError, match=r"chaos\.when"):
        parse_scenario(
            {
                "name": "s",
                "chaos": {"kill": "controller", "when": ["shadow", "later"]},
                "expect": {"outcome": "promoted"},
            }
        )
    with pytest.raises(ScenarioError, match=r"chaos\.when"):
        parse_scenario({"name": "s", "chaos": {"kill": "controller", "when": []}, "expect": {"outcome": "promoted"}})


# --- verdicts ---------------------------------------------------------------------------------------


def test_outcomes_distinguish_a_rollback_before_and_after_promotion() -> None:
    assert outcome_of("succeeded", [decision(0, "shadow"), decision(9, "promoted_watching")]) == "promoted"
    assert outcome_of("rolled_back", [decision(0, "shadow"), decision(5, "rolled_back")]) == "rolled_back"
    after = [decision(0, "shadow"), decision(9, "promoted_watching"), decision(12, "rolled_back")]
    assert outcome_of("rolled_back", after) == "rolled_back_after_promotion"
    assert outcome_of("canary", [decision(0, "canary")]).startswith("undecided")


def test_the_challengers_largest_live_share_comes_from_the_phases_it_entered() -> None:
    assert max_challenger_weight([decision(0, "shadow"), decision(3, "rolled_back")], PHASES) == 0.0
    assert max_challenger_weight([decision(0, "shadow"), decision(3, "canary", 1)], PHASES) == 0.1
    assert max_challenger_weight([decision(0, "shadow"), decision(9, "promoted_watching", 3)], PHASES) == 1.0


def test_a_matching_outcome_within_its_bound_passes_with_the_deciding_reason() -> None:
    decisions = [decision(100, "shadow"), decision(112.5, "rolled_back", 0, "error-rate failed")]
    result = judge(scenario(within_s=60, reason_contains="error"), Observed("rolled_back", decisions, PHASES, 0))
    assert result.passed and result.decision_seconds == 12.5 and result.reason == "error-rate failed"


@pytest.mark.parametrize(
    ("expect", "observed", "complaint"),
    [
        ({"outcome": "promoted"}, rolled_back(decision(0, "rolled_back")), "outcome"),
        ({"within_s": 5}, rolled_back(decision(0, "shadow"), decision(9, "rolled_back")), "9.0s"),
        ({"max_challenger_weight": 0}, rolled_back(decision(0, "canary", 1), decision(2, "rolled_back")), "10%"),
        ({}, rolled_back(decision(0, "shadow"), decision(2, "rolled_back"), errors=3), "3 client"),
        ({"reason_contains": "latency"}, rolled_back(decision(0, "rolled_back", 0, "errors")), "latency"),
        ({"reason_contains": ["decline-rate", "shadow-agreement"]},
         rolled_back(decision(0, "rolled_back", 0, "errors")), "'decline-rate' or 'shadow-agreement'"),
    ],
)  # fmt: skip
def test_each_broken_expectation_fails_the_scenario_and_says_which(
    expect: dict, observed: Observed, complaint: str
) -> None:
    result = judge(scenario(**({"outcome": "rolled_back"} | expect)), observed)
    assert not result.passed
    assert any(complaint in failure for failure in result.failures), result.failures


def test_a_failed_analysis_during_the_watch_is_not_a_second_promotion() -> None:
    decisions = [
        decision(0, "shadow"),
        decision(9, "promoted_watching", 3),
        decision(11, "promoted_watching", 3, "latency-p99 failed (1/2)", from_status="promoted_watching"),
        decision(12, "rolled_back", 3, "latency-p99 failed (2/2)", from_status="promoted_watching"),
    ]
    result = judge(scenario("rolled_back_after_promotion"), Observed("rolled_back", decisions, PHASES, 0))
    assert result.passed, result.failures
    assert result.details["promotions"] == 1 and result.decision_seconds == 12


def test_decided_accepts_any_decision_and_none_needs_no_rollout_and_no_retraining() -> None:
    decided = parse_scenario({"name": "d", "expect": {"outcome": "decided", "retrain": True}})
    rolled = Observed("rolled_back", [decision(0, "shadow"), decision(5, "rolled_back")], PHASES, 0, retrains=1)
    assert judge(decided, rolled).passed
    assert not judge(decided, Observed("none", [], [], 0, retrains=0)).passed  # no retraining, no decision
    quiet = parse_scenario({"name": "q", "expect": {"outcome": "none", "retrain": False}})
    assert judge(quiet, Observed("none", [], [], 0, retrains=0)).passed
    noisy = judge(quiet, Observed("none", [], [], 0, retrains=1))
    assert not noisy.passed and "1 retraining run(s) submitted, expected none" in noisy.failures


def test_a_rollout_decided_twice_fails_even_with_the_right_final_outcome() -> None:
    decisions = [decision(0, "shadow"), decision(5, "promoted_watching"), decision(6, "promoted_watching")]
    result = judge(scenario("promoted"), Observed("succeeded", decisions, PHASES, 0))
    assert not result.passed and "decided more than once" in result.failures[0]


# --- traffic and defects ------------------------------------------------------------------------------


def test_a_traffic_plan_reports_every_bad_value_at_once() -> None:
    with pytest.raises(ValueError) as error:
        TrafficPlan(rps=0, duration_s=-1, label_delay_s=-2, drift="sideways", fraud_rate=2)
    for fragment in ("rps", "duration", "label delay", "drift", "fraud rate"):
        assert fragment in str(error.value)


def test_generated_requests_carry_only_the_request_fields_and_the_true_labels_on_the_side() -> None:
    stream = transactions(TrafficPlan(rps=50, duration_s=10, fraud_rate=0.2, seed=3))
    pairs = [next(stream) for _ in range(600)]
    assert all(set(body) == set(REQUEST_FIELDS) for body, _ in pairs)
    share = sum(label for _, label in pairs) / len(pairs)
    assert 0.1 < share < 0.3


def test_decorrelated_scores_keep_their_distribution_but_lose_the_link_to_the_request() -> None:
    random.seed(0)
    state = SlotState("b")
    scores = [random.random() for _ in range(2000)]  # requests arrive in no particular order of score
    degraded = _degrade(state, Defect(decorrelate=1.0), scores)
    assert abs(sum(degraded) / len(degraded) - sum(scores) / len(scores)) < 0.05
    assert sum(a == b for a, b in zip(scores, degraded, strict=True)) < 100
    assert sorted(degraded) != sorted(scores)  # drawn from the recent scores, not a permutation of the input


def test_flipped_scores_reverse_the_decision_for_about_their_share() -> None:
    random.seed(1)
    degraded = _degrade(SlotState("b"), Defect(flip_share=0.2), [0.05] * 2000)
    assert 0.15 < sum(s == 0.95 for s in degraded) / 2000 < 0.25


def test_a_defect_with_an_unknown_field_or_out_of_range_value_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown defect field"):
        Defect.from_dict({"slowness": 1})
    with pytest.raises(ValueError, match="error_rate must be within"):
        Defect.from_dict({"error_rate": 1.5})


def test_failed_client_requests_are_reported_verbatim_with_when_they_failed() -> None:
    from mlops.traffic import TrafficStats

    stats = TrafficStats(started_at=1_000.0)
    for status in (503, 503, 500, 503):
        stats.record_failure(f"HTTP {status}: no model could answer this request")
    assert stats.failed == 4 and len(stats.errors) == 4
    assert all(error.startswith("t=") and "s (" in error and "): HTTP 50" in error for error in stats.errors)
    observed = Observed("rolled_back", [decision(0, "shadow"), decision(2, "rolled_back")], PHASES, 4, stats.summary())
    failure = next(f for f in judge(scenario("rolled_back"), observed).failures if "client request" in f)
    assert failure.startswith("4 client request(s) failed") and "first: t=" in failure
    assert failure.count("HTTP 5") == 3, "the first three, so an intermittent failure says what and when"


# --- a scenario's own rollout spec, hooks and gates ---------------------------------------------------------------


def test_a_scenarios_rollout_section_is_the_bundled_spec_with_its_fields_replaced_and_hook_urls_filled() -> None:
    parsed = parse_scenario(
        {
            "name": "s",
            "rollout": {
                "spec": "fast",
                "post_promotion_watch_s": 4,
                "hooks": [{"name": "team", "url": "{receiver}/notify", "events": ["promoted"]},
                          {"name": "pager", "url": "{dead}", "events": ["promoted"]}],
            },
            "expect": {"outcome": "promoted"},
        }
    )  # fmt: skip
    document = parsed.rollout.document("http://127.0.0.1:5000", "http://127.0.0.1:6000/gone")
    assert document["name"] == "fast" and document["post_promotion_watch_s"] == 4
    assert [h["url"] for h in document["hooks"]] == ["http://127.0.0.1:5000/notify", "http://127.0.0.1:6000/gone"]
    assert parsed.rollout.uses_receiver and parsed.rollout.dead_hooks
    assert parsed.rollout.document("a", "b")["hooks"][0]["url"] == "a/notify", "the scenario itself is not changed"


def test_a_scenarios_bad_rollout_spec_is_refused_at_load_by_the_controllers_loader_naming_the_field() -> None:
    bad = {"name": "s", "expect": {"outcome": "rolled_back"}, "rollout": {"phases": [
        {"name": "replay", "kind": "replay", "requests": 0, "min_samples": 10}]}}  # fmt: skip
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(bad)
    assert "rollout.phases[0].requests: must be > 0, got 0" in str(caught.value)
    with pytest.raises(ScenarioError, match=r"rollout\.spec: no bundled spec 'nope'"):
        parse_scenario({"name": "s", "expect": {"outcome": "promoted"}, "rollout": {"spec": "nope"}})


def test_the_hook_scenarios_carry_their_own_specs() -> None:
    veto = load_scenario(Path("scenarios/hook-veto.yaml"))
    gate = veto.rollout.validated().hooks_for("confirm-promotion")[0]
    assert (gate.gate_timeout_s, gate.on_timeout) == (6, "rollback") and veto.rollout.receiver.answers == {
        "confirm-promotion": 503
    }
    replay = load_scenario(Path("scenarios/replay-catches.yaml"))
    assert replay.rollout.validated().phases[0].kind == "replay" and replay.traffic.warmup_s > 0
    approval = load_scenario(Path("scenarios/approval-gate.yaml"))
    assert [p.require_approval for p in approval.rollout.validated().phases] == [False, False, True, False]


def test_where_the_decision_was_taken_the_gate_hold_and_the_hooks_are_judged() -> None:
    phases = [{"name": "replay", "kind": "replay", "weight": 0.0}, *PHASES]
    replay = scenario(decided_in="replay")
    assert judge(
        replay, Observed("rolled_back", [decision(1, "replay"), decision(2, "rolled_back", 0)], phases, 0)
    ).passed
    late = judge(replay, Observed("rolled_back", [decision(1, "replay"), decision(5, "rolled_back", 1)], phases, 0))
    assert late.failures == ["decided in phase shadow, expected in replay"]

    held = scenario("promoted", held_s=3)
    approved = {**decision(9, "promoted_watching", 2), "metrics": {"approved": True, "waited_s": 1.5}}
    short = judge(held, Observed("succeeded", [decision(1, "shadow"), approved], PHASES, 0))
    assert short.failures == ["held at the approval gate for 1.5s, expected at least 3s"]

    signed = scenario(received=["promoted", "succeeded"])
    got = [{"event": "promoted", "signature_ok": True}, {"event": "rolled-back", "signature_ok": False}]
    failures = judge(signed, Observed("rolled_back", [decision(1, "rolled_back")], PHASES, 0, received=got)).failures
    assert "the hook receiver never got succeeded (got promoted, rolled-back)" in failures
    assert "1 hook request(s) without a valid signature: rolled-back" in failures


def test_every_delivery_to_the_dead_receiver_must_have_failed_after_all_its_attempts_each_recorded() -> None:
    dead = "http://127.0.0.1:9/gone"
    expect = scenario(dead_attempts=3)

    def delivery(status: str, attempts: int, recorded: int) -> dict:
        log = [{"attempt": i + 1, "error": "ConnectError: refused"} for i in range(recorded)]
        return {"url": dead, "event": "promoted", "status": status, "attempts": attempts, "attempt_log": log}

    def failures(*deliveries: dict) -> list[str]:
        observed = Observed("rolled_back", [decision(1, "rolled_back")], PHASES, 0, deliveries=list(deliveries),
                            dead_url=dead)  # fmt: skip
        return judge(expect, observed).failures

    assert failures(delivery("failed", 3, 3)) == []
    assert failures() == ["no delivery to the dead receiver was recorded"]
    assert failures(delivery("pending", 1, 1))[0].startswith(
        "delivery of promoted to the dead receiver: status pending"
    )
    assert failures(delivery("failed", 3, 2))[0].endswith("3 attempt(s), 2 recorded; expected failed after 3")


def test_a_defect_confined_to_a_slice_touches_only_that_slices_requests() -> None:
    random.seed(2)
    defect = Defect.from_dict({"slice": {"merchant_category": "electronics"}, "flip_share": 1.0})
    rows = [{"merchant_category": "electronics"}, {"merchant_category": "grocery"}] * 500
    inside = [defect.applies_to(row) for row in rows]
    degraded = _degrade(SlotState("b"), defect, [0.1] * len(rows), inside)
    assert degraded[0::2] == [0.9] * 500 and degraded[1::2] == [0.1] * 500


def test_score_scale_above_scales_only_the_scores_at_or_above_the_decision_threshold() -> None:
    state = SlotState("b")
    state.threshold = 0.2
    degraded = _degrade(state, Defect(score_scale_above=0.5), [0.05, 0.19, 0.2, 0.3, 0.9])
    assert degraded == pytest.approx([0.05, 0.19, 0.1, 0.15, 0.45])
    assert Defect(score_scale_above=0.5).active and not Defect().active


def test_a_defect_slice_outside_the_data_schema_is_refused_naming_the_field() -> None:
    with pytest.raises(ScenarioError, match=r"slice\.merchant: not a categorical column"):
        parse_scenario({"name": "s", "challenger": {"defect": {"slice": {"merchant": "x"}, "score_scale_above": 0.3}},
                        "expect": {"outcome": "rolled_back"}})  # fmt: skip
    with pytest.raises(ScenarioError, match=r"slice\.country: unknown category 'XX'"):
        parse_scenario({"name": "s", "challenger": {"defect": {"slice": {"country": "XX"}}},
                        "expect": {"outcome": "rolled_back"}})  # fmt: skip
    with pytest.raises(ScenarioError, match="score_scale_above must be within"):
        parse_scenario({"name": "s", "challenger": {"defect": {"score_scale_above": 2}},
                        "expect": {"outcome": "rolled_back"}})  # fmt: skip


def test_random_decisions_decline_at_the_given_rate_independently_of_the_score() -> None:
    random.seed(3)
    state = SlotState("b")
    state.threshold = 0.2
    scores = [0.9] * 10_000 + [0.01] * 10_000  # the model would decline exactly the first half
    declined = [s >= 0.2 for s in _degrade(state, Defect(random_decisions=0.05), scores)]
    first, second = sum(declined[:10_000]) / 10_000, sum(declined[10_000:]) / 10_000
    assert 0.04 < first < 0.06 and 0.04 < second < 0.06  # the same rate whatever the model's own decision


def test_a_reason_given_as_alternatives_passes_when_the_decision_names_any_one_of_them() -> None:
    observed = rolled_back(decision(0, "rolled_back", 0, "guardrails failed in phase shadow: shadow-agreement"))
    expect = {"outcome": "rolled_back", "reason_contains": ["decline-rate", "shadow-agreement"]}
    assert judge(scenario(**expect), observed).passed

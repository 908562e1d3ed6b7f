"""The fault matrix as data: every stack service as a chaos target, kill | hang | restart, a `faults` group, and
the judge's checks that the platform agrees with the rollout's outcome after a fault and that requests lost
with a dead gateway are counted apart. Pure: the scenarios themselves run in tests/test_scenarios_faults.py."""

from __future__ import annotations

import pytest

from mlops.scenarios.judge import Observed, consistency_failures, judge
from mlops.scenarios.runner import stack_service
from mlops.scenarios.spec import ScenarioError, parse_scenario, resolve

SERVICES = ("mlflow", "control-plane", "gateway", "champion-slot", "challenger-slot", "controller", "drift-monitor")
PLAN = {"champion_version": "1", "champion_slot": "a", "challenger_version": "2", "challenger_slot": "b"}
PHASES = [{"name": "canary-10", "kind": "canary", "weight": 0.1}]


def test_the_faults_group_hangs_and_kills_every_service() -> None:
    faults = resolve("all", group="faults")
    pairs = {(s.chaos.kill, s.chaos.action) for s in faults if s.chaos is not None}
    assert pairs >= {(service, action) for service in SERVICES for action in ("kill", "hang")}
    for scenario in faults:
        assert "Why this phase" in scenario.description or scenario.name in ("challenger-crash", "controller-restart")
        if scenario.chaos is not None and scenario.chaos.action == "hang":
            assert scenario.chaos.for_s <= 5  # short, and within the clients' 10 s deadline
    rest = resolve("all", exclude_group="faults")
    assert {s.name for s in rest} | {s.name for s in faults} == {s.name for s in resolve("all")}
    assert not {s.name for s in rest} & {s.name for s in faults}


def test_a_chaos_target_or_action_outside_the_matrix_is_refused_by_field() -> None:
    with pytest.raises(ScenarioError, match=r"chaos\.kill"):
        parse_scenario({"name": "s", "chaos": {"kill": "database"}, "expect": {"outcome": "promoted"}})
    with pytest.raises(ScenarioError, match=r"chaos\.action"):
        parse_scenario(
            {"name": "s", "chaos": {"kill": "gateway", "action": "pause"}, "expect": {"outcome": "promoted"}}
        )
    with pytest.raises(ScenarioError, match=r"chaos\.for_s"):
        parse_scenario(
            {"name": "s", "chaos": {"kill": "gateway", "action": "hang", "for_s": 0}, "expect": {"outcome": "promoted"}}
        )
    with pytest.raises(ScenarioError, match="no scenario of group"):
        resolve("all", group="no-such-group")


def test_slots_are_targeted_by_their_role_in_the_rollout() -> None:
    assert stack_service("champion-slot", PLAN) == "slot-a"
    assert stack_service("challenger-slot", PLAN) == "slot-b"
    assert stack_service("mlflow", PLAN) == "mlflow"


def final(champion_slot: str = "a", weights: dict | None = None, slots: dict | None = None, **aliases: object) -> dict:
    return {
        "policy": {"weights": weights or {champion_slot: 1.0}, "shadow": False, "champion_slot": champion_slot},
        "slots": slots or {"a": "1", "b": "2"},
        "aliases": {"champion": "1", "challenger": None, "previous": None, **aliases},
        "pending_actions": 0,
    }


def test_a_platform_that_agrees_with_the_outcome_passes() -> None:
    assert consistency_failures("rolled_back", PLAN, final()) == []
    assert consistency_failures("rolled_back_after_promotion", PLAN, final()) == []
    assert consistency_failures("promoted", PLAN, final("b", champion="2", previous="1")) == []


@pytest.mark.parametrize(
    ("outcome", "state", "needle"),
    [
        ("rolled_back", final(champion="2"), "alias champion is 2"),  # the registry says the challenger won
        ("rolled_back", final(challenger="2"), "alias challenger is still set"),
        ("rolled_back", final(weights={"a": 0.9, "b": 0.1}), "still sends"),  # the canary's weights left in force
        ("rolled_back", final("b"), "champion slot is b"),
        ("promoted", final("b", slots={"a": "1", "b": "1"}, champion="2"), "slot b is assigned version 1"),
        ("promoted", final("b"), "alias champion is 1"),  # traffic moved, the alias write was lost
        ("rolled_back", {**final(), "pending_actions": 2}, "2 action(s)"),
        ("rolled_back", {"error": "ConnectError"}, "could not be read"),
    ],
)
def test_each_disagreement_with_the_outcome_is_named(outcome: str, state: dict, needle: str) -> None:
    assert any(needle in problem for problem in consistency_failures(outcome, PLAN, state))


def test_the_judge_fails_a_rollback_the_registry_does_not_show() -> None:
    scenario = parse_scenario({"name": "s", "chaos": {"kill": "mlflow"}, "expect": {"outcome": "rolled_back"}})
    decisions = [{"at": 1.0, "from_status": "canary", "to_status": "rolled_back", "phase_index": 0, "reason": "e"}]
    agreeing = Observed("rolled_back", decisions, PHASES, 0, plan=PLAN, final_state=final())
    assert judge(scenario, agreeing).passed
    stale = Observed("rolled_back", decisions, PHASES, 0, plan=PLAN, final_state=final(challenger="2"))
    result = judge(scenario, stale)
    assert not result.passed and any("challenger is still set" in f for f in result.failures)


def test_requests_lost_with_a_dead_gateway_are_counted_apart_and_bounded() -> None:
    decisions = [{"at": 1.0, "from_status": "canary", "to_status": "rolled_back", "phase_index": 0, "reason": "e"}]

    def run(kill: str, action: str, failed: int, lost: int) -> list[str]:
        scenario = parse_scenario(
            {
                "name": "s",
                "chaos": {"kill": kill, "action": action},
                "expect": {"outcome": "rolled_back", "max_dead_gateway_errors": 10},
            }
        )
        observed = Observed("rolled_back", decisions, PHASES, failed, {"in_flight_lost": lost})
        return judge(scenario, observed).failures

    assert run("gateway", "kill", failed=8, lost=8) == []
    assert any("in flight lost with the gateway, at most 10" in f for f in run("gateway", "kill", failed=12, lost=12))
    assert any("1 client request(s) failed" in f for f in run("gateway", "kill", failed=9, lost=8))
    # With a hung gateway, or any other service's fault, a broken connection is a client error like the rest.
    assert any("8 client request(s) failed" in f for f in run("gateway", "hang", failed=8, lost=8))
    assert any("8 client request(s) failed" in f for f in run("champion-slot", "kill", failed=8, lost=8))


def test_requests_refused_while_no_gateway_listened_are_counted_apart_and_bounded() -> None:
    """A request whose connection was refused (the only gateway restarting) and that was still unanswered at the
    client's deadline is counted apart from the client errors, bounded by `max_gateway_down_errors`, and only
    with a gateway kill or restart: otherwise it is a client error like the rest."""
    decisions = [{"at": 1.0, "from_status": "canary", "to_status": "rolled_back", "phase_index": 0, "reason": "e"}]

    def run(kill: str, action: str, failed: int, lost: int, down: int) -> list[str]:
        expect = {"outcome": "rolled_back", "max_dead_gateway_errors": 10, "max_gateway_down_errors": 20}
        scenario = parse_scenario({"name": "s", "chaos": {"kill": kill, "action": action}, "expect": expect})
        traffic = {"in_flight_lost": lost, "gateway_down": down}
        return judge(scenario, Observed("rolled_back", decisions, PHASES, failed, traffic)).failures

    assert run("gateway", "kill", failed=28, lost=8, down=20) == []
    assert any("21 request(s) refused by a gateway not listening" in f for f in run("gateway", "kill", 29, 8, 21))
    assert any("1 client request(s) failed" in f for f in run("gateway", "kill", failed=29, lost=8, down=20))
    assert any("20 client request(s) failed" in f for f in run("champion-slot", "kill", failed=20, lost=0, down=20))
    assert parse_scenario({"name": "s", "expect": {"outcome": "promoted"}}).expect.max_gateway_down_errors == 0

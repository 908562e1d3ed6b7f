"""Exhaustive tests of the rollout controller's pure state machine (no I/O, no clocks)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from unittest.mock import ANY

import pytest

from monitoring.rollout.state_machine import (
    STATUSES,
    TERMINAL_STATUSES,
    Analysis,
    AnalysisResult,
    AssignSlot,
    Decision,
    ManualAbort,
    ManualPromote,
    MarkRejected,
    Notify,
    PhaseSpec,
    RecordDecision,
    RolloutPlan,
    RolloutState,
    SetAlias,
    SetTraffic,
    SlotDown,
    Start,
    Tick,
    action_from_dict,
    action_to_dict,
    current_phase,
    describe,
    event_from_dict,
    event_to_dict,
    initial_state,
    replay,
    step,
    watch_ends_at,
)

GUARDRAILS = ("error_rate", "p99_latency", "psi")
CHAMPION, CHALLENGER, PREVIOUS = "4", "5", "3"


def make_plan(**overrides) -> RolloutPlan:
    fields = {
        "rollout_id": "r1",
        "model_name": "fraud",
        "challenger_version": CHALLENGER,
        "champion_version": CHAMPION,
        "champion_slot": "a",
        "challenger_slot": "b",
        "phases": (
            PhaseSpec("shadow", "shadow", 0.0, 60.0, 100),
            PhaseSpec("canary-5", "canary", 0.05, 60.0, 100),
            PhaseSpec("canary-50", "canary", 0.5, 120.0, 400),
        ),
        "failure_limit": 2,
        "post_promotion_watch_s": 600.0,
        "previous_version": PREVIOUS,
    }
    fields.update(overrides)
    return RolloutPlan(**fields)


PLAN = make_plan()


def analysis(at: float, index: int, verdict: str = "pass", samples: int = 10_000, **per_guardrail: str) -> Analysis:
    verdicts = {g: per_guardrail.get(g, verdict) for g in GUARDRAILS}
    values = {g: {"challenger": 0.01, "champion": 0.01, "at": at} for g in GUARDRAILS}
    return Analysis(AnalysisResult(at=at, phase_index=index, samples=samples, verdicts=verdicts, values=values))


def go(plan: RolloutPlan, events: list, state: RolloutState | None = None):
    """Apply events one by one, returning the final state and the per-event action lists."""
    state = state if state is not None else initial_state(plan, 0.0)
    per_event = []
    for event in events:
        state, actions = step(plan, state, event)
        per_event.append(actions)
    return state, per_event


def started(plan: RolloutPlan = PLAN, at: float = 0.0) -> RolloutState:
    return step(plan, initial_state(plan, at), Start(at))[0]


def at_phase(index: int, plan: RolloutPlan = PLAN) -> RolloutState:
    """Drive the rollout into phase ``index`` with passing analyses; phase ``i`` starts at ``1000 * i``."""
    state = started(plan)
    for i in range(index):
        state, _ = step(plan, state, analysis(1000.0 * (i + 1), i))
    assert state.phase_index == index and state.status == plan.phases[index].kind
    return state


def promoted(plan: RolloutPlan = PLAN) -> RolloutState:
    last = len(plan.phases) - 1
    state, _ = step(plan, at_phase(last, plan), analysis(1000.0 * (last + 1), last))
    assert state.status == "promoted_watching"
    return state


def assert_ignored(plan: RolloutPlan, state: RolloutState, event) -> None:
    new, actions = step(plan, state, event)
    assert new is state
    assert actions == []


def roundtrip(state: RolloutState) -> RolloutState:
    return RolloutState.from_dict(json.loads(json.dumps(state.to_dict())))


# ----------------------------------------------------------------------------------------------------------------
# Happy path
# ----------------------------------------------------------------------------------------------------------------


def test_initial_state_is_pending_and_undecided():
    state = initial_state(PLAN, 5.0)
    assert state == RolloutState("r1", "pending", 0, 5.0, 0, False, None, 0, ())
    assert not state.terminal
    assert current_phase(PLAN, state) is None


def test_happy_path_shadow_canaries_promote_watch_succeed_with_exact_actions():
    plan = PLAN
    state = initial_state(plan, 0.0)

    state, actions = step(plan, state, Start(10.0))
    assert actions == [
        AssignSlot("b", CHALLENGER),
        SetAlias("challenger", CHALLENGER),
        SetTraffic(0.0, True, "a", ANY),
        RecordDecision(state.history[-1]),
        Notify(ANY),
    ]
    assert (state.status, state.phase_index, state.phase_started_at, state.version) == ("shadow", 0, 10.0, 1)
    assert current_phase(plan, state) == plan.phases[0]

    state, actions = step(plan, state, analysis(70.0, 0))
    assert actions == [SetTraffic(0.05, False, "a", ANY), RecordDecision(state.history[-1]), Notify(ANY)]
    assert (state.status, state.phase_index, state.phase_started_at, state.version) == ("canary", 1, 70.0, 2)

    state, actions = step(plan, state, analysis(130.0, 1))
    assert actions == [SetTraffic(0.5, False, "a", ANY), RecordDecision(state.history[-1]), Notify(ANY)]
    assert (state.status, state.phase_index, state.phase_started_at, state.version) == ("canary", 2, 130.0, 3)
    assert not state.decided

    state, actions = step(plan, state, analysis(250.0, 2, samples=400))
    assert actions == [
        SetAlias("previous", CHAMPION),
        SetAlias("champion", CHALLENGER),
        SetAlias("challenger", None),
        SetTraffic(0.0, False, "b", ANY),
        RecordDecision(state.history[-1]),
        Notify(ANY),
    ]
    assert (state.status, state.phase_index, state.phase_started_at) == ("promoted_watching", 3, 250.0)
    assert state.decided and state.version == 4
    assert watch_ends_at(plan, state) == 850.0
    assert current_phase(plan, state) is None

    # passing watch analyses and early ticks change nothing
    assert_ignored(plan, state, analysis(400.0, 3))
    assert_ignored(plan, state, Tick(849.9))

    state, actions = step(plan, state, Tick(850.0))
    assert actions == [RecordDecision(state.history[-1]), Notify(ANY)]
    assert state.status == "succeeded" and state.terminal and state.decided and state.version == 5

    assert [(d.from_status, d.to_status) for d in state.history] == [
        ("pending", "shadow"),
        ("shadow", "canary"),
        ("canary", "canary"),
        ("canary", "promoted_watching"),
        ("promoted_watching", "succeeded"),
    ]
    promote = state.history[3]
    assert promote.phase_index == 2
    assert promote.metrics["samples"] == 400
    assert promote.metrics["verdicts"] == dict.fromkeys(GUARDRAILS, "pass")
    assert promote.metrics["values"]["psi"] == {"challenger": 0.01, "champion": 0.01, "at": 250.0}
    assert "alias champion=5" in promote.action_summary


def test_single_canary_phase_at_full_weight_promotes():
    plan = make_plan(phases=(PhaseSpec("all", "canary", 1.0, 0.0, 0),))
    state, actions = step(plan, initial_state(plan, 0.0), Start(0.0))
    assert actions[2] == SetTraffic(1.0, False, "a", ANY)
    state, actions = step(plan, state, analysis(0.0, 0, samples=0))
    assert state.status == "promoted_watching"
    assert actions[3] == SetTraffic(0.0, False, "b", ANY)


def test_slots_reversed_plan_switches_champion_slot_to_a():
    plan = make_plan(champion_slot="b", challenger_slot="a")
    state = promoted(plan)
    last_traffic = [a for a in state.history[-1].action_summary.split("; ") if a.startswith("traffic")]
    assert last_traffic == ["traffic(champion=a, challenger=0)"]
    t0 = state.phase_started_at
    state, actions = go(plan, [analysis(t0 + 1, 3, "fail"), analysis(t0 + 2, 3, "fail")], state)
    assert state.status == "rolled_back"
    assert actions[-1][0] == SetTraffic(0.0, False, "b", ANY)


def test_start_is_idempotent():
    state = started()
    assert_ignored(PLAN, state, Start(1.0))
    assert_ignored(PLAN, at_phase(2), Start(5000.0))
    assert_ignored(PLAN, promoted(), Start(1e6))


def test_pending_ignores_everything_but_start_and_abort():
    state = initial_state(PLAN, 0.0)
    for event in (
        analysis(100.0, 0),
        analysis(100.0, 0, "fail"),
        Tick(1e9),
        ManualPromote(1.0, "eager"),
        SlotDown(1.0, "b", "crash"),
        SlotDown(1.0, "a", "crash"),
    ):
        assert_ignored(PLAN, state, event)


# ----------------------------------------------------------------------------------------------------------------
# Rollback before promotion
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2], ids=["shadow", "canary-5", "canary-50"])
def test_rollback_on_failure_limit_in_every_phase(index):
    state = at_phase(index)
    t0 = state.phase_started_at

    state, actions = step(PLAN, state, analysis(t0 + 1, index, p99_latency="fail"))
    assert state.status == PLAN.phases[index].kind and state.consecutive_failures == 1
    assert actions == [RecordDecision(state.history[-1])]  # a counted failure is recorded, nothing else
    assert state.history[-1].metrics["verdicts"]["p99_latency"] == "fail"

    before = state
    state, actions = step(PLAN, state, analysis(t0 + 2, index, error_rate="fail"))
    assert state.status == "rolled_back" and state.terminal and state.decided
    assert state.consecutive_failures == 2
    assert state.version == before.version + 1
    assert actions == [
        SetTraffic(0.0, False, "a", ANY),
        MarkRejected(CHALLENGER, ANY),
        SetAlias("challenger", None),
        RecordDecision(state.history[-1]),
        Notify(ANY),
    ]
    decision = state.history[-1]
    assert decision.from_status == PLAN.phases[index].kind and decision.to_status == "rolled_back"
    assert decision.phase_index == index
    assert decision.metrics["consecutive_failures"] == 2 and decision.metrics["failure_limit"] == 2
    assert decision.metrics["verdicts"]["error_rate"] == "fail"
    assert "error_rate" in decision.reason and "2/2" in decision.reason
    assert actions[1].reason == decision.reason == state.reason


def test_failure_limit_one_rolls_back_on_first_fail_even_before_the_gates():
    plan = make_plan(failure_limit=1)
    state, actions = step(plan, started(plan), analysis(1.0, 0, "fail", samples=3))
    assert state.status == "rolled_back"
    assert actions[0] == SetTraffic(0.0, False, "a", ANY)


def test_an_all_pass_analysis_resets_the_failure_streak():
    plan = make_plan(failure_limit=3)
    state = at_phase(1, plan)
    state, _ = go(plan, [analysis(1001, 1, "fail"), analysis(1002, 1, "fail")], state)
    assert state.consecutive_failures == 2
    # passing but too early to advance: still a transition, because the streak resets
    state, actions = step(plan, state, analysis(1003, 1))
    assert state.status == "canary" and state.phase_index == 1 and state.consecutive_failures == 0
    assert actions == [RecordDecision(state.history[-1])]
    assert "reset" in state.reason
    state, _ = go(plan, [analysis(1004, 1, "fail"), analysis(1005, 1, "fail")], state)
    assert state.status == "canary" and state.consecutive_failures == 2
    state, _ = step(plan, state, analysis(1006, 1, "fail"))
    assert state.status == "rolled_back"


def test_advancing_resets_the_failure_streak():
    plan = make_plan(failure_limit=2)
    state = at_phase(0, plan)
    state, _ = step(plan, state, analysis(10.0, 0, "fail"))
    state, _ = step(plan, state, analysis(100.0, 0))
    assert state.phase_index == 1 and state.consecutive_failures == 0
    state, _ = step(plan, state, analysis(101.0, 1, "fail"))
    assert state.status == "canary" and state.consecutive_failures == 1


# ----------------------------------------------------------------------------------------------------------------
# Inconclusive, gates
# ----------------------------------------------------------------------------------------------------------------


def test_inconclusive_never_advances_nor_fails():
    state = at_phase(1)
    for t in range(1, 50):
        assert_ignored(PLAN, state, analysis(1000.0 + 100 * t, 1, "inconclusive"))
        assert_ignored(PLAN, state, analysis(1000.0 + 100 * t, 1, psi="inconclusive"))  # mixed pass/inconclusive
    empty = Analysis(AnalysisResult(at=9e5, phase_index=1, samples=10**6, verdicts={}, values={}))
    assert_ignored(PLAN, state, empty)


def test_inconclusive_leaves_the_failure_streak_unchanged():
    state = at_phase(1)
    state, _ = step(PLAN, state, analysis(1001.0, 1, "fail"))
    assert state.consecutive_failures == 1
    state2, actions = step(PLAN, state, analysis(1002.0, 1, "inconclusive"))
    assert state2 is state and actions == []
    state3, _ = step(PLAN, state2, analysis(1003.0, 1, psi="fail", error_rate="inconclusive"))
    assert state3.status == "rolled_back"


def test_inconclusive_does_not_end_nor_fail_the_watch():
    state = promoted()
    t0 = state.phase_started_at
    assert_ignored(PLAN, state, analysis(t0 + 1, 3, "inconclusive"))


@pytest.mark.parametrize(
    ("elapsed", "samples", "advances"),
    [
        (119.999, 10_000, False),  # too early
        (10_000.0, 399, False),  # too few samples
        (119.999, 399, False),  # both short
        (120.0, 400, True),  # exactly at both gates
        (500.0, 5000, True),
    ],
)
def test_min_duration_and_min_samples_both_gate_advancement(elapsed, samples, advances):
    state = at_phase(2)
    t0 = state.phase_started_at
    new, actions = step(PLAN, state, analysis(t0 + elapsed, 2, samples=samples))
    if advances:
        assert new.status == "promoted_watching"
        assert new.history[-1].metrics["elapsed_s"] == pytest.approx(elapsed)
        assert new.history[-1].metrics["min_samples"] == 400
    else:
        assert new is state and actions == []


def test_ticks_never_advance_a_phase():
    state = at_phase(1)
    for t in (1000.0, 5000.0, 1e9):
        assert_ignored(PLAN, state, Tick(t))


def test_phase_duration_counts_from_the_phase_start_not_the_rollout_start():
    plan = PLAN
    state = started(plan, at=0.0)
    state, _ = step(plan, state, analysis(500.0, 0))  # canary-5 starts at 500
    assert_ignored(plan, state, analysis(559.0, 1))
    state, _ = step(plan, state, analysis(560.0, 1))
    assert state.phase_index == 2 and state.phase_started_at == 560.0


# ----------------------------------------------------------------------------------------------------------------
# Slot outages
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
def test_challenger_slot_down_counts_toward_rollback(index):
    state = at_phase(index)
    t0 = state.phase_started_at
    state, actions = step(PLAN, state, SlotDown(t0 + 1, "b", "OOMKilled"))
    assert state.consecutive_failures == 1 and state.status == PLAN.phases[index].kind
    assert actions == [RecordDecision(state.history[-1])]
    assert state.history[-1].metrics["slot"] == "b" and "OOMKilled" in state.reason
    state, actions = step(PLAN, state, analysis(t0 + 2, index, "fail"))  # mixes with analysis failures
    assert state.status == "rolled_back"
    assert actions[0] == SetTraffic(0.0, False, "a", ANY)


def test_challenger_slot_down_twice_rolls_back():
    state, per_event = go(PLAN, [SlotDown(1.0, "b", "crash"), SlotDown(2.0, "b", "crash")], started())
    assert state.status == "rolled_back"
    assert per_event[-1][:3] == [
        SetTraffic(0.0, False, "a", ANY),
        MarkRejected(CHALLENGER, ANY),
        SetAlias("challenger", None),
    ]


def test_champion_slot_down_is_recorded_but_never_blamed_on_the_challenger():
    state = at_phase(1)
    for i in range(5):
        before = state
        state, actions = step(PLAN, state, SlotDown(1001.0 + i, "a", "node drained"))
        assert state.status == "canary" and state.consecutive_failures == 0 and not state.decided
        assert state.version == before.version + 1
        assert actions == [RecordDecision(state.history[-1]), Notify(ANY)]
        assert "champion slot a" in state.reason
    # the phase still advances normally afterwards
    state, _ = step(PLAN, state, analysis(1100.0, 1))
    assert state.phase_index == 2


def test_champion_slot_down_keeps_an_existing_failure_streak():
    state, _ = step(PLAN, at_phase(1), analysis(1001.0, 1, "fail"))
    state, _ = step(PLAN, state, SlotDown(1002.0, "a", "x"))
    assert state.consecutive_failures == 1
    state, _ = step(PLAN, state, SlotDown(1003.0, "b", "x"))
    assert state.status == "rolled_back"


def test_unknown_slot_down_is_ignored():
    assert_ignored(PLAN, at_phase(1), SlotDown(1001.0, "c", "?"))


def test_slot_down_during_watch():
    state = promoted()
    t0 = state.phase_started_at
    # the old champion's slot (the rollback target) going down is recorded, not a rollback
    state, actions = step(PLAN, state, SlotDown(t0 + 1, "a", "evicted"))
    assert state.status == "promoted_watching" and state.consecutive_failures == 0
    assert actions == [RecordDecision(state.history[-1]), Notify(ANY)]
    assert "rollback target" in state.reason
    # the promoted slot going down counts
    state, actions = go(PLAN, [SlotDown(t0 + 2, "b", "crash"), SlotDown(t0 + 3, "b", "crash")], state)
    assert state.status == "rolled_back"
    assert actions[-1][0] == SetTraffic(0.0, False, "a", ANY)


# ----------------------------------------------------------------------------------------------------------------
# Manual commands
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
def test_manual_promote_during_a_phase(index):
    state = at_phase(index)
    state, _ = step(PLAN, state, analysis(state.phase_started_at + 1, index, "fail"))
    new, actions = step(PLAN, state, ManualPromote(state.phase_started_at + 5, "business sign-off"))
    assert new.status == "promoted_watching" and new.decided and new.consecutive_failures == 0
    assert new.phase_index == PLAN.watch_index and new.phase_started_at == state.phase_started_at + 5
    assert actions == [
        SetAlias("previous", CHAMPION),
        SetAlias("champion", CHALLENGER),
        SetAlias("challenger", None),
        SetTraffic(0.0, False, "b", ANY),
        RecordDecision(new.history[-1]),
        Notify(ANY),
    ]
    decision = new.history[-1]
    assert decision.metrics["manual"] is True and decision.metrics["consecutive_failures"] == 1
    assert decision.reason == "manual promote: business sign-off"


def test_manual_promote_is_ignored_when_watching_or_pending():
    assert_ignored(PLAN, promoted(), ManualPromote(1e4, "again"))
    assert_ignored(PLAN, initial_state(PLAN, 0.0), ManualPromote(1.0, "too soon"))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_manual_abort_during_a_phase_rolls_back(index):
    state = at_phase(index)
    new, actions = step(PLAN, state, ManualAbort(state.phase_started_at + 1, "bad release notes"))
    assert new.status == "aborted" and new.terminal and new.decided
    assert actions == [
        SetTraffic(0.0, False, "a", ANY),
        MarkRejected(CHALLENGER, "manual abort: bad release notes"),
        SetAlias("challenger", None),
        RecordDecision(new.history[-1]),
        Notify(ANY),
    ]
    assert new.history[-1].metrics["manual"] is True


def test_manual_abort_while_pending():
    state, actions = step(PLAN, initial_state(PLAN, 0.0), ManualAbort(1.0, "cancelled"))
    assert state.status == "aborted" and state.decided
    assert actions[:3] == [
        SetTraffic(0.0, False, "a", ANY),
        MarkRejected(CHALLENGER, ANY),
        SetAlias("challenger", None),
    ]


def test_manual_abort_during_watch_goes_back_to_previous():
    state = promoted()
    new, actions = step(PLAN, state, ManualAbort(state.phase_started_at + 1, "pager"))
    assert new.status == "aborted"
    assert actions == [
        SetTraffic(0.0, False, "a", ANY),
        SetAlias("champion", CHAMPION),
        SetAlias("previous", PREVIOUS),
        MarkRejected(CHALLENGER, ANY),
        RecordDecision(new.history[-1]),
        Notify(ANY),
    ]


def test_manual_abort_after_the_watch_window_but_before_it_concluded_still_rolls_back():
    state = promoted()
    new, _ = step(PLAN, state, ManualAbort(state.phase_started_at + 10 * PLAN.post_promotion_watch_s, "late"))
    assert new.status == "aborted"


# ----------------------------------------------------------------------------------------------------------------
# Post-promotion watch
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("previous", "expected_previous_alias"), [(PREVIOUS, PREVIOUS), (None, None)])
def test_post_promotion_regression_rolls_back_to_previous(previous, expected_previous_alias):
    plan = make_plan(previous_version=previous)
    state = promoted(plan)
    t0 = state.phase_started_at
    state, actions = step(plan, state, analysis(t0 + 10, 3, error_rate="fail"))
    assert state.status == "promoted_watching" and state.consecutive_failures == 1
    assert actions == [RecordDecision(state.history[-1])]
    state, actions = step(plan, state, analysis(t0 + 20, 3, error_rate="fail"))
    assert state.status == "rolled_back" and state.decided
    assert actions == [
        SetTraffic(0.0, False, "a", ANY),
        SetAlias("champion", CHAMPION),
        SetAlias("previous", expected_previous_alias),
        MarkRejected(CHALLENGER, ANY),
        RecordDecision(state.history[-1]),
        Notify(ANY),
    ]
    decision = state.history[-1]
    assert decision.from_status == "promoted_watching" and decision.phase_index == plan.watch_index
    assert "after promotion" in decision.reason
    assert not any(isinstance(a, AssignSlot) for a in actions)  # a traffic change, not a redeploy


def test_watch_pass_resets_streak_and_late_failures_do_not_count():
    state = promoted()
    t0, end = state.phase_started_at, watch_ends_at(PLAN, state)
    state, _ = step(PLAN, state, analysis(t0 + 1, 3, "fail"))
    state, actions = step(PLAN, state, analysis(t0 + 2, 3))
    assert state.consecutive_failures == 0 and actions == [RecordDecision(state.history[-1])]
    state, _ = step(PLAN, state, analysis(end - 1, 3, "fail"))
    assert state.consecutive_failures == 1
    # an analysis stamped at the end of the window concludes the watch and is not counted
    state, actions = step(PLAN, state, analysis(end, 3, "fail"))
    assert state.status == "succeeded"
    assert actions == [RecordDecision(state.history[-1]), Notify(ANY)]


def test_slot_down_after_the_watch_window_concludes_success():
    state = promoted()
    new, _ = step(PLAN, state, SlotDown(watch_ends_at(PLAN, state) + 1, "b", "late"))
    assert new.status == "succeeded"


def test_zero_length_watch_concludes_on_the_next_tick():
    plan = make_plan(post_promotion_watch_s=0.0)
    state = promoted(plan)
    state, _ = step(plan, state, Tick(state.phase_started_at))
    assert state.status == "succeeded"


# ----------------------------------------------------------------------------------------------------------------
# Terminal states, stale analyses, replay
# ----------------------------------------------------------------------------------------------------------------


def _terminal_states() -> dict[str, RolloutState]:
    rolled_back, _ = go(PLAN, [analysis(1, 0, "fail"), analysis(2, 0, "fail")], started())
    aborted, _ = step(PLAN, at_phase(1), ManualAbort(1001.0, "stop"))
    succeeded, _ = step(PLAN, promoted(), Tick(1e7))
    watch_rolled_back, _ = go(PLAN, [analysis(3001, 3, "fail"), analysis(3002, 3, "fail")], promoted())
    return {
        "rolled_back": rolled_back,
        "aborted": aborted,
        "succeeded": succeeded,
        "rolled_back_after_promotion": watch_rolled_back,
    }


def _every_event(at: float) -> list:
    events = [Start(at), Tick(at), ManualPromote(at, "x"), ManualAbort(at, "x")]
    events += [SlotDown(at, slot, "x") for slot in ("a", "b", "c")]
    events += [analysis(at, i, v) for i in range(5) for v in ("pass", "fail", "inconclusive")]
    return events


@pytest.mark.parametrize("name", ["rolled_back", "aborted", "succeeded", "rolled_back_after_promotion"])
def test_terminal_states_ignore_every_event(name):
    state = _terminal_states()[name]
    assert state.terminal
    for at in (0.0, state.history[-1].at, 1e9):
        for event in _every_event(at):
            assert_ignored(PLAN, state, event)


def test_stale_analyses_are_ignored():
    state = at_phase(2)
    for stale in (analysis(5000.0, 0, "fail"), analysis(5000.0, 1, "fail"), analysis(5000.0, 3, "fail")):
        assert_ignored(PLAN, state, stale)
    assert_ignored(PLAN, state, analysis(5000.0, 0))
    # right index but stamped before the phase began (a slow analysis of the previous window)
    assert_ignored(PLAN, state, analysis(state.phase_started_at - 1, 2, "fail"))
    assert_ignored(PLAN, state, analysis(state.phase_started_at - 1, 2, "pass"))


def test_replaying_the_promoting_analysis_never_promotes_twice():
    state = at_phase(2)
    promote = analysis(5000.0, 2)
    state, _ = step(PLAN, state, promote)
    assert state.status == "promoted_watching"
    assert_ignored(PLAN, state, promote)
    assert_ignored(PLAN, state, ManualPromote(5001.0, "again"))


def test_a_state_already_decided_never_promotes_again():
    # defence in depth: an inconsistent row (phase status but decided=True) must not promote a second time
    state = replace(at_phase(2), decided=True)
    assert_ignored(PLAN, state, analysis(5000.0, 2))
    assert_ignored(PLAN, state, ManualPromote(5000.0, "again"))


def test_replaying_a_whole_event_log_after_a_terminal_state_does_nothing():
    events = [Start(0.0), analysis(100, 0), analysis(200, 1), analysis(400, 2), Tick(2000.0)]
    final, actions = replay(PLAN, initial_state(PLAN, 0.0), events)
    assert final.status == "succeeded"
    assert sum(isinstance(a, SetAlias) and a.alias == "champion" for a in actions) == 1
    again, more = replay(PLAN, final, events)
    assert again is final and more == []


# ----------------------------------------------------------------------------------------------------------------
# Persistence
# ----------------------------------------------------------------------------------------------------------------

SCRIPT = [
    Start(0.0),
    analysis(10.0, 0, "inconclusive"),
    analysis(20.0, 0, "fail"),
    SlotDown(25.0, "a", "drain"),
    analysis(70.0, 0),
    analysis(80.0, 1, "fail"),
    analysis(90.0, 1, "inconclusive"),
    analysis(140.0, 1),
    analysis(150.0, 0, "fail"),  # stale
    analysis(270.0, 2, samples=500),
    analysis(300.0, 3, "fail"),
    analysis(310.0, 3),
    Tick(500.0),
    Tick(900.0),
]


@pytest.mark.parametrize("cut", range(len(SCRIPT) + 1))
def test_persist_and_restore_mid_rollout_gives_the_same_result(cut):
    straight_state, straight_actions = replay(PLAN, initial_state(PLAN, 0.0), SCRIPT)
    assert straight_state.status == "succeeded"

    head_state, head_actions = replay(PLAN, initial_state(PLAN, 0.0), SCRIPT[:cut])
    restored = roundtrip(head_state)
    assert restored == head_state
    plan = RolloutPlan.from_dict(json.loads(json.dumps(PLAN.to_dict())))
    assert plan == PLAN
    tail_state, tail_actions = replay(plan, restored, SCRIPT[cut:])
    assert tail_state == straight_state
    assert head_actions + tail_actions == straight_actions


def test_every_dataclass_roundtrips_through_json():
    state, _ = replay(PLAN, initial_state(PLAN, 0.0), SCRIPT)
    for decision in state.history:
        assert Decision.from_dict(json.loads(json.dumps(decision.to_dict()))) == decision
    for phase in PLAN.phases:
        assert PhaseSpec.from_dict(json.loads(json.dumps(phase.to_dict()))) == phase
    result = SCRIPT[2].result
    assert AnalysisResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    for event in [*SCRIPT, ManualPromote(1.0, "r"), ManualAbort(2.0, "r"), SlotDown(3.0, "b", "d")]:
        assert event_from_dict(json.loads(json.dumps(event_to_dict(event)))) == event
    _, actions = replay(PLAN, initial_state(PLAN, 0.0), SCRIPT)
    _, more = go(PLAN, [analysis(1, 0, "fail"), analysis(2, 0, "fail")], started())
    for action in actions + [a for batch in more for a in batch]:
        assert action_from_dict(json.loads(json.dumps(action_to_dict(action)))) == action
    with pytest.raises(ValueError):
        event_from_dict({"type": "Nope"})
    with pytest.raises(ValueError):
        action_from_dict({"type": "Nope"})


def test_restored_state_is_independent_of_the_analysis_dicts():
    result = AnalysisResult(at=70.0, phase_index=0, samples=10**4, verdicts={"x": "pass"}, values={"x": {"v": 1}})
    state, _ = step(PLAN, started(), Analysis(result))
    result.values["x"]["v"] = 999
    assert state.history[-1].metrics["values"] == {"x": {"v": 1}}


# ----------------------------------------------------------------------------------------------------------------
# Validation, describe
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"phases": ()},
        {"champion_slot": "b"},
        {"challenger_slot": "c"},
        {"challenger_version": CHAMPION},
        {"failure_limit": 0},
        {"post_promotion_watch_s": -1.0},
        {"post_promotion_watch_s": float("nan")},
    ],
)
def test_invalid_plans_are_rejected(overrides):
    with pytest.raises(ValueError):
        make_plan(**overrides)


@pytest.mark.parametrize(
    "args",
    [
        ("s", "shadow", 0.1, 0.0, 0),
        ("c", "canary", 0.0, 0.0, 0),
        ("c", "canary", 1.5, 0.0, 0),
        ("c", "canary", float("nan"), 0.0, 0),
        ("c", "linear", 0.5, 0.0, 0),
        ("c", "canary", 0.5, -1.0, 0),
        ("c", "canary", 0.5, 0.0, -1),
    ],
)
def test_invalid_phases_are_rejected(args):
    with pytest.raises(ValueError):
        PhaseSpec(*args)


def test_bad_verdicts_wrong_rollout_and_unknown_events_are_rejected():
    with pytest.raises(ValueError):
        AnalysisResult(at=0.0, phase_index=0, samples=0, verdicts={"x": "maybe"})
    with pytest.raises(ValueError):
        step(make_plan(rollout_id="other"), started(), Tick(1.0))
    with pytest.raises(TypeError):
        step(PLAN, started(), object())


def test_describe_is_one_line_in_every_status():
    states = [initial_state(PLAN, 0.0), at_phase(0), at_phase(2), promoted(), *_terminal_states().values()]
    weird = RolloutState("r1", "canary", 1, 0.0, 0, False, "multi\nline\treason", 3, ())
    for state in [*states, weird]:
        for plan in (None, PLAN):
            line = describe(state, plan)
            assert "\n" not in line and line.startswith("r1: ")
            assert state.status in line
    assert "'canary-50' (50% to challenger)" in describe(at_phase(2), PLAN)
    assert "until t=3600" in describe(promoted(), PLAN)


# ----------------------------------------------------------------------------------------------------------------
# Property-style: random event sequences, fixed seeds
# ----------------------------------------------------------------------------------------------------------------


def _random_plan(rng: random.Random) -> RolloutPlan:
    phases = []
    for i in range(rng.randint(1, 4)):
        if i == 0 and rng.random() < 0.3:
            outcome = rng.choice(["advance", "rollback"])
            phases.append(PhaseSpec("replay", "replay", 0.0, 0.0, rng.choice([0, 50]), on_inconclusive=outcome))
        elif rng.random() < 0.3:
            phases.append(PhaseSpec(f"p{i}", "shadow", 0.0, rng.choice([0.0, 10.0, 50.0]), rng.choice([0, 50])))
        else:
            weight = rng.choice([0.01, 0.05, 0.25, 0.5, 1.0])
            phases.append(PhaseSpec(f"p{i}", "canary", weight, rng.choice([0.0, 10.0, 50.0]), rng.choice([0, 50])))
    champion_slot = rng.choice(["a", "b"])
    return make_plan(
        phases=tuple(phases),
        champion_slot=champion_slot,
        challenger_slot="b" if champion_slot == "a" else "a",
        failure_limit=rng.randint(1, 3),
        post_promotion_watch_s=rng.choice([0.0, 30.0, 200.0]),
        previous_version=rng.choice([None, PREVIOUS]),
    )


def _random_event(rng: random.Random, plan: RolloutPlan, state: RolloutState, now: float):
    roll = rng.random()
    if roll < 0.05:
        return Start(now)
    if roll < 0.12:
        return Tick(now)
    if roll < 0.14:
        return ManualPromote(now, "op")
    if roll < 0.155:
        return ManualAbort(now, "op")
    if roll < 0.22:
        return SlotDown(now, rng.choice(["a", "b", "c"]), "x")
    index = state.phase_index if rng.random() < 0.85 else rng.randint(0, len(plan.phases) + 1)
    weights = [8, 1, 2] if rng.random() < 0.7 else [1, 1, 1]
    verdicts = {g: rng.choices(["pass", "fail", "inconclusive"], weights)[0] for g in rng.sample(GUARDRAILS, 2)}
    at = now if rng.random() < 0.9 else now - rng.uniform(0, 100)  # occasionally late / out of order
    result = AnalysisResult(at=at, phase_index=index, samples=rng.randint(0, 120), verdicts=verdicts, values={})
    return Analysis(result)


def _check_transition(plan, before, after, actions, event):
    if after is before or after == before:
        assert after is before, "an ignored event returns the very same state"
        assert actions == []
        return
    assert not before.terminal, "terminal states never change"
    assert after.version == before.version + 1
    assert after.history[:-1] == before.history
    decision = after.history[-1]
    assert (decision.from_status, decision.to_status) == (before.status, after.status)
    assert decision.phase_index == before.phase_index
    record_at = [i for i, a in enumerate(actions) if isinstance(a, RecordDecision)]
    assert len(record_at) == 1 and actions[record_at[0]].decision == decision
    assert all(isinstance(a, Notify) for a in actions[record_at[0] + 1 :])
    assert before.decided <= after.decided, "decided never turns false"
    assert after.consecutive_failures <= plan.failure_limit
    for action in actions:
        if isinstance(action, SetTraffic):
            assert 0.0 <= action.challenger_weight <= 1.0
            assert action.champion_slot in (plan.champion_slot, plan.challenger_slot)
            if action.shadow:
                assert action.challenger_weight == 0.0
    if after.status in ("rolled_back", "aborted"):
        first = actions[0]
        assert isinstance(first, SetTraffic)
        assert (first.challenger_weight, first.shadow, first.champion_slot) == (0.0, False, plan.champion_slot)
        assert after.decided
        assert [a.version for a in actions if isinstance(a, MarkRejected)] == [CHALLENGER]
    promoting = after.status == "promoted_watching" and before.status != "promoted_watching"
    champion_aliases = [a for a in actions if isinstance(a, SetAlias) and a.alias == "champion"]
    if promoting:
        assert before.status in ("replay", "shadow", "canary") and after.decided
        assert champion_aliases == [SetAlias("champion", CHALLENGER)]
        assert SetTraffic(0.0, False, plan.challenger_slot, ANY) in actions
    elif after.status in ("rolled_back", "aborted") and before.status == "promoted_watching":
        assert champion_aliases == [SetAlias("champion", CHAMPION)]
    else:
        assert champion_aliases == []
    if after.status in ("replay", "shadow", "canary"):
        assert 0 <= after.phase_index < len(plan.phases)
        assert after.status == plan.phases[after.phase_index].kind
        assert not after.decided
    if after.status == "promoted_watching":
        assert after.phase_index == plan.watch_index
    if after.status == "succeeded":
        assert before.status == "promoted_watching" and actions[0] == RecordDecision(decision)
    if isinstance(event, Analysis) and before.status != "pending":
        assert event.result.phase_index == before.phase_index, "stale analyses never change the state"


SEEDS = range(150)


@pytest.mark.parametrize("seed_block", range(5))
def test_random_event_sequences_keep_the_invariants(seed_block):
    seen_statuses: set[str] = set()
    for seed in SEEDS[seed_block::5]:
        rng = random.Random(seed)
        plan = _random_plan(rng)
        state = initial_state(plan, 0.0)
        now = 0.0
        terminal_since: RolloutState | None = None
        all_actions = []
        persist_at = rng.randint(0, 80)
        for n in range(80):
            now += rng.choice([0.0, 1.0, 5.0, 20.0, 60.0])
            event = _random_event(rng, plan, state, now)
            if n == persist_at:
                restored = roundtrip(state)
                assert restored == state
                # the restored copy behaves exactly like the original
                assert step(plan, restored, event) == step(plan, state, event)
            before = state
            state, actions = step(plan, before, event)
            _check_transition(plan, before, state, actions, event)
            all_actions.extend(actions)
            if terminal_since is not None:
                assert state is terminal_since, "once terminal, always terminal"
            elif state.terminal:
                terminal_since = state
            seen_statuses.update(d.to_status for d in state.history)

        transitions = [(d.from_status, d.to_status) for d in state.history]
        promotions = [t for t in transitions if t[1] == "promoted_watching" and t[0] != "promoted_watching"]
        rollbacks = [t for t in transitions if t[1] in ("rolled_back", "aborted")]
        assert len(promotions) <= 1, "never promotes twice"
        assert len(rollbacks) <= 1, "never rolls back twice"
        assert (
            sum(isinstance(a, SetAlias) and a.alias == "champion" and a.version == CHALLENGER for a in all_actions) <= 1
        )
        assert sum(isinstance(a, MarkRejected) for a in all_actions) <= 1
        assert state.version == len(state.history)
    if seed_block == 0:
        # the generator is good enough to reach every status (checked on one block to keep it cheap)
        assert seen_statuses >= set(STATUSES) - {"pending"}
    assert TERMINAL_STATUSES & seen_statuses


# --- progress deadline ------------------------------------------------------------------------------------

DEADLINE_PLAN = make_plan(
    phases=(
        PhaseSpec("shadow", "shadow", 0.0, 60.0, 100, max_duration_s=300.0),
        PhaseSpec("canary-50", "canary", 0.5, 60.0, 100, max_duration_s=300.0),
    )
)


def test_a_phase_still_inconclusive_at_its_deadline_rolls_back_and_names_the_undecided_guardrails() -> None:
    state = started(DEADLINE_PLAN)
    state, _ = step(DEADLINE_PLAN, state, analysis(299.0, 0, psi="inconclusive"))
    assert state.status == "shadow"  # before the deadline: still waiting for evidence
    state, actions = step(DEADLINE_PLAN, state, analysis(300.0, 0, psi="inconclusive"))
    assert state.status == "rolled_back" and state.decided
    assert "undecided after 300s (deadline 300s): inconclusive: psi" in state.reason
    assert isinstance(actions[0], SetTraffic) and actions[0].challenger_weight == 0


def test_a_tick_past_the_deadline_rolls_back_when_no_analysis_arrives() -> None:
    state = at_phase(1, DEADLINE_PLAN)
    state, _ = step(DEADLINE_PLAN, state, Tick(at=1000.0 + 299.0))
    assert state.status == "canary"
    state, _ = step(DEADLINE_PLAN, state, Tick(at=1000.0 + 300.0))
    assert state.status == "rolled_back" and "no analysis" in state.reason


def test_passing_guardrails_short_of_min_samples_at_the_deadline_roll_back_too() -> None:
    state = started(DEADLINE_PLAN)
    state, _ = step(DEADLINE_PLAN, state, analysis(400.0, 0, samples=12))
    assert state.status == "rolled_back" and "only 12/100 samples" in state.reason


def test_a_phase_that_passes_before_its_deadline_advances_and_the_watch_has_no_deadline() -> None:
    state = started(DEADLINE_PLAN)
    state, _ = step(DEADLINE_PLAN, state, analysis(100.0, 0))
    state, _ = step(DEADLINE_PLAN, state, analysis(200.0, 1))
    assert state.status == "promoted_watching"
    state, _ = step(DEADLINE_PLAN, state, Tick(at=200.0 + 500.0))  # past any phase deadline, inside the watch
    assert state.status == "promoted_watching"


def test_a_deadline_shorter_than_the_minimum_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="max_duration_s must be >= min_duration_s"):
        PhaseSpec("shadow", "shadow", 0.0, 60.0, 100, max_duration_s=30.0)


def test_guardrails_and_state_machine_combine_verdicts_by_the_same_rule() -> None:
    from monitoring.rollout import guardrails, state_machine
    from monitoring.rollout.verdicts import combine_verdicts

    assert guardrails.Verdict is state_machine.Verdict
    assert combine_verdicts([]) == "inconclusive"
    assert combine_verdicts(["pass", "pass"]) == "pass"
    assert combine_verdicts(["pass", "inconclusive"]) == "inconclusive"
    assert combine_verdicts(["inconclusive", "fail", "pass"]) == "fail"

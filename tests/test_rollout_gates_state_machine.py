"""Manual gates in the pure state machine: Pause, Resume, Approve, require_approval and its timeout, and the
pre-rollout gate's timeout. Exhaustive in the style of test_controller_state_machine.py (no I/O, no clocks)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from monitoring.rollout.state_machine import (
    DECISION_EVENTS,
    Approve,
    ManualAbort,
    ManualPromote,
    MarkRejected,
    Pause,
    PhaseSpec,
    RecordDecision,
    Resume,
    RolloutState,
    SetAlias,
    SetTraffic,
    Start,
    Tick,
    describe,
    event_from_dict,
    event_to_dict,
    initial_state,
    step,
    waiting_for,
)
from tests.test_controller_state_machine import (
    CHALLENGER,
    _check_transition,
    _random_event,
    _random_plan,
    analysis,
    assert_ignored,
    make_plan,
    roundtrip,
    started,
)

GATED = make_plan(
    phases=(
        PhaseSpec("shadow", "shadow", 0.0, 60.0, 100),
        PhaseSpec(
            "canary-50",
            "canary",
            0.5,
            60.0,
            100,
            max_duration_s=500.0,
            require_approval=True,
            approval_timeout_s=300.0,
            on_approval_timeout="rollback",
        ),
        PhaseSpec("canary-100", "canary", 1.0, 60.0, 100),
    )
)
HOLD = make_plan(phases=tuple(replace(p, on_approval_timeout="hold") for p in GATED.phases))
FOREVER = make_plan(phases=tuple(replace(p, approval_timeout_s=None) for p in GATED.phases))


def at_phase(index: int, plan=GATED) -> RolloutState:
    """Phase ``index`` (began at ``1000 * index``), approving any gate on the way at the same instant."""
    state = started(plan)
    for i in range(index):
        state, _ = step(plan, state, analysis(1000.0 * (i + 1), i))
        if state.awaiting_approval:
            state, _ = step(plan, state, Approve(1000.0 * (i + 1), "ok"))
    assert state.phase_index == index and not state.awaiting_approval
    return state


def promoted(plan=GATED) -> RolloutState:
    state = at_phase(len(plan.phases) - 1, plan)
    last = len(plan.phases) - 1
    state, _ = step(plan, state, analysis(1000.0 * (last + 1), last))
    assert state.status == "promoted_watching"
    return state


def awaiting(plan=GATED) -> RolloutState:
    """In canary-50 (began at 1000), passed at 1100: awaiting approval since 1100."""
    state = at_phase(1, plan)
    state, _ = step(plan, state, analysis(1100.0, 1))
    assert state.awaiting_approval_since == 1100.0 and state.status == "canary" and state.phase_index == 1
    return state


# --- require_approval ----------------------------------------------------------------------------------------


def test_a_gated_phase_that_passes_holds_with_one_recorded_decision_and_no_traffic_change():
    state = at_phase(1, GATED)
    new, actions = step(GATED, state, analysis(1100.0, 1))
    assert new.version == state.version + 1 and new.history[-1].event == "awaiting-approval"
    assert not any(isinstance(a, SetTraffic | SetAlias) for a in actions)
    assert isinstance(actions[0], RecordDecision) and "awaiting approval" in new.reason
    # later passing analyses neither advance nor record anything
    assert_ignored(GATED, new, analysis(1150.0, 1))
    assert_ignored(GATED, new, Tick(1399.0))


def test_approve_advances_a_waiting_phase_to_the_next_one():
    state = awaiting()
    new, actions = step(GATED, state, Approve(1200.0, "alice"))
    assert (new.status, new.phase_index, new.phase_started_at) == ("canary", 2, 1200.0)
    assert actions[0] == SetTraffic(1.0, False, "a", actions[0].reason)
    assert new.history[-1].event == "phase-advanced" and "approved: alice" in new.reason
    assert new.awaiting_approval_since is None and not new.paused


def test_approve_of_the_last_gated_phase_promotes():
    plan = make_plan(phases=(PhaseSpec("canary-100", "canary", 1.0, 0.0, 1, require_approval=True),))
    state, _ = step(plan, started(plan), analysis(10.0, 0))
    assert state.awaiting_approval
    new, actions = step(plan, state, Approve(20.0, "ok"))
    assert new.status == "promoted_watching" and new.decided
    assert SetAlias("champion", CHALLENGER) in actions


@pytest.mark.parametrize(
    "state_name",
    ["pending", "shadow", "canary-not-passed", "paused-awaiting", "watching", "rolled_back"],
)
def test_approve_is_ignored_unless_the_rollout_waits_for_approval(state_name):
    states = {
        "pending": initial_state(GATED, 0.0),
        "shadow": started(GATED),
        "canary-not-passed": at_phase(1, GATED),
        "paused-awaiting": step(GATED, awaiting(), Pause(1150.0))[0],
        "watching": promoted(GATED),
        "rolled_back": step(GATED, awaiting(), ManualAbort(1150.0))[0],
    }
    assert_ignored(GATED, states[state_name], Approve(1160.0, "x"))


def test_a_failing_guardrail_still_rolls_back_a_waiting_phase():
    state = awaiting()
    state, _ = step(GATED, state, analysis(1110.0, 1, "fail"))
    assert state.consecutive_failures == 1 and state.awaiting_approval
    state, actions = step(GATED, state, analysis(1120.0, 1, "fail"))
    assert state.status == "rolled_back" and isinstance(actions[0], SetTraffic)
    assert [a.version for a in actions if isinstance(a, MarkRejected)] == [CHALLENGER]


def test_the_approval_timeout_rolls_back_with_outcome_rollback():
    state = awaiting()
    assert_ignored(GATED, state, Tick(1399.9))
    new, actions = step(GATED, state, Tick(1400.0))
    assert new.status == "rolled_back" and "not approved within 300s" in new.reason
    assert isinstance(actions[0], SetTraffic) and actions[0].challenger_weight == 0.0


def test_the_approval_timeout_also_fires_on_an_analysis():
    new, _ = step(GATED, awaiting(), analysis(1400.0, 1))
    assert new.status == "rolled_back"


def test_the_approval_timeout_with_outcome_hold_records_once_and_keeps_waiting():
    state = awaiting(HOLD)
    state, actions = step(HOLD, state, Tick(1400.0))
    assert state.status == "canary" and state.gate_timed_out and state.history[-1].event == "approval-timeout"
    assert not any(isinstance(a, SetTraffic) for a in actions)
    assert_ignored(HOLD, state, Tick(99_999.0))  # the phase deadline does not run while it waits either
    new, _ = step(HOLD, state, Approve(100_000.0, "late but yes"))
    assert new.phase_index == 2


def test_without_a_timeout_a_gate_waits_forever_and_past_the_phase_deadline():
    state = awaiting(FOREVER)
    assert_ignored(FOREVER, state, Tick(1e9))
    assert_ignored(FOREVER, state, analysis(1e9, 1, "inconclusive"))


# --- pause / resume ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
def test_pause_holds_a_passing_phase_and_resume_lets_the_next_pass_advance(index):
    state = at_phase(index, GATED if index != 1 else make_plan())
    plan = GATED if index != 1 else make_plan()
    began = state.phase_started_at
    paused, actions = step(plan, state, Pause(began + 1, "investigating"))
    assert paused.paused and paused.status == state.status and paused.history[-1].event == "paused"
    assert not any(isinstance(a, SetTraffic | SetAlias) for a in actions)
    assert_ignored(plan, paused, analysis(began + 500, index))  # all pass, gates met: does not advance
    assert_ignored(plan, paused, Pause(began + 501))  # already paused
    resumed, _ = step(plan, paused, Resume(began + 600, "fine"))
    assert not resumed.paused and resumed.resumed_at == began + 600 and resumed.history[-1].event == "resumed"
    advanced, _ = step(plan, resumed, analysis(began + 601, index))
    assert advanced.phase_index == index + 1 or advanced.status == "promoted_watching"


def test_a_failing_guardrail_still_rolls_back_a_paused_rollout():
    paused, _ = step(GATED, started(GATED), Pause(1.0))
    state, _ = step(GATED, paused, analysis(2.0, 0, "fail"))
    state, actions = step(GATED, state, analysis(3.0, 0, "fail"))
    assert state.status == "rolled_back" and isinstance(actions[0], SetTraffic)


def test_a_spec_that_holds_failures_while_paused_records_them_and_acts_once_resumed():
    holding = replace(GATED, on_failure_while_paused="hold")
    paused, _ = step(holding, started(holding), Pause(1.0))
    state = paused
    for at in (2.0, 3.0, 4.0):  # more failures than failure_limit: none acted on while paused
        state, actions = step(holding, state, analysis(at, 0, "fail"))
        assert state == paused and actions == []
    resumed, _ = step(holding, state, Resume(5.0))
    state, _ = step(holding, resumed, analysis(6.0, 0, "fail"))
    state, actions = step(holding, state, analysis(7.0, 0, "fail"))
    assert state.status == "rolled_back" and isinstance(actions[0], SetTraffic)


def test_an_unknown_choice_for_failures_while_paused_is_refused():
    with pytest.raises(ValueError, match="on_failure_while_paused"):
        replace(GATED, on_failure_while_paused="ignore")


def test_the_phase_deadline_does_not_run_while_paused_and_restarts_at_resume():
    state = at_phase(1, GATED)  # canary-50 began at 1000, deadline 500 s
    paused, _ = step(GATED, state, Pause(1010.0))
    assert_ignored(GATED, paused, Tick(5000.0))
    resumed, _ = step(GATED, paused, Resume(5000.0))
    assert_ignored(GATED, resumed, Tick(5499.0))
    done, _ = step(GATED, resumed, Tick(5500.0))
    assert done.status == "rolled_back" and "deadline" in done.reason


@pytest.mark.parametrize("event", [Pause(5.0), Resume(5.0)])
def test_pause_and_resume_are_ignored_when_pending_watching_or_terminal(event):
    for state in (initial_state(GATED, 0.0), promoted(GATED), step(GATED, started(GATED), ManualAbort(1.0))[0]):
        assert_ignored(GATED, state, event)
    assert_ignored(GATED, started(GATED), Resume(5.0))  # not paused


def test_manual_promote_and_abort_work_while_paused():
    paused, _ = step(GATED, at_phase(1, GATED), Pause(1001.0))
    promoted_state, _ = step(GATED, paused, ManualPromote(1002.0, "ship it"))
    assert promoted_state.status == "promoted_watching" and not promoted_state.paused
    aborted, _ = step(GATED, paused, ManualAbort(1002.0))
    assert aborted.status == "aborted"


# --- pre-rollout gate ----------------------------------------------------------------------------------------


def test_a_pre_rollout_gate_that_never_opens_rolls_back_at_its_timeout_without_touching_the_champion():
    plan = make_plan(pre_rollout_timeout_s=30.0)
    state = initial_state(plan, 100.0)
    assert_ignored(plan, state, Tick(129.9))
    new, actions = step(plan, state, Tick(130.0))
    assert new.status == "rolled_back" and "pre-rollout gate" in new.reason
    assert actions[0] == SetTraffic(0.0, False, "a", actions[0].reason)  # the champion keeps everything
    hold = make_plan(pre_rollout_timeout_s=30.0, on_pre_rollout_timeout="hold")
    assert_ignored(hold, initial_state(hold, 100.0), Tick(1e9))
    assert step(plan, state, Start(120.0))[0].status == "shadow"


# --- descriptions, serialisation, invariants --------------------------------------------------------------


def test_what_a_rollout_is_doing_is_named_in_words():
    assert "awaiting approval" in waiting_for(GATED, awaiting())
    assert "gathering evidence" in waiting_for(GATED, at_phase(1, GATED))
    assert "paused" in waiting_for(GATED, step(GATED, started(GATED), Pause(1.0))[0])
    assert "promoted" in waiting_for(GATED, promoted(GATED))
    assert "AWAITING APPROVAL" in describe(awaiting(), GATED)


def test_gate_fields_and_events_roundtrip_through_json():
    state = step(GATED, awaiting(), Pause(1150.0))[0]
    assert roundtrip(state) == state
    for event in (Pause(1.0, "a"), Resume(2.0, "b"), Approve(3.0, "c")):
        assert event_from_dict(event_to_dict(event)) == event
    assert type(GATED).from_dict(GATED.to_dict()) == GATED


def test_every_transition_names_a_known_event():
    state = awaiting()
    for decision in state.history:
        assert decision.event in DECISION_EVENTS


def _gated_random_plan(rng: random.Random):
    plan = _random_plan(rng)
    phases = tuple(
        replace(
            p,
            require_approval=rng.random() < 0.5,
            approval_timeout_s=rng.choice([None, 0.0, 30.0, 300.0]),
            on_approval_timeout=rng.choice(["hold", "rollback"]),
        )
        for p in plan.phases
    )
    return replace(plan, phases=phases, pre_rollout_timeout_s=rng.choice([None, 10.0]))


@pytest.mark.parametrize("seed_block", range(3))
def test_random_sequences_with_gates_pauses_and_approvals_keep_the_invariants(seed_block):
    seen: set[str] = set()
    for seed in range(seed_block, 120, 3):
        rng = random.Random(1000 + seed)
        plan = _gated_random_plan(rng)
        state = initial_state(plan, 0.0)
        now, promotions, rollbacks = 0.0, 0, 0
        for _ in range(80):
            now += rng.choice([0.0, 1.0, 5.0, 20.0, 60.0])
            roll = rng.random()
            if roll < 0.08:
                event = Pause(now, "p")
            elif roll < 0.16:
                event = Resume(now, "r")
            elif roll < 0.28:
                event = Approve(now, "a")
            else:
                event = _random_event(rng, plan, state, now)
            before = state
            state, actions = step(plan, before, event)
            _check_transition(plan, before, state, actions, event)
            if state is not before:
                assert state.history[-1].event in DECISION_EVENTS
                seen.add(state.history[-1].event)
                promotions += state.history[-1].event == "promoted"
                rollbacks += state.history[-1].event in ("rolled-back", "aborted")
            if state.paused:
                assert state.status in ("replay", "shadow", "canary")
            if isinstance(event, Approve) and state is not before:
                assert before.awaiting_approval and not before.paused
            if before.paused and isinstance(event, type(analysis(0, 0))) and state is not before:
                assert state.phase_index == before.phase_index or state.terminal, "a paused rollout never advances"
        assert promotions <= 1 and rollbacks <= 1
        assert roundtrip(state) == state
    assert {"paused", "resumed", "awaiting-approval"} <= seen


def test_a_description_shows_wall_clock_times_as_times_not_epoch_numbers():
    plan = make_plan()
    state = started(plan, at=1_796_300_000.0)
    line = describe(state, plan)
    assert "since 2026-12-03 " in line and "UTC" in line, line
    assert "e+09" not in line and "1796300000" not in line

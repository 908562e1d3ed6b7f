"""The replay phase, without I/O: its spec fields and their refusals, the pure state machine's replay transitions,
and the judging of a replay (the slot's answers laid out as paired rows, judged by the same guardrails).

The driver's replay against a real slot and a real prediction log is in tests/test_controller_driver.py."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd
import pytest

from core.prediction_log import ACCOUNT_ID, LABEL, MODEL_VERSION, REQUEST_ID, SCORE, STATUS, TS, VARIANT
from core.schema import CATEGORICAL_FEATURES, NUMERIC_FEATURES
from core.synthetic import generate_transactions
from monitoring.rollout.driver import plan_for
from monitoring.rollout.replay import BATCH_SIZE, BatchAnswer, ReplaySample, batches, instances, replay_analysis
from monitoring.rollout.spec import SpecError, load_spec
from monitoring.rollout.state_machine import (
    Analysis,
    AnalysisResult,
    AssignSlot,
    MarkRejected,
    Pause,
    PhaseSpec,
    RolloutPlan,
    SetTraffic,
    Start,
    initial_state,
    step,
)

THRESHOLD = 0.2
SPEC: dict[str, Any] = {
    "name": "replay-test",
    "analysis_interval_s": 1,
    "failure_limit": 2,
    "post_promotion_watch_s": 0,
    "phases": [
        {"name": "replay", "kind": "replay", "requests": 1000, "min_samples": 500, "label_delay_s": 5},
        {"name": "shadow", "kind": "shadow", "min_duration_s": 5, "min_samples": 100},
        {"name": "canary-100", "kind": "canary", "weight": 1.0, "min_duration_s": 5, "min_samples": 100},
    ],
    "guardrails": [
        {"name": "error-rate", "kind": "error_rate", "applies_to": ["replay", "shadow", "canary"], "min_samples": 100},
        {"name": "decline-rate", "kind": "decline_rate", "applies_to": ["replay", "shadow"], "min_samples": 300,
         "max_change": 0.4},
        {"name": "online-recall", "kind": "online_recall", "applies_to": ["replay", "shadow"], "min_samples": 20,
         "max_drop": 0.35},
    ],
}  # fmt: skip


def spec_with(**phase0: Any) -> dict[str, Any]:
    data = copy.deepcopy(SPEC)
    data["phases"][0] = {k: v for k, v in {**data["phases"][0], **phase0}.items() if v is not None}
    return data


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(data)
    return caught.value.problems


# --- the spec ---------------------------------------------------------------------------------------------------


def test_a_replay_phase_needs_no_duration_and_gets_its_defaults() -> None:
    phase = load_spec(SPEC).phases[0]
    assert (phase.kind, phase.requests, phase.min_duration_s, phase.label_delay_s) == ("replay", 1000, 0.0, 5)
    assert (phase.lookback_s, phase.on_inconclusive, phase.weight) == (3600.0, "advance", None)


@pytest.mark.parametrize("requests", [0, -5])
def test_a_replay_of_no_requests_is_refused_at_load_naming_the_field(requests: int) -> None:
    assert problems(spec_with(requests=requests)) == [
        f"phases[0].requests: must be > 0, got {requests}: a replay phase replays at least one request"
    ]


def test_replay_refusals_name_their_fields() -> None:
    assert problems(spec_with(requests=None)) == ["phases[0].requests: required for a replay phase: how many, > 0"]
    assert problems(spec_with(min_samples=2000)) == [
        "phases[0].min_samples: must be <= requests (1000): a replay of 1000 requests never reaches 2000 samples"
    ]
    assert problems(spec_with(on_inconclusive="maybe"))[0].startswith("phases[0].on_inconclusive: Input should be")
    assert problems(spec_with(label_delay_s=-1)) == ["phases[0].label_delay_s: must be >= 0, got -1.0"]
    moved = copy.deepcopy(SPEC)
    moved["phases"][0], moved["phases"][1] = moved["phases"][1], moved["phases"][0]
    assert problems(moved) == ["phases[1].kind: only the first phase may be a replay phase"]
    stray = copy.deepcopy(SPEC)
    stray["phases"][1]["requests"] = 10
    assert problems(stray) == ["phases[1].requests: only a replay phase has this field"]
    latency = copy.deepcopy(SPEC)
    latency["guardrails"].append({"name": "p99", "kind": "latency_p99", "applies_to": ["replay"], "min_samples": 10})
    assert problems(latency)[0].startswith("guardrails[3].applies_to[0]: latency_p99 cannot apply to 'replay'")


# --- the state machine --------------------------------------------------------------------------------------------


def make_plan(on_inconclusive: str = "advance", require_approval: bool = False) -> RolloutPlan:
    return RolloutPlan(
        rollout_id="r1",
        model_name="fraud",
        challenger_version="7",
        champion_version="6",
        champion_slot="a",
        challenger_slot="b",
        phases=(
            PhaseSpec(
                "replay", "replay", 0.0, 0.0, 500, on_inconclusive=on_inconclusive, require_approval=require_approval
            ),
            PhaseSpec("shadow", "shadow", 0.0, 5.0, 100),
            PhaseSpec("canary-100", "canary", 1.0, 5.0, 100),
        ),
        failure_limit=2,
        post_promotion_watch_s=0.0,
        previous_version=None,
    )


def replayed(at: float, samples: int, **verdicts: str) -> Analysis:
    window = {"kind": "replay", "requested": 1000, "labelled_found": samples}
    return Analysis(AnalysisResult(at, 0, samples, dict(verdicts), window=window))


def test_entering_replay_loads_the_challenger_and_gives_it_no_live_and_no_shadow_traffic() -> None:
    plan = make_plan()
    state, actions = step(plan, initial_state(plan, 0.0), Start(1.0))
    assert state.status == "replay" and state.phase_index == 0
    assert actions[:3] == [
        AssignSlot("b", "7"),
        actions[1],
        SetTraffic(0.0, shadow=False, champion_slot="a", reason="r1: phase replay"),
    ]


def test_a_passing_replay_advances_to_shadow_at_once_with_the_window_recorded() -> None:
    plan = make_plan()
    state = step(plan, initial_state(plan, 0.0), Start(1.0))[0]
    state, actions = step(plan, state, replayed(2.0, 1000, **{"error-rate": "pass", "online-recall": "pass"}))
    assert state.status == "shadow" and state.phase_index == 1
    assert SetTraffic(0.0, shadow=True, champion_slot="a", reason="r1: phase shadow") in actions
    decision = state.history[-1]
    assert decision.reason == "phase replay passed: all guardrails pass on 1000 replayed requests"
    assert decision.metrics["window"]["requested"] == 1000


def test_one_failing_replay_rolls_back_before_shadow_whatever_the_failure_limit() -> None:
    plan = make_plan()
    assert plan.failure_limit == 2
    state = step(plan, initial_state(plan, 0.0), Start(1.0))[0]
    state, actions = step(plan, state, replayed(2.0, 1000, **{"error-rate": "pass", "online-recall": "fail"}))
    assert state.status == "rolled_back" and state.decided and state.phase_index == 0
    assert actions[0] == SetTraffic(0.0, False, "a", "r1: rolled back")
    assert any(isinstance(a, MarkRejected) and a.version == "7" for a in actions)
    assert state.reason == "guardrails failed in replay phase replay on 1000 replayed requests: online-recall"
    assert [d.to_status for d in state.history] == ["replay", "rolled_back"], "never in shadow or canary"


@pytest.mark.parametrize("samples", [0, 120])
def test_too_few_labelled_requests_advance_to_shadow_with_the_reason_recorded(samples: int) -> None:
    # A model's first rollout: the log holds no (or few) labelled requests the champion answered.
    plan = make_plan()
    state = step(plan, initial_state(plan, 0.0), Start(1.0))[0]
    verdicts = {"error-rate": "pass", "online-recall": "inconclusive"} if samples else {}
    state, _ = step(plan, state, replayed(2.0, samples, **verdicts))
    assert state.status == "shadow"
    s = "s" if samples != 1 else ""
    assert state.reason == (
        f"replay phase replay inconclusive (only {samples} replayed request{s}, 500 needed); "
        "on_inconclusive: advance to shadow"
    )
    assert state.history[-1].metrics["replay"] == "inconclusive"


def test_an_inconclusive_replay_rolls_back_when_the_spec_says_so() -> None:
    plan = make_plan(on_inconclusive="rollback")
    state = step(plan, initial_state(plan, 0.0), Start(1.0))[0]
    state, actions = step(plan, state, replayed(2.0, 900, **{"error-rate": "pass", "online-recall": "inconclusive"}))
    assert state.status == "rolled_back" and actions[0] == SetTraffic(0.0, False, "a", "r1: rolled back")
    assert state.reason == "replay phase replay inconclusive (undecided: online-recall); on_inconclusive: rollback"


def test_a_paused_replay_does_not_advance_but_a_failing_one_still_rolls_back() -> None:
    plan = make_plan()
    state = step(plan, initial_state(plan, 0.0), Start(1.0))[0]
    state = step(plan, state, Pause(1.5, "look first"))[0]
    held, actions = step(plan, state, replayed(2.0, 1000, **{"error-rate": "pass"}))
    assert held is state and actions == []
    assert step(plan, state, replayed(2.0, 1000, **{"error-rate": "fail"}))[0].status == "rolled_back"


def test_a_replay_gate_holds_a_passing_replay_until_approved() -> None:
    plan = make_plan(require_approval=True)
    state = step(plan, initial_state(plan, 0.0), Start(1.0))[0]
    state, _ = step(plan, state, replayed(2.0, 1000, **{"error-rate": "pass"}))
    assert state.status == "replay" and state.awaiting_approval


def test_the_driver_plans_a_replay_phase_from_the_spec() -> None:
    spec = load_spec(spec_with(on_inconclusive="rollback"))
    plan = plan_for(spec, "fraud", "7", "6", "a", None, rollout_id="r1")
    assert plan.phases[0] == PhaseSpec("replay", "replay", 0.0, 0.0, 500, on_inconclusive="rollback")


# --- judging a replay (pure) ---------------------------------------------------------------------------------------


def logged(n: int = 2000, seed: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The champion's logged rows (a score that carries the label's signal) and their labels."""
    rng = np.random.default_rng(seed)
    frame = generate_transactions(n, seed=seed)
    label = frame["is_fraud"].to_numpy()
    score = np.clip(np.where(label == 1, rng.uniform(0.1, 0.9, n), rng.uniform(0.0, 0.19, n)), 0, 1)
    rows = frame[[ACCOUNT_ID, *NUMERIC_FEATURES, *CATEGORICAL_FEATURES]].copy()
    rows[REQUEST_ID] = [f"req-{i}" for i in range(n)]
    rows[TS] = 1000.0 + np.arange(n) * 0.01
    rows[VARIANT], rows[STATUS], rows[MODEL_VERSION], rows[SCORE] = "champion", "ok", "6", score
    feedback = pd.DataFrame({REQUEST_ID: rows[REQUEST_ID], LABEL: label.astype(int), "received_at": 2000.0})
    return rows, feedback


def answers_for(scores: np.ndarray, version: str = "7", failed: set[int] = frozenset()) -> list[BatchAnswer]:
    out = []
    for number, (start, stop) in enumerate(batches(len(scores))):
        if number in failed:
            out.append(BatchAnswer(None, None, "HTTP 500: injected", 5.0))
        else:
            out.append(BatchAnswer(version, [float(s) for s in scores[start:stop]], None, 5.0))
    return out


def judge_replay(rows: pd.DataFrame, feedback: pd.DataFrame, answers: list[BatchAnswer]) -> AnalysisResult:
    sample = ReplaySample(rows, feedback, {"kind": "replay", "requested": 2000, "labelled_found": len(rows)})
    return replay_analysis(load_spec(spec_with(requests=2000)), 0, sample, answers, "7", 3000.0, threshold=THRESHOLD)


def test_a_challenger_scoring_like_the_champion_passes_the_replay() -> None:
    rows, feedback = logged()
    result = judge_replay(rows, feedback, answers_for(rows[SCORE].to_numpy()))
    assert result.verdicts == {"error-rate": "pass", "decline-rate": "pass", "online-recall": "pass"}
    assert result.samples == 2000
    assert result.window is not None
    assert (result.window["replayed"], result.window["errors"], result.window["batch_calls"]) == (2000, 0, 20)


def test_a_challenger_that_lost_its_signal_fails_the_replay_on_recall() -> None:
    rows, feedback = logged()
    shuffled = np.random.default_rng(0).permutation(rows[SCORE].to_numpy())  # same scores, wrong requests
    result = judge_replay(rows, feedback, answers_for(shuffled))
    assert result.verdicts["online-recall"] == "fail"
    assert result.verdicts["decline-rate"] != "fail", "its decline rate is the champion's: only labels tell"


def test_failed_batch_calls_are_challenger_errors_and_another_version_is_never_judged() -> None:
    rows, feedback = logged()
    result = judge_replay(rows, feedback, answers_for(rows[SCORE].to_numpy(), failed={0, 5}))
    assert result.window["errors"] == 2 * BATCH_SIZE and result.samples == 2000 - 2 * BATCH_SIZE
    # Errors are clustered by call (one failed call fails all its requests): two failed calls of 20 are not
    # enough to fail the error rate, but they keep it from passing.
    assert result.values["error-rate"]["value"] == pytest.approx(0.1) and result.verdicts["error-rate"] != "pass"
    other = judge_replay(rows, feedback, answers_for(rows[SCORE].to_numpy(), version="5"))
    assert other.samples == 0 and other.window["other_version"] == 2000
    assert set(other.verdicts.values()) == {"inconclusive"}


def test_replayed_requests_are_the_logged_account_and_inputs_with_integers_restored() -> None:
    rows, _ = logged(3)
    sent = instances(rows)
    assert set(sent[0]) == {ACCOUNT_ID, *NUMERIC_FEATURES, *CATEGORICAL_FEATURES}
    assert isinstance(sent[0]["hour"], int) and sent[0]["account_id"] == rows[ACCOUNT_ID].iloc[0]
    assert batches(1001, size=500) == [(0, 500), (500, 1000), (1000, 1001)]

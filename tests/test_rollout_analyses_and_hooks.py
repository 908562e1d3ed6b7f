"""Recorded analyses (with the transition they cause, in one transaction), hook specs refused at load, and the
hook sender against real local HTTP receivers: signed bodies, retries with backoff, dead and slow receivers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.processes import free_port
from mlops.hook_receiver import HookReceiver
from monitoring.rollout.hooks import GateCaller, HookSender, queue_notifications, sign, verify_signature
from monitoring.rollout.spec import SpecError, fast_spec, load_spec
from monitoring.rollout.state_machine import (
    Analysis,
    AnalysisResult,
    RolloutPlan,
    Start,
    initial_state,
    step,
)
from monitoring.rollout.store import RolloutStore, StaleState
from tests.support import make_plan

SECRET = "s3cret"


def result(at: float, verdict: str, index: int = 0) -> AnalysisResult:
    values = {"error-rate": {"value": 0.01, "baseline": 0.012, "verdict": verdict, "samples": 500}}
    return AnalysisResult(at=at, phase_index=index, samples=500, verdicts={"error-rate": verdict}, values=values)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RolloutStore]:
    instance = RolloutStore(f"sqlite:///{tmp_path / 'cp.db'}")
    yield instance
    instance.close()


def started(store: RolloutStore):
    plan = make_plan()
    state0 = initial_state(plan, 0.0)
    store.create(plan, state0)
    state1, actions = step(plan, state0, Start(at=1.0))
    store.save("r1", state1, actions, expected_version=0)
    return plan, state1


# --- recorded analyses ----------------------------------------------------------------------------------------


def test_every_analysis_is_recorded_and_the_one_that_causes_a_transition_is_saved_with_it(store) -> None:
    plan, state = started(store)
    store.record_analysis("r1", result(10.0, "inconclusive"), state.version)
    passing = result(70.0, "pass")
    state2, actions = step(plan, state, Analysis(passing))
    store.save("r1", state2, actions, expected_version=state.version, analysis=passing)
    rows = store.analyses("r1")
    assert [(r["seq"], r["verdict"], r["transition"], r["state_version"]) for r in rows] == [
        (0, "inconclusive", False, 1),
        (1, "pass", True, 2),
    ]
    assert rows[1]["values"]["error-rate"]["baseline"] == 0.012
    assert [r["seq"] for r in store.analyses("r1", after_seq=0)] == [1]
    assert [r["seq"] for r in store.analyses("r1", limit=1)] == [1]
    assert store.latest_analysis("r1") == passing


def test_a_stale_transition_leaves_no_analysis_behind(store) -> None:
    plan, state = started(store)
    passing = result(70.0, "pass")
    state2, actions = step(plan, state, Analysis(passing))
    store.save("r1", state2, actions, expected_version=state.version, analysis=passing)
    with pytest.raises(StaleState):  # a rival that read version 1 too: neither its state nor its analysis land
        store.save("r1", state2, actions, expected_version=state.version, analysis=result(71.0, "pass"))
    assert [r["at"] for r in store.analyses("r1")] == [70.0]


# --- spec: hooks and gates -------------------------------------------------------------------------------------


def spec_with(**changes) -> dict:
    data = fast_spec().model_dump(exclude_none=True)
    data.update(changes)
    return data


def problems(data: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(data)
    return info.value.problems


def test_a_spec_with_hooks_and_a_gate_loads() -> None:
    phases = spec_with()["phases"]
    phases[1] |= {"require_approval": True, "approval_timeout_s": 60, "on_approval_timeout": "hold"}
    hooks = [
        {
            "name": "team",
            "url": "https://hooks.example.com/x",
            "events": ["promoted", "rolled-back"],
            "format": "slack",
        },
        {"name": "ticket", "url": "http://127.0.0.1:9/ok", "events": ["confirm-promotion"], "phase": "canary-10"},
    ]
    spec = load_spec(spec_with(phases=phases, hooks=hooks))
    assert spec.phases[1].require_approval and spec.phases[1].on_approval_timeout == "hold"
    assert spec.confirm_promotion_phase(spec.hooks[1]) == "canary-10"
    default = spec.hooks[1].model_copy(update={"phase": None})
    assert spec.confirm_promotion_phase(default) == "canary-50"  # the phase before the step to 100 %


@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        ({"url": "ftp://example.com/x"}, "hooks[0].url: must be an http(s) URL with a host, got 'ftp://example.com/x'"),
        ({"url": "file:///etc/passwd"}, "hooks[0].url: must be an http(s) URL"),
        ({"events": ["promoted", "deployed"]}, "hooks[0].events[1]: unknown event 'deployed'"),
        ({"events": []}, "hooks[0].events: must name at least one of"),
        ({"events": ["confirm-promotion"], "phase": "canary-75"}, "hooks[0].phase: no phase named 'canary-75'"),
        ({"phase": "canary-10"}, "hooks[0].phase: only a confirm-promotion hook names the phase it gates"),
        ({"retries": 11}, "hooks[0].retries: must be in [0, 10], got 11"),
        ({"timeout_s": 0}, "hooks[0].timeout_s: must be > 0"),
        ({"format": "xml"}, "hooks[0].format:"),
    ],
)
def test_bad_hooks_are_refused_at_load_naming_the_field(hook: dict, expected: str) -> None:
    base = {"name": "h", "url": "http://127.0.0.1:9/x", "events": ["promoted"]}
    found = problems(spec_with(hooks=[base | hook]))
    assert any(p.startswith(expected) for p in found), found


def test_gate_settings_without_a_gate_and_duplicate_hooks_are_refused() -> None:
    phases = spec_with()["phases"]
    phases[2]["approval_timeout_s"] = 30
    hook = {"name": "h", "url": "http://127.0.0.1:9/x", "events": ["promoted"]}
    found = problems(spec_with(phases=phases, hooks=[hook, hook]))
    assert "phases[2].approval_timeout_s: only with require_approval: true" in found
    assert "hooks[1].name: duplicate hook name 'h' (also hooks[0])" in found


# --- delivery --------------------------------------------------------------------------------------------------


def hook_spec(*hooks: dict):
    return load_spec(spec_with(hooks=list(hooks)))


def queue_one(store: RolloutStore, spec, plan: RolloutPlan) -> None:
    state = store.get(plan.rollout_id)[1]
    assert queue_notifications(store, spec, plan, state.history[-1], time.time()) == len(spec.hooks)


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_a_notification_is_signed_and_carries_the_rollout_versions_phase_and_decision(store) -> None:
    plan, _ = started(store)
    with HookReceiver(SECRET) as receiver:
        spec = hook_spec({"name": "ops", "url": receiver.url(), "events": ["rollout-started"]})
        queue_one(store, spec, plan)
        assert queue_notifications(store, spec, plan, store.get("r1")[1].history[-1], time.time()) == 0, "idempotent"
        sender = HookSender(store, spec, SECRET, poll_s=0.05).start()
        try:
            wait_for(lambda: len(receiver.received) == 1)
        finally:
            sender.stop()
    got = receiver.received[0]
    assert got.event == "rollout-started" and got.signature_ok and got.signature.startswith("sha256=")
    assert got.body["rollout_id"] == "r1" and got.body["challenger_version"] == "5"
    assert got.body["phase"] == "shadow" and got.body["to_status"] == "shadow"
    [delivery] = store.deliveries("r1")
    assert delivery["status"] == "delivered" and [a["status_code"] for a in delivery["attempt_log"]] == [200]


def test_a_signature_made_with_another_secret_does_not_verify() -> None:
    body = b'{"event": "promoted"}'
    assert verify_signature(SECRET, body, sign(SECRET, body))
    assert not verify_signature(SECRET, body, sign("other", body))
    assert not verify_signature(SECRET, body + b" ", sign(SECRET, body))
    assert not verify_signature(SECRET, body, None)


def test_a_failing_receiver_is_retried_with_backoff_and_every_attempt_is_recorded(store) -> None:
    plan, _ = started(store)
    with HookReceiver(SECRET, answer=lambda _p, _e, n: 503 if n < 3 else 200) as receiver:
        spec = hook_spec(
            {"name": "ops", "url": receiver.url(), "events": ["rollout-started"], "retries": 4, "backoff_s": 0.2}
        )
        queue_one(store, spec, plan)
        sender = HookSender(store, spec, SECRET, poll_s=0.02).start()
        try:
            wait_for(lambda: store.deliveries("r1")[0]["status"] == "delivered")
        finally:
            sender.stop()
    [delivery] = store.deliveries("r1")
    log = delivery["attempt_log"]
    assert [a["status_code"] for a in log] == [503, 503, 200]
    assert log[1]["at"] - log[0]["at"] >= 0.2 and log[2]["at"] - log[1]["at"] >= 0.4, "exponential backoff"
    assert "HTTP 503" in log[0]["error"]


def test_a_dead_receiver_gives_up_after_its_retries_with_each_attempt_recorded(store) -> None:
    plan, _ = started(store)
    dead = f"http://127.0.0.1:{free_port()}/gone"  # nothing listens there
    spec = hook_spec({"name": "dead", "url": dead, "events": ["rollout-started"], "retries": 2, "backoff_s": 0.05})
    queue_one(store, spec, plan)
    sender = HookSender(store, spec, SECRET, poll_s=0.02).start()
    try:
        wait_for(lambda: store.deliveries("r1")[0]["status"] == "failed")
    finally:
        sender.stop()
    [delivery] = store.deliveries("r1")
    assert delivery["attempts"] == 3 and all(a["status_code"] is None for a in delivery["attempt_log"])
    assert all("ConnectError" in a["error"] for a in delivery["attempt_log"])


def test_a_slow_gate_never_blocks_the_caller_and_opens_on_its_2xx(store) -> None:
    plan, _ = started(store)
    with HookReceiver(SECRET, delay_s=1.5) as receiver:
        spec = hook_spec({"name": "ticket", "url": receiver.url(), "events": ["pre-rollout"], "timeout_s": 5})
        gates = GateCaller(store, SECRET)
        began = time.monotonic()
        assert gates.passed(plan, "pre-rollout", spec.hooks) is False
        assert time.monotonic() - began < 0.5, "the loop only reads the latest answer"
        wait_for(lambda: gates.passed(plan, "pre-rollout", spec.hooks))
    [call] = store.deliveries("r1")
    assert call["event"] == "pre-rollout" and call["status"] == "go"
    assert receiver.received[0].signature_ok


def test_a_gate_answering_503_stays_closed_and_each_call_is_recorded(store) -> None:
    plan, _ = started(store)
    with HookReceiver(SECRET, answer=lambda *_: 503) as receiver:
        spec = hook_spec({"name": "ticket", "url": receiver.url(), "events": ["confirm-promotion"], "backoff_s": 0})
        gates = GateCaller(store, SECRET)
        opened = threading.Event()
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            if gates.passed(plan, "confirm-promotion", spec.hooks, "canary-5"):
                opened.set()
            time.sleep(0.1)
    assert not opened.is_set()
    calls = store.deliveries("r1")
    assert len(calls) >= 2 and {c["status"] for c in calls} == {"wait"}
    assert all(c["attempt_log"][0]["status_code"] == 503 for c in calls)


def test_the_readme_spec_with_hooks_and_a_gate_loads_and_gates_the_phase_before_100_percent() -> None:
    import re

    import yaml

    from monitoring.rollout.driver import plan_for
    from monitoring.rollout.spec import default_spec

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### Operating a rollout.*?```yaml\n(.*?)```", readme, re.S)
    assert block is not None, "the README's hooks example"
    data = default_spec().model_dump(exclude_none=True) | yaml.safe_load(block.group(1))
    spec = load_spec(data)
    plan = plan_for(spec, "m", "2", "1", "a", None, "r")
    gated = [p.name for p in plan.phases if p.require_approval]
    assert gated == ["canary-50"] and plan.pre_rollout_timeout_s == 900
    canary_50 = next(p for p in plan.phases if p.name == "canary-50")
    assert canary_50.on_approval_timeout == "rollback"  # the confirm-promotion hook's outcome applies
    assert spec.replay_phase is not None and spec.replay_phase.requests == 10000  # it starts with a replay


def test_the_watch_view_shows_phase_weight_times_guardrails_and_a_pause_and_ends_with_the_right_code() -> None:
    from rich.console import Console

    from mlops.watch import outcome_code, render

    plan = make_plan()
    state = step(plan, initial_state(plan, 0.0), Start(at=100.0))[0]
    view = {"rollout_id": "r1", "plan": plan.to_dict(), "state": {**state.to_dict(), "paused": True}}
    values = {"error-rate": {"value": 0.012, "baseline": 0.01, "lower": -0.01, "upper": 0.004, "limit": 0.03,
                             "verdict": "inconclusive", "samples": 80, "min_samples": 100}}  # fmt: skip
    analysis = {"seq": 3, "at": 160.0, "phase_index": 0, "samples": 80, "values": values}
    console = Console(record=True, width=160)
    console.print(render(view, analysis, now=190.0))
    text = console.export_text()
    assert "phase shadow (1/2, shadow)" in text and "weight 0%" in text
    assert "in phase 1m30s" in text and "elapsed 1m30s" in text and "PAUSED" in text
    assert "error-rate" in text and "[-0.01, 0.004]" in text and "inconclusive" in text and "80/100" in text
    assert [outcome_code(s) for s in ("shadow", "promoted_watching", "succeeded", "rolled_back", "aborted")] == [
        None, 0, 0, 1, 1,
    ]  # fmt: skip

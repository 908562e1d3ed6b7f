"""The rollout controller's store: plan/state/actions persistence, optimistic concurrency, decision log, leases."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from monitoring.rollout.state_machine import (
    Analysis,
    AnalysisResult,
    ManualAbort,
    RecordDecision,
    RolloutPlan,
    SetTraffic,
    Start,
    initial_state,
    step,
)
from monitoring.rollout.store import (
    ActiveRolloutExists,
    RolloutExists,
    RolloutStore,
    StaleState,
    UnknownRollout,
)
from tests import support


def make_plan(rollout_id: str = "r1", model_name: str = "fraud") -> RolloutPlan:
    return support.make_plan(rollout_id, model_name, previous_version="3")


def passing(at: float, index: int) -> Analysis:
    values = {"error_rate": {"challenger": 0.01, "champion": 0.012, "p_value": 0.2}}
    return Analysis(
        AnalysisResult(at=at, phase_index=index, samples=500, verdicts={"error_rate": "pass"}, values=values)
    )


@pytest.fixture
def store(db_url: str) -> Iterator[RolloutStore]:
    instance = RolloutStore(db_url)
    yield instance
    instance.close()


def started(store: RolloutStore, rollout_id: str = "r1", model_name: str = "fraud"):
    """Create a rollout and save its Start transition; returns plan, state, actions."""
    plan = make_plan(rollout_id, model_name)
    state0 = initial_state(plan, 0.0)
    store.create(plan, state0)
    state1, actions = step(plan, state0, Start(at=1.0))
    store.save(rollout_id, state1, actions, expected_version=state0.version)
    return plan, state1, actions


def test_plan_state_and_pending_actions_round_trip(store: RolloutStore) -> None:
    plan, state, actions = started(store)
    assert actions and any(isinstance(a, SetTraffic) for a in actions)
    assert store.get("r1") == (plan, state, actions)
    assert store.pending_actions("r1") == list(enumerate(actions))
    [summary] = store.list_rollouts(limit=10)
    assert summary["rollout_id"] == "r1" and summary["model_name"] == "fraud"
    assert (summary["status"], summary["version"], summary["active"]) == ("shadow", 1, True)
    assert summary["pending_actions"] == len(actions)


def test_unknown_rollout_is_a_key_error(store: RolloutStore) -> None:
    with pytest.raises(UnknownRollout):
        store.get("nope")
    with pytest.raises(KeyError):
        store.pending_actions("nope")


def test_creating_the_same_rollout_twice_is_refused(store: RolloutStore) -> None:
    plan = make_plan()
    store.create(plan, initial_state(plan, 0.0))
    with pytest.raises(RolloutExists):
        store.create(plan, initial_state(plan, 0.0))


def test_save_with_an_old_version_raises_stale_state_and_changes_nothing(store: RolloutStore) -> None:
    plan, state1, _ = started(store)
    before = (store.get("r1"), store.decisions("r1"))
    # A second controller that also read version 0 computes its own transition and tries to apply it.
    rival, rival_actions = step(plan, initial_state(plan, 0.0), ManualAbort(at=2.0, reason="rival"))
    with pytest.raises(StaleState) as info:
        store.save("r1", rival, rival_actions, expected_version=0)
    assert (info.value.expected, info.value.current) == (0, 1)
    assert (store.get("r1"), store.decisions("r1")) == before
    # The controller holding version 1 proceeds.
    state2, actions2 = step(plan, state1, passing(at=100.0, index=0))
    store.save("r1", state2, actions2, expected_version=state1.version)
    assert store.get("r1")[1].version == 2


def test_only_one_active_rollout_per_model(store: RolloutStore) -> None:
    started(store, "r1", "fraud")
    other = make_plan("r2", "fraud")
    with pytest.raises(ActiveRolloutExists) as info:
        store.create(other, initial_state(other, 0.0))
    assert info.value.active_rollout_id == "r1"
    assert store.active("fraud") == "r1"
    started(store, "r3", "another-model")  # other models are independent
    assert store.active("another-model") == "r3"


def test_terminal_rollout_frees_the_model(store: RolloutStore) -> None:
    plan, state1, _ = started(store)
    aborted, actions = step(plan, state1, ManualAbort(at=5.0, reason="operator"))
    store.save("r1", aborted, actions, expected_version=state1.version)
    assert store.active("fraud") is None
    started(store, "r2", "fraud")
    assert store.active("fraud") == "r2"
    assert {r["rollout_id"]: r["active"] for r in store.list_rollouts()} == {"r1": False, "r2": True}


def test_pending_actions_survive_a_restart_and_complete_action_removes_them(db_url: str) -> None:
    first = RolloutStore(db_url)
    _, state, actions = started(first)
    assert first.complete_action("r1", 0)
    first.close()  # the driver crashes after executing the first action

    second = RolloutStore(db_url)
    try:
        assert second.pending_actions("r1") == list(enumerate(actions))[1:]
        assert second.get("r1")[2] == actions[1:]
        assert not second.complete_action("r1", 0)  # already done
        assert not second.complete_action("r1", 1, state_version=state.version - 1)  # not that transition's
        for index, _action in second.pending_actions("r1"):
            assert second.complete_action("r1", index, state_version=state.version)
        assert second.pending_actions("r1") == []
        assert second.get("r1")[1] == state
    finally:
        second.close()


def test_decisions_are_appended_in_order_with_their_metrics(store: RolloutStore) -> None:
    plan, state1, _ = started(store)
    state2, actions2 = step(plan, state1, passing(at=100.0, index=0))
    store.save("r1", state2, actions2, expected_version=state1.version)
    state3, actions3 = step(plan, state2, ManualAbort(at=150.0, reason="operator said so"))
    store.save("r1", state3, actions3, expected_version=state2.version)

    log = store.decisions("r1")
    assert [d["seq"] for d in log] == [0, 1, 2]
    assert [(d["from_status"], d["to_status"]) for d in log] == [
        ("pending", "shadow"),
        ("shadow", "canary"),
        ("canary", "aborted"),
    ]
    assert [d["at"] for d in log] == [1.0, 100.0, 150.0]
    recorded = next(a.decision for a in actions2 if isinstance(a, RecordDecision))
    assert log[1]["metrics"] == recorded.metrics
    assert log[1]["metrics"]["values"]["error_rate"]["challenger"] == 0.01
    assert log[2]["reason"] == state3.reason
    assert [d.to_status for d in state3.history] == [d["to_status"] for d in log]
    assert store.decisions("other") == []


def test_lease_is_exclusive_renewable_taken_over_after_expiry_and_released(store: RolloutStore) -> None:
    assert store.lease_holder("ctl", now=0.0) is None
    assert store.acquire_lease("ctl", "alice", ttl_s=10.0, now=0.0)
    assert not store.acquire_lease("ctl", "bob", ttl_s=10.0, now=5.0)
    assert store.lease_holder("ctl", now=5.0) == "alice"
    assert store.acquire_lease("ctl", "alice", ttl_s=10.0, now=8.0)  # renewal: now held until 18
    assert not store.acquire_lease("ctl", "bob", ttl_s=10.0, now=15.0)
    assert store.lease_holder("ctl", now=18.0) is None  # expired
    assert store.acquire_lease("ctl", "bob", ttl_s=10.0, now=18.0)
    assert store.lease_holder("ctl", now=20.0) == "bob"
    assert not store.release_lease("ctl", "alice")  # not hers any more
    assert store.release_lease("ctl", "bob")
    assert store.lease_holder("ctl", now=20.0) is None
    assert store.acquire_lease("ctl", "alice", ttl_s=10.0, now=21.0)
    assert store.acquire_lease("other", "bob", ttl_s=10.0, now=21.0)  # leases are independent by name
    with pytest.raises(ValueError):
        store.acquire_lease("ctl", "alice", ttl_s=0.0, now=21.0)


def test_racing_stores_exactly_one_wins_the_lease_each_round(db_url: str) -> None:
    stores = [RolloutStore(db_url) for _ in range(3)]
    rounds = 50
    barrier = threading.Barrier(len(stores))
    wins: list[list[str]] = [[] for _ in range(rounds)]
    errors: list[BaseException] = []

    def contend(index: int) -> None:
        holder = f"controller-{index}"
        try:
            for r in range(rounds):
                barrier.wait(timeout=10)
                # Each round starts after the previous lease expired, so everyone may try a takeover.
                if stores[index].acquire_lease("ctl", holder, ttl_s=10.0, now=100.0 * r):
                    wins[r].append(holder)
        except BaseException as exc:  # surfaced below; a failed thread must not hang the others
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(stores))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for s in stores:
            s.close()
    assert not errors, errors
    assert all(len(w) == 1 for w in wins), wins

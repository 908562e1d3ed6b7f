"""The control-plane store: versioned, append-only, compare-and-set, shared by processes through one SQLite file."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from control_plane.store import (
    SLOTS,
    ControlPlaneStore,
    GenerationConflict,
    PolicyError,
    UnknownSlot,
)

GOOD: dict[str, Any] = {"weights": {"a": 0.95, "b": 0.05}, "shadow": False, "champion_slot": "a", "reason": "canary 5%"}


@pytest.fixture
def store(db_url: str) -> Iterator[ControlPlaneStore]:
    instance = ControlPlaneStore(db_url)
    yield instance
    instance.close()


def test_default_policy_is_generation_zero_all_traffic_to_a(store: ControlPlaneStore) -> None:
    policy = store.get_policy()
    assert (policy.generation, policy.weights, policy.shadow, policy.champion_slot) == (
        0,
        {"a": 1.0, "b": 0.0},
        False,
        "a",
    )
    policy.weights["a"] = 0.0  # callers mutating their copy must not change the next default
    assert store.get_policy().weights == {"a": 1.0, "b": 0.0}


def test_policy_generations_increase_by_one_per_write(store: ControlPlaneStore) -> None:
    generations = [store.set_policy(**GOOD).generation for _ in range(3)]
    assert generations == [1, 2, 3]
    assert store.get_policy().generation == 3


def test_slot_generations_increase_by_one_per_slot(store: ControlPlaneStore) -> None:
    assert store.get_assignment("a").generation == 0
    assert store.get_assignment("a").model_version is None
    assert [store.assign("a", v).generation for v in ("1", "2")] == [1, 2]
    assert store.assign("b", "7").generation == 1  # independent counter per slot
    assignments = store.get_assignments()
    assert {slot: (a.model_version, a.generation) for slot, a in assignments.items()} == {"a": ("2", 2), "b": ("7", 1)}


def test_slot_can_be_unassigned_with_none(store: ControlPlaneStore) -> None:
    store.assign("b", "3")
    cleared = store.assign("b", None)
    assert (cleared.model_version, cleared.generation) == (None, 2)


def test_history_keeps_one_row_per_generation_newest_first(store: ControlPlaneStore) -> None:
    store.set_policy(**GOOD)
    store.set_policy(weights={"a": 0.5, "b": 0.5}, shadow=False, champion_slot="a", reason="canary 50%")
    store.set_policy(weights={"a": 0.0, "b": 1.0}, shadow=False, champion_slot="b", reason="promote b")
    history = store.policy_history(limit=10)
    assert [(p.generation, p.weights["b"], p.reason) for p in history] == [
        (3, 1.0, "promote b"),
        (2, 0.5, "canary 50%"),
        (1, 0.05, "canary 5%"),
    ]
    assert [p.generation for p in store.policy_history(limit=2)] == [3, 2]
    store.assign("a", "1")
    store.assign("a", "2")
    assert [a.model_version for a in store.assignment_history("a")] == ["2", "1"]


def test_compare_and_set_with_stale_generation_conflicts_and_writes_nothing(store: ControlPlaneStore) -> None:
    first = store.set_policy(**GOOD, expected_generation=0)
    with pytest.raises(GenerationConflict) as caught:
        store.set_policy(
            weights={"a": 0.0, "b": 1.0}, shadow=False, champion_slot="b", reason="stale", expected_generation=0
        )
    assert (caught.value.expected, caught.value.current) == (0, 1)
    assert store.get_policy() == first
    assert store.set_policy(**GOOD, expected_generation=1).generation == 2


def test_compare_and_set_on_slot_assignment(store: ControlPlaneStore) -> None:
    store.assign("a", "1", expected_generation=0)
    with pytest.raises(GenerationConflict):
        store.assign("a", "2", expected_generation=0)
    assert store.get_assignment("a").model_version == "1"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"weights": {"a": 0.5, "b": 0.4}}, "weights"),
        ({"weights": {"a": 1.0}}, "weights"),
        ({"weights": {"a": 0.5, "b": 0.5, "c": 0.0}}, "weights"),
        ({"weights": {"a": 1.5, "b": -0.5}}, "weights"),
        ({"weights": {"a": math.nan, "b": 0.5}}, "weights"),
        ({"weights": {"a": True, "b": False}}, "weights"),
        ({"weights": [1.0, 0.0]}, "weights"),
        ({"shadow": "yes"}, "shadow"),
        ({"champion_slot": "c"}, "champion_slot"),
        ({"reason": "  "}, "reason"),
        ({"reason": "x" * 5000}, "reason"),
        ({"expected_generation": True}, "expected_generation"),
    ],
)
def test_invalid_policy_values_raise_policy_error_naming_the_field(
    store: ControlPlaneStore, change: dict[str, Any], field: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        store.set_policy(**{**GOOD, **change})
    assert caught.value.field == field
    assert field in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert store.get_policy().generation == 0


def test_weights_summing_to_one_within_tolerance_are_accepted(store: ControlPlaneStore) -> None:
    policy = store.set_policy(weights={"a": 0.7, "b": 0.3 + 5e-10}, shadow=True, champion_slot="b", reason="ok")
    assert policy.shadow is True and policy.champion_slot == "b"


def test_invalid_model_version_names_the_field(store: ControlPlaneStore) -> None:
    with pytest.raises(PolicyError) as caught:
        store.assign("a", "")
    assert caught.value.field == "model_version"


@pytest.mark.parametrize("slot", ["c", "", "A"])
def test_unknown_slot_raises_unknown_slot(store: ControlPlaneStore, slot: str) -> None:
    with pytest.raises(UnknownSlot):
        store.get_assignment(slot)
    with pytest.raises(KeyError):  # UnknownSlot is a KeyError, so mapping-style callers need no special case
        store.assign(slot, "1")
    assert set(store.get_assignments()) == set(SLOTS)


def test_two_store_instances_on_one_sqlite_file_see_each_others_writes(db_url: str) -> None:
    first, second = ControlPlaneStore(db_url), ControlPlaneStore(db_url)
    try:
        first.set_policy(**GOOD)
        assert second.get_policy().reason == "canary 5%"
        second.assign("b", "9")
        assert first.get_assignment("b").model_version == "9"
        assert second.set_policy(**GOOD, expected_generation=1).generation == 2
        with pytest.raises(GenerationConflict):
            first.set_policy(**GOOD, expected_generation=1)
        assert first.generations().policy == 2
    finally:
        first.close()
        second.close()


def test_sqlite_file_runs_in_wal_mode(store: ControlPlaneStore, db_url: str) -> None:
    with store._engine.connect() as conn:  # white-box: WAL is what lets readers run beside the writer
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_concurrent_writers_on_separate_connections_get_distinct_consecutive_generations(db_url: str) -> None:
    stores = [ControlPlaneStore(db_url) for _ in range(2)]
    errors: list[BaseException] = []

    def write(store: ControlPlaneStore) -> None:
        try:
            for _ in range(15):
                store.set_policy(**GOOD)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(stores[i % 2],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors
        assert [p.generation for p in stores[0].policy_history(limit=100)] == list(range(60, 0, -1))
    finally:
        for store in stores:
            store.close()


def test_concurrent_compare_and_set_lets_exactly_one_writer_win(db_url: str) -> None:
    stores = [ControlPlaneStore(db_url) for _ in range(2)]
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def write(store: ControlPlaneStore, index: int) -> None:
        barrier.wait()
        try:
            store.set_policy(**{**GOOD, "reason": f"writer {index}"}, expected_generation=0)
            outcomes.append("won")
        except GenerationConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=write, args=(stores[i % 2], i)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert sorted(outcomes) == ["conflict"] * 5 + ["won"]
        assert stores[1].get_policy().generation == 1
    finally:
        for store in stores:
            store.close()

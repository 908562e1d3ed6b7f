"""A decision whose actions fail (MLflow or the control plane down at that moment) leaves them pending on a rollout
that is no longer active; the controller's loop finishes them, in order, exactly once. The store is the real SQLite
store; the effects record calls and fail the first alias write, which is what an MLflow outage looks like to them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from monitoring.rollout.driver import Controller
from monitoring.rollout.spec import fast_spec
from monitoring.rollout.state_machine import ManualAbort
from monitoring.rollout.store import RolloutStore


class RecordingEffects:
    """The effects protocol, recording each call; `set_alias` raises while `mlflow_down` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.mlflow_down = False

    def set_traffic(self, action: Any) -> None:
        self.calls.append(("set_traffic", action.champion_slot))

    def assign_slot(self, slot: str, version: str) -> None:
        self.calls.append(("assign_slot", (slot, version)))

    def set_alias(self, alias: str, version: str | None) -> None:
        if self.mlflow_down:
            raise ConnectionError("MLflow does not answer")
        self.calls.append(("set_alias", (alias, version)))

    def mark_rejected(self, version: str, reason: str) -> None:
        self.calls.append(("mark_rejected", version))

    def slot_version(self, slot: str) -> str | None:
        return {"a": "1", "b": "2"}[slot]

    def champion(self) -> tuple[str, str, str | None]:
        return "1", "a", None


def test_actions_left_pending_by_a_decision_are_finished_once_by_the_loop(tmp_path: Path) -> None:
    effects = RecordingEffects()
    store = RolloutStore(f"sqlite:///{tmp_path / 'rollouts.db'}")
    controller = Controller(spec=fast_spec(), store=store, effects=effects, log_dir=tmp_path, model_name="m")
    rollout_id = controller.start("2")
    effects.mlflow_down = True
    with pytest.raises(ConnectionError):
        controller.apply(rollout_id, ManualAbort(at=controller.clock(), reason="operator"))
    assert store.active("m") is None  # decided: the loop's active rollout is gone
    assert store.pending_actions(rollout_id)  # ... with its alias write and what follows still to do
    done_before = list(effects.calls)

    with pytest.raises(ConnectionError):  # MLflow still down: the tick fails (the loop logs it), nothing is lost
        controller.tick()
    assert store.pending_actions(rollout_id)

    effects.mlflow_down = False
    controller.tick()
    assert store.pending_actions(rollout_id) == []
    finished = effects.calls[len(done_before) :]
    assert ("set_alias", ("challenger", None)) in finished
    assert ("mark_rejected", "2") in finished or ("mark_rejected", "2") in done_before
    assert len(finished) == len(set(finished))  # each once

    controller.tick()
    assert effects.calls[len(done_before) :] == finished  # nothing runs twice

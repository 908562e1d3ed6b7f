"""The analyses table's history limit: finished rollouts beyond the newest N keep only the analyses that caused a
transition (their decisions' evidence); active rollouts and the newest finished ones keep every analysis. Real
SQLite store; the controller's idle loop prunes once per finished rollout."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import SettingsError, load_settings
from monitoring.rollout.driver import Controller
from monitoring.rollout.spec import fast_spec
from monitoring.rollout.state_machine import AnalysisResult, ManualAbort
from monitoring.rollout.store import RolloutStore
from tests.test_decided_rollout_actions import RecordingEffects as _Recording


class RecordingEffects(_Recording):
    """Slots report the version last assigned to them, so a rollout of any version starts without waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.slots = {"a": "1", "b": "2"}

    def assign_slot(self, slot: str, version: str) -> None:
        super().assign_slot(slot, version)
        self.slots[slot] = version

    def slot_version(self, slot: str) -> str | None:
        return self.slots[slot]


def inconclusive(at: float) -> AnalysisResult:
    return AnalysisResult(at=at, phase_index=0, samples=10, verdicts={"error-rate": "inconclusive"}, values={})


def run_and_abort(controller: Controller, store: RolloutStore, version: str, looks: int) -> str:
    """A rollout with `looks` analyses that changed nothing, then aborted (one decision)."""
    rollout_id = controller.start(version)
    _, state, _ = store.get(rollout_id)
    for i in range(looks):
        store.record_analysis(rollout_id, inconclusive(10.0 + i), state.version)
    controller.apply(rollout_id, ManualAbort(at=controller.clock(), reason="operator"))
    return rollout_id


def test_old_finished_rollouts_keep_only_the_analyses_behind_their_decisions(tmp_path: Path) -> None:
    store = RolloutStore(f"sqlite:///{tmp_path / 'rollouts.db'}")
    controller = Controller(spec=fast_spec(), store=store, effects=RecordingEffects(), log_dir=tmp_path,
                            model_name="m", analyses_history_rollouts=2)  # fmt: skip
    ids = [run_and_abort(controller, store, str(v), looks=5) for v in (2, 3, 4)]
    counts = {rid: len(store.analyses(rid)) for rid in ids}
    assert all(n >= 5 for n in counts.values())
    decisive = {rid: [a for a in store.analyses(rid) if a["transition"]] for rid in ids}

    deleted = store.prune_analyses("m", keep_rollouts=2)

    assert deleted == 5  # the oldest rollout's five looks that changed nothing
    assert store.analyses(ids[0]) == decisive[ids[0]]  # what decided it is still there
    assert {rid: len(store.analyses(rid)) for rid in ids[1:]} == {rid: counts[rid] for rid in ids[1:]}
    assert store.decisions(ids[0])  # the decision log is untouched
    assert store.prune_analyses("m", keep_rollouts=2) == 0  # idempotent


def test_an_active_rollout_and_other_models_are_never_pruned(tmp_path: Path) -> None:
    store = RolloutStore(f"sqlite:///{tmp_path / 'rollouts.db'}")
    effects = RecordingEffects()
    other = Controller(spec=fast_spec(), store=store, effects=effects, log_dir=tmp_path, model_name="other")
    finished_other = run_and_abort(other, store, "2", looks=3)
    controller = Controller(spec=fast_spec(), store=store, effects=effects, log_dir=tmp_path, model_name="m")
    active = controller.start("2")
    _, state, _ = store.get(active)
    for i in range(3):
        store.record_analysis(active, inconclusive(10.0 + i), state.version)
    before = {rid: len(store.analyses(rid)) for rid in (finished_other, active)}
    assert store.prune_analyses("m", keep_rollouts=0) == 0
    assert {rid: len(store.analyses(rid)) for rid in (finished_other, active)} == before


def test_the_idle_controller_prunes_once_per_finished_rollout(tmp_path: Path) -> None:
    store = RolloutStore(f"sqlite:///{tmp_path / 'rollouts.db'}")
    controller = Controller(spec=fast_spec(), store=store, effects=RecordingEffects(), log_dir=tmp_path,
                            model_name="m", analyses_history_rollouts=0)  # fmt: skip
    first = run_and_abort(controller, store, "2", looks=4)
    controller.tick()  # idle: prunes the finished rollout's looks
    assert all(a["transition"] for a in store.analyses(first))
    store.record_analysis(first, inconclusive(99.0), store.get(first)[1].version)  # (a late writer, for the test)
    controller.tick()  # nothing finished since: no second pass
    assert not all(a["transition"] for a in store.analyses(first))
    run_and_abort(controller, store, "3", looks=1)
    controller.tick()  # a rollout finished: prunes again
    assert all(a["transition"] for a in store.analyses(first))


def test_a_negative_history_limit_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOPS_ANALYSES_HISTORY_ROLLOUTS", "-1")
    with pytest.raises(SettingsError, match="MLOPS_ANALYSES_HISTORY_ROLLOUTS"):
        load_settings()

"""The thin loop around the pure state machine: observe, step, persist, act.

Each tick, the controller that holds the lease (only one acts at a time) finishes any actions a
previous controller left pending, checks the challenger's slot, runs an analysis of the current
phase's window of the prediction log, feeds the result to `step`, saves the new state with
optimistic concurrency (a stale writer is refused), then executes the actions one by one, marking
each done. Actions are idempotent, so a controller killed mid-way and restarted re-runs at most the
one in flight, and a decision is never taken twice: terminal states ignore every event.

Every analysis is recorded: with the transition it causes, in the same transaction (``save``), or on its own
when it changes nothing (``record_analysis``). Hooks (``monitoring.rollout.hooks``) never run on this loop:
notifications are queued in the store while the decision's ``RecordDecision`` action executes and sent by a
background thread; gating hooks are asked in threads of their own, and the loop only reads their last answer.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.settings import DEFAULT_DECISION_THRESHOLD
from monitoring.rollout.analysis import analyse
from monitoring.rollout.hooks import GateCaller, queue_notifications
from monitoring.rollout.replay import BatchAnswer, batches, instances, replay_analysis, select_sample
from monitoring.rollout.spec import RolloutSpec, load_spec
from monitoring.rollout.state_machine import (
    Action,
    Analysis,
    Approve,
    AssignSlot,
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
    current_phase,
    initial_state,
    step,
)

log = logging.getLogger("mlops.controller")
LEASE = "rollout-controller"
WATCH = "watch"


class Effects(Protocol):
    """What the controller does to the outside world; `LiveEffects` is the real one."""

    def set_traffic(self, action: SetTraffic) -> None: ...
    def assign_slot(self, slot: str, version: str) -> None: ...
    def set_alias(self, alias: str, version: str | None) -> None: ...
    def mark_rejected(self, version: str, reason: str) -> None: ...
    def slot_version(self, slot: str) -> str | None: ...  # None when the slot does not answer
    def score_batch(self, slot: str, instances: list[dict[str, Any]]) -> BatchAnswer: ...  # the slot's batch API
    def champion(self) -> tuple[str, str, str | None]: ...  # (champion version, its slot, previous version)


def plan_for(
    spec: RolloutSpec,
    model_name: str,
    challenger_version: str,
    champion_version: str,
    champion_slot: str,
    previous_version: str | None,
    rollout_id: str | None = None,
) -> RolloutPlan:
    # A confirm-promotion hook is a gate on its phase: its 2xx approves; its timeout is the gate's.
    confirm = {spec.confirm_promotion_phase(h): h for h in spec.hooks_for("confirm-promotion")}
    pre_rollout = spec.hooks_for("pre-rollout")
    phases = tuple(
        PhaseSpec(
            name=p.name,
            kind=p.kind,
            weight=p.weight if p.kind == "canary" else 0.0,
            min_duration_s=p.min_duration_s,
            min_samples=p.min_samples,
            max_duration_s=p.max_duration_s,
            require_approval=p.require_approval or p.name in confirm,
            approval_timeout_s=confirm[p.name].gate_timeout_s if p.name in confirm else p.approval_timeout_s,
            on_approval_timeout=confirm[p.name].on_timeout if p.name in confirm else p.on_approval_timeout,
            on_inconclusive=p.on_inconclusive or "advance",
        )
        for p in spec.phases
    )
    return RolloutPlan(
        rollout_id=rollout_id or f"rollout-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        model_name=model_name,
        challenger_version=challenger_version,
        champion_version=champion_version,
        champion_slot=champion_slot,
        challenger_slot="b" if champion_slot == "a" else "a",
        phases=phases,
        failure_limit=spec.failure_limit,
        post_promotion_watch_s=spec.post_promotion_watch_s,
        previous_version=previous_version,
        pre_rollout_timeout_s=min(h.gate_timeout_s for h in pre_rollout) if pre_rollout else None,
        on_pre_rollout_timeout=(
            "rollback" if any(h.on_timeout == "rollback" for h in pre_rollout) or not pre_rollout else "hold"
        ),
        on_failure_while_paused=spec.on_failure_while_paused,
    )


@dataclass
class Controller:
    spec: RolloutSpec
    store: Any  # monitoring.rollout.store.RolloutStore
    effects: Effects
    log_dir: Path
    model_name: str
    holder: str = field(default_factory=lambda: f"controller-{uuid.uuid4().hex[:8]}")
    clock: Callable[[], float] = time.time
    slot_ready_timeout_s: float = 60.0
    decision_threshold: float = DEFAULT_DECISION_THRESHOLD  # the process passes settings.decision_threshold
    hook_secret: str = ""  # settings.hook_secret: signs every hook body
    log_flush_s: float = 1.0  # settings.log_flush_seconds: how far behind the gateway's log may normally be
    prometheus: Any = None  # a PrometheusClient when settings.prometheus_url is set (prometheus guardrails)
    analyses_history_rollouts: int = 20  # settings.analyses_history_rollouts: see `RolloutStore.prune_analyses`
    _pruned_for: str | None = None  # the newest finished rollout when analyses were last pruned
    _slot_down: set[str] = field(default_factory=set)
    last_analysis: Any = None  # this process's latest AnalysisResult (the store has every one)
    gates: GateCaller | None = None
    _specs: dict[str, RolloutSpec] = field(default_factory=dict)  # rollout id -> its spec (they never change)

    def __post_init__(self) -> None:
        if self.gates is None:
            self.gates = GateCaller(self.store, self.hook_secret, self.clock)

    def spec_for(self, rollout_id: str) -> RolloutSpec:
        """The spec a rollout runs under: the one it was started with, else the controller's."""
        if rollout_id not in self._specs:
            stored = self.store.spec_of(rollout_id)
            self._specs[rollout_id] = self.spec if stored is None else load_spec(stored)
        return self._specs[rollout_id]

    def tick_interval(self) -> float:
        """How often to tick: the active rollout's analysis interval (the controller's when none is active)."""
        rollout_id = self.store.active(self.model_name)
        return (self.spec if rollout_id is None else self.spec_for(rollout_id)).analysis_interval_s

    # --- commands (API / CLI) ------------------------------------------------------------------

    def start(self, challenger_version: str, spec: RolloutSpec | None = None) -> str:
        """Start a rollout of `challenger_version`, under `spec` (stored with the rollout) or the controller's."""
        champion_version, champion_slot, previous = self.effects.champion()
        if challenger_version == champion_version:
            raise ValueError(f"version {challenger_version} is already the champion")
        chosen = spec or self.spec
        plan = plan_for(chosen, self.model_name, challenger_version, champion_version, champion_slot, previous)
        stored = None if spec is None else spec.model_dump(mode="json", exclude_none=True)
        self.store.create(plan, initial_state(plan, self.clock()), spec=stored)
        self._specs[plan.rollout_id] = chosen
        if not chosen.hooks_for("pre-rollout"):
            self.apply(plan.rollout_id, Start(at=self.clock()))
        # else: pending until the pre-rollout hooks say go (the loop asks them, `_gate_event`)
        return plan.rollout_id

    def apply(self, rollout_id: str, event: Any) -> RolloutState:
        """Step the state machine with one event, persist (an analysis with the transition it causes, or on
        its own), then execute the actions in order."""
        plan, state = self._finish_pending(rollout_id)
        new_state, actions = step(plan, state, event)
        analysis = event.result if isinstance(event, Analysis) else None
        if new_state is state:
            if analysis is not None:
                self.store.record_analysis(rollout_id, analysis, state.version)
            return state  # ignored: nothing to persist, nothing to do
        self.store.save(rollout_id, new_state, actions, expected_version=state.version, analysis=analysis)
        self._execute(plan, actions)
        return new_state

    # --- the loop ------------------------------------------------------------------------------

    def tick(self) -> RolloutState | None:
        """One iteration; does nothing unless this controller holds the lease."""
        now = self.clock()
        if not self.store.acquire_lease(LEASE, self.holder, ttl_s=max(5.0, 3 * self.spec.analysis_interval_s), now=now):
            return None
        rollout_id = self.store.active(self.model_name)
        if rollout_id is None:
            self._finish_decided()
            return None
        plan, state = self._finish_pending(rollout_id)
        spec = self.spec_for(rollout_id)
        gate_event = self._gate_event(spec, plan, state, now)
        if gate_event is not None:
            state = self.apply(rollout_id, gate_event)
        slot_event = self._slot_event(plan, state, now)
        if slot_event is not None:
            state = self.apply(rollout_id, slot_event)
        if state.terminal:
            return state
        return self.apply(rollout_id, self._observe(spec, plan, state, now))

    def _gate_event(
        self, spec: RolloutSpec, plan: RolloutPlan, state: RolloutState, now: float
    ) -> Start | Approve | None:
        """Start once the pre-rollout hooks said go; Approve once the confirm-promotion hooks of the waiting
        phase did. Never waits: the hooks are asked in threads (`GateCaller`)."""
        assert self.gates is not None
        if state.status == "pending":
            hooks = spec.hooks_for("pre-rollout")
            if hooks and self.gates.passed(plan, "pre-rollout", hooks):
                return Start(at=now)
            return None
        phase = current_phase(plan, state)
        if phase is None or not state.awaiting_approval or state.paused:
            return None
        hooks = [h for h in spec.hooks_for("confirm-promotion") if spec.confirm_promotion_phase(h) == phase.name]
        if hooks and self.gates.passed(plan, "confirm-promotion", hooks, phase.name):
            return Approve(at=now, reason=f"confirm-promotion hook {', '.join(h.name for h in hooks)} answered 2xx")
        return None

    def _observe(self, spec: RolloutSpec, plan: RolloutPlan, state: RolloutState, now: float) -> Any:
        phase = current_phase(plan, state)
        kind = phase.kind if phase is not None else WATCH
        if state.status == "replay":
            return self._replay(spec, plan, state, now)
        if state.status not in ("shadow", "canary", "promoted_watching"):
            return Tick(at=now)
        # Skip the first second of a phase: gateways apply a new policy within 1 s of it being written.
        since = state.phase_started_at + 1.0
        if now <= since:
            return Tick(at=now)
        # Judge the versions of the plan only: after promotion the challenger answers as champion.
        versions = (
            {"champion": plan.challenger_version}
            if kind == WATCH
            else {"champion": plan.champion_version, "challenger": plan.challenger_version}
        )
        result = analyse(
            spec,
            kind,
            state.phase_index,
            self.log_dir,
            since,
            now,
            threshold=self.decision_threshold,
            versions=versions,
            prometheus=self.prometheus,
            flush_s=self.log_flush_s,
        )
        self.last_analysis = result
        return Analysis(result=result)

    def _replay(self, spec: RolloutSpec, plan: RolloutPlan, state: RolloutState, now: float) -> Analysis | Tick:
        """The replay phase's observation (`monitoring.rollout.replay`): read the last labelled requests from the
        prediction log, score them again through the challenger slot's batch API, judge them. Nothing is replayed
        while the slot does not serve the challenger (that is reported as SlotDown, and counted)."""
        if plan.challenger_slot in self._slot_down:
            return Tick(at=now)
        phase = spec.phases[state.phase_index]
        sample = select_sample(
            self.log_dir,
            plan.champion_version,
            now,
            requests=int(phase.requests or 0),
            label_delay_s=float(phase.label_delay_s or 0.0),
            lookback_s=float(phase.lookback_s or 0.0),
        )
        calls = instances(sample.rows) if not sample.rows.empty else []
        answers = [self.effects.score_batch(plan.challenger_slot, calls[a:b]) for a, b in batches(len(calls))]
        result = replay_analysis(
            spec,
            state.phase_index,
            sample,
            answers,
            plan.challenger_version,
            max(self.clock(), now),
            threshold=self.decision_threshold,
        )
        log.info("%s: replayed %s", plan.rollout_id, result.window)
        self.last_analysis = result
        return Analysis(result=result)

    def _slot_event(self, plan: RolloutPlan, state: RolloutState, now: float) -> SlotDown | None:
        """Edge-triggered: report the challenger's slot once when it stops answering, or answers with another
        version than the challenger (it could not load it: it keeps serving what it had)."""
        if state.status not in ("replay", "shadow", "canary", "promoted_watching"):
            return None
        slot = plan.challenger_slot
        serving = self.effects.slot_version(slot)
        if serving == plan.challenger_version:
            self._slot_down.discard(slot)
            return None
        if slot in self._slot_down:
            return None
        self._slot_down.add(slot)
        if serving is None:
            return SlotDown(at=now, slot=slot, detail=f"slot {slot} does not answer")
        return SlotDown(
            at=now,
            slot=slot,
            detail=f"slot {slot} serves version {serving}, not the challenger {plan.challenger_version}",
        )

    # --- actions ---------------------------------------------------------------------------------

    def _execute(self, plan: RolloutPlan, actions: list[Action]) -> None:
        for index, action in enumerate(actions):
            self._do(plan, action)
            self.store.complete_action(plan.rollout_id, index)

    def _finish_pending(self, rollout_id: str) -> tuple[RolloutPlan, RolloutState]:
        """Actions a previous controller saved but did not finish (it died): run them first, in order."""
        plan, state, _ = self.store.get(rollout_id)
        for index, action in self.store.pending_actions(rollout_id):
            self._do(plan, action)
            self.store.complete_action(rollout_id, index)
        return plan, state

    def _finish_decided(self) -> None:
        """Actions of a rollout that is decided but whose last actions failed (MLflow or the control plane was
        down when the decision was taken): no longer active, so the loop above would never see them; finish them
        here, in order, exactly once (each is marked done as it completes)."""
        recent = self.store.list_rollouts(limit=3, model_name=self.model_name)
        for summary in recent:
            if summary["pending_actions"] and not summary["active"]:
                self._finish_pending(summary["rollout_id"])
        # Once per finished rollout, while idle: thin the analyses of rollouts beyond the history kept.
        newest = next((r["rollout_id"] for r in recent if not r["active"] and not r["pending_actions"]), None)
        if newest is not None and newest != self._pruned_for:
            self.store.prune_analyses(self.model_name, self.analyses_history_rollouts)
            self._pruned_for = newest

    def _do(self, plan: RolloutPlan, action: Action) -> None:
        if isinstance(action, SetTraffic):
            self.effects.set_traffic(action)
        elif isinstance(action, AssignSlot):
            self.effects.assign_slot(action.slot, action.version)
            self._wait_for_slot(action.slot, action.version)
        elif isinstance(action, SetAlias):
            self.effects.set_alias(action.alias, action.version)
        elif isinstance(action, MarkRejected):
            self.effects.mark_rejected(action.version, action.reason)
        elif isinstance(action, Notify):
            log.info("%s: %s", plan.rollout_id, action.message)
        elif isinstance(action, RecordDecision) and (spec := self.spec_for(plan.rollout_id)).hooks:
            # The store recorded it with the state, in the same transaction. Queue its notifications before this
            # action is marked done: a controller that dies here re-runs it, and the queue is idempotent.
            queue_notifications(self.store, spec, plan, action.decision, self.clock())

    def _wait_for_slot(self, slot: str, version: str) -> None:
        """The next action (traffic) must not start before the slot serves the version it was given."""
        deadline = time.monotonic() + self.slot_ready_timeout_s
        while time.monotonic() < deadline:
            if self.effects.slot_version(slot) == version:
                return
            time.sleep(0.2)
        log.warning("slot %s did not load version %s within %.0fs", slot, version, self.slot_ready_timeout_s)

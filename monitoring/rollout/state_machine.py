"""The rollout controller's core: a pure state machine, ``step(plan, state, event) -> (state, actions)``.

Nothing here does I/O or reads a clock: time arrives inside the events, and effects leave as a list of actions
that the thin driver executes in order. States, plans, events and actions are frozen dataclasses that round-trip
through JSON (``to_dict`` / ``from_dict``), so a restarted controller restores the state from its database and
carries on where the previous one stopped.

Lifecycle (``S`` = the plan's phases, ``W`` = the watch index ``len(plan.phases)``)::

    pending --Start--> phase 0 (status = its kind: "replay", "shadow" or "canary")
    phase i --all-pass analysis, gates met--> phase i+1 ... --last phase passes--> promoted_watching (index W)
    promoted_watching --watch window elapsed--> succeeded
    shadow/canary --failure_limit consecutive failures | ManualAbort--> rolled_back | aborted (champion untouched)
    promoted_watching --failure_limit consecutive failures | ManualAbort--> rolled_back | aborted (back to previous)

Rules, deliberately simple:

* **Advance** only on an analysis for the current phase whose verdicts are *all* ``"pass"`` (at least one
  verdict; an empty verdict map counts as inconclusive), taken at least ``min_duration_s`` after the phase began,
  with ``samples >= min_samples``. The next phase begins at that analysis's time. Ticks never advance a phase.
* **Fail**: any ``"fail"`` verdict (or a ``SlotDown`` of the challenger's slot) increments
  ``consecutive_failures``; an all-pass analysis resets it; an inconclusive one (no fail, not all pass) changes
  nothing. Reaching ``failure_limit`` rolls back at once. Failures count whether or not the gates are met: the
  guardrails themselves answer "inconclusive" while they lack samples.
* **Replay** (a phase of kind ``replay``, the first): no live traffic (``SetTraffic(0, shadow=False)``); the driver
  replays logged requests through the challenger's slot and sends one ``Analysis``, judged once: any ``"fail"``
  rolls back at once (no ``failure_limit``: a second look would replay the same requests); all ``"pass"`` with
  ``samples >= min_samples`` passes the phase (gate included); otherwise (too few labelled requests, an undecided
  guardrail) the phase's ``on_inconclusive`` decides: ``advance`` (with the reason recorded) or ``rollback``.
* **Roll back before promotion**: ``SetTraffic(0, shadow=False, champion_slot=<champion>)`` first, then
  ``MarkRejected(challenger)``, ``SetAlias("challenger", None)``, ``RecordDecision``, ``Notify``.
* **Promote**: ``SetAlias("previous", champion)``, ``SetAlias("champion", challenger)``,
  ``SetAlias("challenger", None)``, ``SetTraffic(0, shadow=False, champion_slot=<challenger's slot>)``,
  ``RecordDecision``, ``Notify``. The old champion stays loaded in its slot, so a later rollback is a traffic
  change, not a redeploy. The watch phase uses ``phase_index == len(plan.phases)`` and ``phase_started_at`` = the
  promotion time; analyses during the watch (absolute limits, computed by the driver) carry that index.
* **Roll back after promotion**: ``SetTraffic(0, shadow=False, champion_slot=<old champion's slot>)`` first, then
  ``SetAlias("champion", old champion)``, ``SetAlias("previous", plan.previous_version)`` (restores the alias as it
  was before this rollout; ``None`` deletes it), ``MarkRejected(challenger)``, ``RecordDecision``, ``Notify``.
* **Watch window** is half-open, ``[promoted_at, promoted_at + post_promotion_watch_s)``: analyses and slot outages
  stamped inside it count; the first ``Tick``/``Analysis``/``SlotDown`` stamped at or after its end concludes the
  rollout as ``succeeded`` (that late event's verdicts are not counted).
* **SlotDown** of the challenger's slot counts as one failure (also during the watch, where that slot serves as
  champion). SlotDown of the champion's slot is recorded (a transition with a decision and a notification) but
  never blamed on the challenger. Other slots are ignored. The driver reports an outage once, on its edge.
* **Manual**: ``ManualPromote`` in shadow/canary promotes (recorded as manual); elsewhere it is ignored.
  ``ManualAbort`` in any non-terminal status rolls back with status ``aborted``.
* **Ignored events** (no new state, no actions): anything in a terminal status (succeeded, rolled_back, aborted);
  ``Start`` when not pending; analyses before ``Start``; stale analyses (``phase_index`` not the current one, or
  stamped before the current phase began). Terminal states ignoring everything is what makes replaying an event
  log after a restart safe: it never promotes or rolls back twice.
* **Transitions**: every change of state bumps ``version`` by exactly one (optimistic concurrency for the store),
  appends one :class:`Decision` with the metric values behind it, and emits ``RecordDecision`` of that decision.
  ``decided`` turns true on promote, roll back and abort, and never turns false.

``SetTraffic.challenger_weight`` is the weight of the slot that is *not* ``champion_slot``; with ``shadow=True``
the gateway mirrors every request to that slot without serving its answers. ``AssignSlot`` (emitted on ``Start``)
asks the driver to make a slot hold a version; the driver waits for the slot to report ready before executing the
next action, and reports a slot that does not come up as ``SlotDown``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

from core.aliases import CHALLENGER, CHAMPION, PREVIOUS
from monitoring.rollout.verdicts import VERDICTS, Verdict, combine_verdicts

PhaseKind = Literal["replay", "shadow", "canary"]
Status = Literal["pending", "replay", "shadow", "canary", "promoted_watching", "succeeded", "rolled_back", "aborted"]

SLOT_NAMES: tuple[str, ...] = ("a", "b")
STATUSES: tuple[str, ...] = (
    "pending",
    "replay",
    "shadow",
    "canary",
    "promoted_watching",
    "succeeded",
    "rolled_back",
    "aborted",
)
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "rolled_back", "aborted"})
PHASE_STATUSES: frozenset[str] = frozenset({"replay", "shadow", "canary"})
GateOutcome = Literal["hold", "rollback"]
GATE_OUTCOMES: tuple[str, ...] = ("hold", "rollback")
ReplayOutcome = Literal["advance", "rollback"]
REPLAY_OUTCOMES: tuple[str, ...] = ("advance", "rollback")


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _finite_nonneg(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


# --------------------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseSpec:
    """One phase: ``replay`` (weight 0, no live traffic: logged requests replayed through the challenger's slot,
    judged once), ``shadow`` (weight 0, mirrored traffic) or ``canary`` (a share of live traffic in (0, 1])."""

    name: str
    kind: PhaseKind
    weight: float
    min_duration_s: float
    min_samples: int
    max_duration_s: float | None = None  # progress deadline: still undecided after this long rolls back
    # Manual gate: after its guardrails pass, the phase holds until Approve (a person, or a gating hook).
    require_approval: bool = False
    approval_timeout_s: float | None = None  # None: wait for the approval forever
    on_approval_timeout: GateOutcome = "rollback"
    # A replay phase: what an inconclusive replay (too few labelled requests, or a guardrail undecided) does.
    on_inconclusive: ReplayOutcome = "advance"

    def __post_init__(self) -> None:
        if self.kind not in ("replay", "shadow", "canary"):
            raise ValueError(f"phase {self.name!r}: kind must be 'replay', 'shadow' or 'canary', got {self.kind!r}")
        if self.kind in ("replay", "shadow") and self.weight != 0:
            raise ValueError(f"phase {self.name!r}: a {self.kind} phase has weight 0, got {self.weight!r}")
        if self.on_inconclusive not in REPLAY_OUTCOMES:
            raise ValueError(f"phase {self.name!r}: on_inconclusive must be advance or rollback")
        if self.kind == "canary" and not (
            isinstance(self.weight, int | float) and math.isfinite(self.weight) and 0 < self.weight <= 1
        ):
            raise ValueError(f"phase {self.name!r}: a canary weight must be in (0, 1], got {self.weight!r}")
        _finite_nonneg(f"phase {self.name!r}: min_duration_s", self.min_duration_s)
        if not isinstance(self.min_samples, int) or self.min_samples < 0:
            raise ValueError(f"phase {self.name!r}: min_samples must be an int >= 0, got {self.min_samples!r}")
        if self.max_duration_s is not None and not (
            isinstance(self.max_duration_s, int | float) and self.max_duration_s >= self.min_duration_s
        ):
            raise ValueError(
                f"phase {self.name!r}: max_duration_s must be >= min_duration_s, got {self.max_duration_s!r}"
            )
        if self.approval_timeout_s is not None:
            _finite_nonneg(f"phase {self.name!r}: approval_timeout_s", self.approval_timeout_s)
        if self.on_approval_timeout not in GATE_OUTCOMES:
            raise ValueError(f"phase {self.name!r}: on_approval_timeout must be hold or rollback")

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PhaseSpec:
        return cls(
            name=str(data["name"]),
            kind=data["kind"],
            weight=float(data["weight"]),
            min_duration_s=float(data["min_duration_s"]),
            min_samples=int(data["min_samples"]),
            max_duration_s=None if data.get("max_duration_s") is None else float(data["max_duration_s"]),
            require_approval=bool(data.get("require_approval", False)),
            approval_timeout_s=None if data.get("approval_timeout_s") is None else float(data["approval_timeout_s"]),
            on_approval_timeout=data.get("on_approval_timeout", "rollback"),
            on_inconclusive=data.get("on_inconclusive", "advance"),
        )


@dataclass(frozen=True)
class RolloutPlan:
    """What to roll out and how; immutable for the life of a rollout."""

    rollout_id: str
    model_name: str
    challenger_version: str
    champion_version: str
    champion_slot: str
    challenger_slot: str
    phases: tuple[PhaseSpec, ...]
    failure_limit: int
    post_promotion_watch_s: float
    previous_version: str | None = None
    # A pre-rollout gate (a gating hook): the rollout stays pending until the driver sends Start; when it has not
    # by ``pre_rollout_timeout_s`` after creation, ``on_pre_rollout_timeout`` says whether to keep waiting or
    # roll back (the champion never lost any traffic). None: no gate, no timeout.
    pre_rollout_timeout_s: float | None = None
    on_pre_rollout_timeout: GateOutcome = "rollback"
    # While a person has paused the rollout (to look at something), a failing guardrail still counts towards
    # ``failure_limit`` and rolls back ("rollback", the default), or is recorded but not acted on until the
    # rollout resumes ("hold": the person decides; resuming acts on the next failing analysis).
    on_failure_while_paused: GateOutcome = "rollback"

    def __post_init__(self) -> None:
        object.__setattr__(self, "phases", tuple(self.phases))
        if not self.phases:
            raise ValueError("a rollout plan needs at least one phase")
        if self.champion_slot not in SLOT_NAMES or self.challenger_slot not in SLOT_NAMES:
            raise ValueError(f"slots must be among {SLOT_NAMES}, got {self.champion_slot!r}/{self.challenger_slot!r}")
        if self.champion_slot == self.challenger_slot:
            raise ValueError("champion and challenger need different slots")
        if self.challenger_version == self.champion_version:
            raise ValueError("challenger and champion are the same version")
        if not isinstance(self.failure_limit, int) or self.failure_limit < 1:
            raise ValueError(f"failure_limit must be an int >= 1, got {self.failure_limit!r}")
        _finite_nonneg("post_promotion_watch_s", self.post_promotion_watch_s)
        if self.pre_rollout_timeout_s is not None:
            _finite_nonneg("pre_rollout_timeout_s", self.pre_rollout_timeout_s)
        if self.on_pre_rollout_timeout not in GATE_OUTCOMES:
            raise ValueError("on_pre_rollout_timeout must be hold or rollback")
        if self.on_failure_while_paused not in GATE_OUTCOMES:
            raise ValueError("on_failure_while_paused must be hold or rollback")

    @property
    def watch_index(self) -> int:
        """The ``phase_index`` of the post-promotion watch (one past the last phase)."""
        return len(self.phases)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutPlan:
        previous = data.get("previous_version")
        return cls(
            rollout_id=str(data["rollout_id"]),
            model_name=str(data["model_name"]),
            challenger_version=str(data["challenger_version"]),
            champion_version=str(data["champion_version"]),
            champion_slot=str(data["champion_slot"]),
            challenger_slot=str(data["challenger_slot"]),
            phases=tuple(PhaseSpec.from_dict(p) for p in data["phases"]),
            failure_limit=int(data["failure_limit"]),
            post_promotion_watch_s=float(data["post_promotion_watch_s"]),
            previous_version=None if previous is None else str(previous),
            pre_rollout_timeout_s=(
                None if data.get("pre_rollout_timeout_s") is None else float(data["pre_rollout_timeout_s"])
            ),
            on_pre_rollout_timeout=data.get("on_pre_rollout_timeout", "rollback"),
            on_failure_while_paused=data.get("on_failure_while_paused", "rollback"),
        )


# --------------------------------------------------------------------------------------------------------------
# Analysis, decisions, state
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalysisResult:
    """One evaluation of every guardrail for the phase ``phase_index``, taken at ``at``.

    ``samples`` is the number of challenger samples the phase has gathered; ``values`` holds, per guardrail, the
    metric values behind its verdict (recorded with any decision the result causes).
    """

    at: float
    phase_index: int
    samples: int
    verdicts: dict[str, Verdict]
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What was judged: the window of the prediction log (and for a replay, how many requests were asked for,
    # found and replayed). Recorded with the analysis; the state machine does not read it.
    window: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.verdicts.items() if v not in VERDICTS}
        if bad:
            raise ValueError(f"unknown verdicts {bad}; expected one of {sorted(VERDICTS)}")

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisResult:
        return cls(
            at=float(data["at"]),
            phase_index=int(data["phase_index"]),
            samples=int(data["samples"]),
            verdicts=dict(data["verdicts"]),
            values=copy.deepcopy(dict(data.get("values") or {})),
            window=None if data.get("window") is None else copy.deepcopy(dict(data["window"])),
        )


@dataclass(frozen=True)
class Decision:
    """One transition, with the metric values that caused it.

    ``phase_index`` is where the rollout was when the transition was taken: an index into the plan's phases, or
    ``len(plan.phases)`` (the watch index ``W``) for a decision taken during the post-promotion watch (its
    rollback, or its success). The decision that promotes is taken in the last phase, so it carries that
    phase's index; the one that enters a phase carries the index of the phase it leaves (0 for the start)."""

    at: float
    from_status: Status
    to_status: Status
    phase_index: int
    action_summary: str
    reason: str
    metrics: dict[str, Any]
    # What happened, for notifications and hooks: one of DECISION_EVENTS.
    event: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        return cls(
            at=float(data["at"]),
            from_status=data["from_status"],
            to_status=data["to_status"],
            phase_index=int(data["phase_index"]),
            action_summary=str(data["action_summary"]),
            reason=str(data["reason"]),
            metrics=copy.deepcopy(dict(data["metrics"])),
            event=str(data.get("event", "")),
        )


@dataclass(frozen=True)
class RolloutState:
    """Everything the controller must persist to resume a rollout after a restart."""

    rollout_id: str
    status: Status
    phase_index: int
    phase_started_at: float
    consecutive_failures: int
    decided: bool
    reason: str | None
    version: int
    history: tuple[Decision, ...]
    paused: bool = False  # Pause: analyses go on and failures count, but the rollout does not advance
    awaiting_approval_since: float | None = None  # the phase passed; its gate holds it until Approve
    gate_timed_out: bool = False  # the gate's timeout passed with outcome "hold" (recorded once)
    resumed_at: float | None = None  # the phase's deadline counts from here after a Resume

    @property
    def awaiting_approval(self) -> bool:
        return self.awaiting_approval_since is not None

    def __post_init__(self) -> None:
        object.__setattr__(self, "history", tuple(self.history))
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutState:
        reason = data.get("reason")
        return cls(
            rollout_id=str(data["rollout_id"]),
            status=data["status"],
            phase_index=int(data["phase_index"]),
            phase_started_at=float(data["phase_started_at"]),
            consecutive_failures=int(data["consecutive_failures"]),
            decided=bool(data["decided"]),
            reason=None if reason is None else str(reason),
            version=int(data["version"]),
            history=tuple(Decision.from_dict(d) for d in data.get("history", ())),
            paused=bool(data.get("paused", False)),
            awaiting_approval_since=(
                None if data.get("awaiting_approval_since") is None else float(data["awaiting_approval_since"])
            ),
            gate_timed_out=bool(data.get("gate_timed_out", False)),
            resumed_at=None if data.get("resumed_at") is None else float(data["resumed_at"]),
        )


# --------------------------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    at: float


@dataclass(frozen=True)
class Analysis:
    result: AnalysisResult

    @property
    def at(self) -> float:
        return self.result.at


@dataclass(frozen=True)
class Tick:
    """Time passes, no new data (ends the post-promotion watch)."""

    at: float


@dataclass(frozen=True)
class _Command:
    """An operator's command (a person, the CLI, or a gating hook): when, and why."""

    at: float
    reason: str = ""


@dataclass(frozen=True)
class ManualPromote(_Command):
    """Promote now, in a shadow or canary phase, whatever the guardrails say (recorded as manual)."""


@dataclass(frozen=True)
class ManualAbort(_Command):
    """Roll back now, from any status that is not terminal (recorded as aborted)."""


@dataclass(frozen=True)
class SlotDown:
    """A slot stopped being ready (or never became ready)."""

    at: float
    slot: str
    detail: str = ""


@dataclass(frozen=True)
class Pause(_Command):
    """Hold the rollout where it is: analyses go on and a failing guardrail still rolls back."""


@dataclass(frozen=True)
class Resume(_Command):
    """Let a paused rollout advance again; the phase's deadline counts again from here."""


@dataclass(frozen=True)
class Approve(_Command):
    """Open the gate of a phase that passed and waits for approval (a person, or a gating hook's 2xx)."""


Event: TypeAlias = Start | Analysis | Tick | ManualPromote | ManualAbort | SlotDown | Pause | Resume | Approve
_EVENT_TYPES: dict[str, type] = {
    t.__name__: t for t in (Start, Analysis, Tick, ManualPromote, ManualAbort, SlotDown, Pause, Resume, Approve)
}
DECISION_EVENTS: tuple[str, ...] = (
    "rollout-started",
    "phase-advanced",
    "failure-counted",
    "streak-reset",
    "slot-down",
    "awaiting-approval",
    "approval-timeout",
    "paused",
    "resumed",
    "promoted",
    "rolled-back",
    "aborted",
    "succeeded",
)


def _tagged(value: Event | Action) -> dict[str, Any]:
    return {"type": type(value).__name__, **_jsonable(value)}


def _untagged(data: dict[str, Any], types: dict[str, type], what: str) -> tuple[type, dict[str, Any]]:
    """The class a tagged dict names (one of ``types``) and its fields."""
    kind = types.get(data.get("type", ""))
    if kind is None:
        raise ValueError(f"unknown {what} type {data.get('type')!r}")
    return kind, {k: v for k, v in data.items() if k != "type"}


def event_to_dict(event: Event) -> dict[str, Any]:
    """``{"type": "Analysis", ...fields}``: for an event log the driver may keep beside the state."""
    return _tagged(event)


def event_from_dict(data: dict[str, Any]) -> Event:
    kind, body = _untagged(data, _EVENT_TYPES, "event")
    if kind is Analysis:
        return Analysis(AnalysisResult.from_dict(body["result"]))
    return kind(**body)


# --------------------------------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetTraffic:
    """Write the traffic policy: ``challenger_weight`` goes to the slot that is not ``champion_slot``."""

    challenger_weight: float
    shadow: bool
    champion_slot: str
    reason: str


@dataclass(frozen=True)
class SetAlias:
    """Point a registry alias at a version; ``version=None`` deletes the alias."""

    alias: str
    version: str | None


@dataclass(frozen=True)
class AssignSlot:
    """Make ``slot`` hold ``version`` (the driver waits until it reports ready)."""

    slot: str
    version: str | None


@dataclass(frozen=True)
class RecordDecision:
    decision: Decision


@dataclass(frozen=True)
class MarkRejected:
    version: str
    reason: str


@dataclass(frozen=True)
class Notify:
    message: str


Action: TypeAlias = SetTraffic | SetAlias | AssignSlot | RecordDecision | MarkRejected | Notify
_ACTION_TYPES: dict[str, type] = {
    t.__name__: t for t in (SetTraffic, SetAlias, AssignSlot, RecordDecision, MarkRejected, Notify)
}


def action_to_dict(action: Action) -> dict[str, Any]:
    return _tagged(action)


def action_from_dict(data: dict[str, Any]) -> Action:
    kind, body = _untagged(data, _ACTION_TYPES, "action")
    if kind is RecordDecision:
        return RecordDecision(Decision.from_dict(body["decision"]))
    return kind(**body)


def _summarize(action: Action) -> str:
    match action:
        case SetTraffic():
            mode = "shadow" if action.shadow else f"{action.challenger_weight:g}"
            return f"traffic(champion={action.champion_slot}, challenger={mode})"
        case SetAlias():
            return f"alias {action.alias}={action.version if action.version is not None else '<deleted>'}"
        case AssignSlot():
            return f"slot {action.slot}={action.version}"
        case MarkRejected():
            return f"reject {action.version}"
        case Notify():
            return "notify"
        case RecordDecision():
            return "record"
    raise TypeError(f"not an action: {action!r}")  # pragma: no cover


# --------------------------------------------------------------------------------------------------------------
# The state machine
# --------------------------------------------------------------------------------------------------------------


def initial_state(plan: RolloutPlan, at: float) -> RolloutState:
    """A rollout that exists but has not started (no traffic changed, no decision)."""
    return RolloutState(
        rollout_id=plan.rollout_id,
        status="pending",
        phase_index=0,
        phase_started_at=float(at),
        consecutive_failures=0,
        decided=False,
        reason=None,
        version=0,
        history=(),
    )


def current_phase(plan: RolloutPlan, state: RolloutState) -> PhaseSpec | None:
    """The phase being run, or None (pending, watching, terminal)."""
    if state.status in PHASE_STATUSES and 0 <= state.phase_index < len(plan.phases):
        return plan.phases[state.phase_index]
    return None


def watch_ends_at(plan: RolloutPlan, state: RolloutState) -> float | None:
    """When the post-promotion watch ends (None unless watching)."""
    if state.status != "promoted_watching":
        return None
    return state.phase_started_at + plan.post_promotion_watch_s


def step(plan: RolloutPlan, state: RolloutState, event: Event) -> tuple[RolloutState, list[Action]]:
    """Apply one event. Returns the new state and the actions to execute in order (``state`` itself, unchanged,
    and ``[]`` when the event is ignored)."""
    if state.rollout_id != plan.rollout_id:
        raise ValueError(f"state is for rollout {state.rollout_id!r}, plan for {plan.rollout_id!r}")
    if state.terminal:
        return state, []
    match event:
        case Start():
            return _on_start(plan, state, event)
        case Analysis():
            return _on_analysis(plan, state, event.result)
        case Tick():
            return _on_tick(plan, state, event)
        case ManualPromote():
            return _on_manual_promote(plan, state, event)
        case ManualAbort():
            return _on_manual_abort(plan, state, event)
        case SlotDown():
            return _on_slot_down(plan, state, event)
        case Pause():
            return _on_pause(plan, state, event)
        case Resume():
            return _on_resume(plan, state, event)
        case Approve():
            return _on_approve(plan, state, event)
    raise TypeError(f"not a rollout event: {event!r}")


def replay(plan: RolloutPlan, state: RolloutState, events: list[Event]) -> tuple[RolloutState, list[Action]]:
    """Fold ``step`` over ``events``; returns the final state and every action, in order."""
    actions: list[Action] = []
    for event in events:
        state, new = step(plan, state, event)
        actions.extend(new)
    return state, actions


_Result: TypeAlias = tuple[RolloutState, list[Action]]


def _ignore(state: RolloutState) -> _Result:
    return state, []


# Entering a phase (or promoting) closes whatever gate or pause the previous phase had.
_GATE_CLEARED: dict[str, Any] = {
    "paused": False,
    "awaiting_approval_since": None,
    "gate_timed_out": False,
    "resumed_at": None,
}


def _transition(
    state: RolloutState,
    *,
    at: float,
    to_status: Status,
    reason: str,
    metrics: dict[str, Any],
    effects: list[Action],
    event: str,
    notify: str | None = None,
    **changes: Any,
) -> _Result:
    decision = Decision(
        at=float(at),
        from_status=state.status,
        to_status=to_status,
        phase_index=state.phase_index,
        action_summary="; ".join(_summarize(a) for a in effects) or "none",
        reason=reason,
        metrics=copy.deepcopy(metrics),
        event=event,
    )
    new_state = replace(
        state,
        status=to_status,
        reason=reason,
        version=state.version + 1,
        history=(*state.history, decision),
        **changes,
    )
    actions: list[Action] = [*effects, RecordDecision(decision)]
    if notify is not None:
        actions.append(Notify(notify))
    return new_state, actions


def _stay(
    state: RolloutState,
    *,
    at: float,
    reason: str,
    metrics: dict[str, Any],
    event: str,
    notify: str | None = None,
    **changes: Any,
) -> _Result:
    """A recorded transition that keeps the status and moves no traffic or alias (a counted failure, a reset
    streak, a gate, a pause): only the state's bookkeeping in ``changes`` changes."""
    return _transition(
        state,
        at=at,
        to_status=state.status,
        reason=reason,
        metrics=metrics,
        effects=[],
        event=event,
        notify=notify,
        **changes,
    )


def _given(reason: str) -> str:
    """An operator's reason as a decision records it."""
    return reason or "no reason given"


def _phase_traffic(plan: RolloutPlan, index: int, reason: str) -> SetTraffic:
    phase = plan.phases[index]
    shadow = phase.kind == "shadow"
    return SetTraffic(
        challenger_weight=float(phase.weight) if phase.kind == "canary" else 0.0,
        shadow=shadow,
        champion_slot=plan.champion_slot,
        reason=reason,
    )


def _label(plan: RolloutPlan) -> str:
    return f"rollout {plan.rollout_id} ({plan.model_name} v{plan.challenger_version} vs v{plan.champion_version})"


def _enter_phase(plan: RolloutPlan, state: RolloutState, index: int, at: float, reason: str, metrics: dict) -> _Result:
    phase = plan.phases[index]
    effects: list[Action] = []
    if state.status == "pending":
        effects += [
            AssignSlot(plan.challenger_slot, plan.challenger_version),
            SetAlias(CHALLENGER, plan.challenger_version),
        ]
    effects.append(_phase_traffic(plan, index, f"{plan.rollout_id}: phase {phase.name}"))
    what = phase.kind if phase.kind in ("replay", "shadow") else f"canary at {phase.weight:.0%}"
    return _transition(
        state,
        at=at,
        to_status=phase.kind,
        reason=reason,
        metrics={**metrics, "next_phase": phase.name, "next_weight": phase.weight},
        effects=effects,
        event="rollout-started" if state.status == "pending" else "phase-advanced",
        notify=f"{_label(plan)}: entered phase {index} {phase.name!r} ({what})",
        phase_index=index,
        phase_started_at=float(at),
        consecutive_failures=0,
        **_GATE_CLEARED,
    )


def _promote(plan: RolloutPlan, state: RolloutState, at: float, reason: str, metrics: dict) -> _Result:
    if state.decided or state.status not in PHASE_STATUSES:  # defence in depth: never promote twice
        return _ignore(state)
    effects: list[Action] = [
        SetAlias(PREVIOUS, plan.champion_version),
        SetAlias(CHAMPION, plan.challenger_version),
        SetAlias(CHALLENGER, None),
        SetTraffic(0.0, False, plan.challenger_slot, f"{plan.rollout_id}: promoted v{plan.challenger_version}"),
    ]
    return _transition(
        state,
        at=at,
        to_status="promoted_watching",
        reason=reason,
        metrics=metrics,
        effects=effects,
        notify=f"{_label(plan)}: PROMOTED v{plan.challenger_version} ({reason}); watching for "
        f"{plan.post_promotion_watch_s:g}s",
        event="promoted",
        phase_index=plan.watch_index,
        phase_started_at=float(at),
        consecutive_failures=0,
        decided=True,
        **_GATE_CLEARED,
    )


def _roll_back(
    plan: RolloutPlan, state: RolloutState, at: float, to_status: Status, reason: str, metrics: dict, **changes: Any
) -> _Result:
    if state.status == "promoted_watching":
        effects: list[Action] = [
            SetTraffic(0.0, False, plan.champion_slot, f"{plan.rollout_id}: back to v{plan.champion_version}"),
            SetAlias(CHAMPION, plan.champion_version),
            SetAlias(PREVIOUS, plan.previous_version),
            MarkRejected(plan.challenger_version, reason),
        ]
        what = f"ROLLED BACK to previous champion v{plan.champion_version} after promotion"
    else:
        effects = [
            SetTraffic(0.0, False, plan.champion_slot, f"{plan.rollout_id}: rolled back"),
            MarkRejected(plan.challenger_version, reason),
            SetAlias(CHALLENGER, None),
        ]
        what = f"ROLLED BACK v{plan.challenger_version}; champion v{plan.champion_version} keeps all traffic"
    if to_status == "aborted":
        what = "ABORTED, " + what
    return _transition(
        state,
        at=at,
        to_status=to_status,
        reason=reason,
        metrics=metrics,
        effects=effects,
        event="aborted" if to_status == "aborted" else "rolled-back",
        notify=f"{_label(plan)}: {what} ({reason})",
        decided=True,
        **{**_GATE_CLEARED, **changes},
    )


def _count_failure(plan: RolloutPlan, state: RolloutState, at: float, reason: str, metrics: dict) -> _Result:
    count = state.consecutive_failures + 1
    metrics = {**metrics, "consecutive_failures": count, "failure_limit": plan.failure_limit}
    reason = f"{reason} ({count}/{plan.failure_limit} consecutive)"
    if count >= plan.failure_limit:
        return _roll_back(plan, state, at, "rolled_back", reason, metrics, consecutive_failures=count)
    return _stay(
        state,
        at=at,
        reason=reason,
        metrics=metrics,
        event="failure-counted",
        consecutive_failures=count,
    )


def _succeed(plan: RolloutPlan, state: RolloutState, at: float) -> _Result:
    elapsed = at - state.phase_started_at
    return _transition(
        state,
        at=at,
        to_status="succeeded",
        reason=f"post-promotion watch of {plan.post_promotion_watch_s:g}s passed without regression",
        metrics={"watch_elapsed_s": elapsed, "post_promotion_watch_s": plan.post_promotion_watch_s},
        effects=[],
        event="succeeded",
        notify=f"{_label(plan)}: succeeded; v{plan.challenger_version} is champion",
    )


def _watch_over(plan: RolloutPlan, state: RolloutState, at: float) -> bool:
    return state.status == "promoted_watching" and at >= state.phase_started_at + plan.post_promotion_watch_s


def _on_start(plan: RolloutPlan, state: RolloutState, event: Start) -> _Result:
    if state.status != "pending":
        return _ignore(state)
    return _enter_phase(plan, state, 0, event.at, "rollout started", {"phases": len(plan.phases)})


def _named(guardrail: str, values: Any) -> str:
    """A failed guardrail as a decision names it: a slice guardrail with its slice, e.g.
    `slice-recall (merchant_category=electronics)`."""
    where = values.get("slice") if isinstance(values, dict) else None
    return f"{guardrail} ({where})" if where else guardrail


def _on_analysis(plan: RolloutPlan, state: RolloutState, result: AnalysisResult) -> _Result:
    if state.status == "pending":
        return _ignore(state)
    if result.phase_index != state.phase_index or result.at < state.phase_started_at:
        return _ignore(state)  # stale: for another phase, or from before this one began
    if _watch_over(plan, state, result.at):
        return _succeed(plan, state, result.at)
    if _approval_timed_out(plan, state, result.at):
        return _approval_timeout(plan, state, result.at)
    watching = state.status == "promoted_watching"
    elapsed = result.at - state.phase_started_at
    metrics: dict[str, Any] = {
        "samples": result.samples,
        "elapsed_s": elapsed,
        "verdicts": dict(result.verdicts),
        "values": result.values,
    }
    if state.status == "replay":
        return _on_replay(plan, state, result, metrics)
    combined = combine_verdicts(result.verdicts.values())
    if combined == "fail" and state.paused and plan.on_failure_while_paused == "hold":
        return _ignore(state)  # recorded by the caller as an analysis; the person who paused decides
    if combined == "fail":
        failed = sorted(_named(k, result.values.get(k)) for k, v in result.verdicts.items() if v == "fail")
        where = "after promotion" if watching else f"in phase {plan.phases[state.phase_index].name}"
        return _count_failure(plan, state, result.at, f"guardrails failed {where}: {', '.join(failed)}", metrics)
    if combined == "inconclusive":
        pending = sorted(k for k, v in result.verdicts.items() if v != "pass") or ["no guardrail evaluated"]
        if _past_deadline(plan, state, result.at):
            return _deadline_roll_back(plan, state, result.at, f"inconclusive: {', '.join(pending)}", metrics)
        return _ignore(state)  # inconclusive: neither advances nor fails
    if not watching and not state.paused and not state.awaiting_approval:
        phase = plan.phases[state.phase_index]
        if elapsed >= phase.min_duration_s and result.samples >= phase.min_samples:
            metrics |= {
                "min_duration_s": phase.min_duration_s,
                "min_samples": phase.min_samples,
                "consecutive_failures": state.consecutive_failures,
            }
            reason = f"phase {phase.name} passed: all guardrails pass ({result.samples} samples, {elapsed:g}s)"
            return _phase_passed(plan, state, result.at, reason, metrics)
        if _past_deadline(plan, state, result.at):
            gates = f"{result.samples}/{phase.min_samples} samples"
            return _deadline_roll_back(plan, state, result.at, f"all pass but only {gates}", metrics)
    if state.consecutive_failures:
        return _stay(
            state,
            at=result.at,
            reason=f"all guardrails pass; failure streak of {state.consecutive_failures} reset",
            metrics={**metrics, "consecutive_failures": 0},
            event="streak-reset",
            consecutive_failures=0,
        )
    return _ignore(state)


def _phase_passed(plan: RolloutPlan, state: RolloutState, at: float, reason: str, metrics: dict) -> _Result:
    """The current phase's evidence is in: advance, or hold at its gate until approved."""
    phase = plan.phases[state.phase_index]
    if not phase.require_approval:
        return _advance(plan, state, at, reason, metrics)
    timeout = phase.approval_timeout_s
    return _stay(
        state,
        at=at,
        reason=f"{reason}; awaiting approval"
        + (f" (timeout {timeout:g}s, then {phase.on_approval_timeout})" if timeout is not None else ""),
        metrics={**metrics, "approval_timeout_s": timeout, "consecutive_failures": 0},
        event="awaiting-approval",
        notify=f"{_label(plan)}: phase {phase.name!r} passed and awaits approval",
        awaiting_approval_since=float(at),
        consecutive_failures=0,
    )


def _on_replay(plan: RolloutPlan, state: RolloutState, result: AnalysisResult, metrics: dict) -> _Result:
    """A replay phase is judged once, on a fixed sample of logged requests (a second look would replay the same
    requests, so counting failures towards ``failure_limit`` would only wait): a failing guardrail rolls back at
    once; all passing with ``min_samples`` replayed passes the phase; anything else (too few labelled requests,
    as on a model's first rollout, or an undecided guardrail) does what ``on_inconclusive`` says. Paused, or
    holding at its gate, the phase does not advance, but a failure still rolls back."""
    phase = plan.phases[state.phase_index]
    metrics = {**metrics, "window": result.window, "min_samples": phase.min_samples}
    combined = combine_verdicts(result.verdicts.values())
    replayed = f"{result.samples} replayed request{'s' if result.samples != 1 else ''}"
    if combined == "fail":
        failed = sorted(k for k, v in result.verdicts.items() if v == "fail")
        reason = f"guardrails failed in replay phase {phase.name} on {replayed}: {', '.join(failed)}"
        return _roll_back(plan, state, result.at, "rolled_back", reason, metrics)
    if state.paused or state.awaiting_approval:
        return _ignore(state)
    if combined == "pass" and result.samples >= phase.min_samples:
        return _phase_passed(
            plan, state, result.at, f"phase {phase.name} passed: all guardrails pass on {replayed}", metrics
        )
    if result.samples < phase.min_samples:
        why = f"only {replayed}, {phase.min_samples} needed"
    else:
        why = "undecided: " + ", ".join(sorted(k for k, v in result.verdicts.items() if v != "pass"))
    metrics |= {"replay": "inconclusive", "on_inconclusive": phase.on_inconclusive}
    if phase.on_inconclusive == "rollback":
        return _roll_back(
            plan,
            state,
            result.at,
            "rolled_back",
            f"replay phase {phase.name} inconclusive ({why}); on_inconclusive: rollback",
            metrics,
        )
    following = plan.phases[state.phase_index + 1].name if state.phase_index + 1 < len(plan.phases) else "promotion"
    reason = f"replay phase {phase.name} inconclusive ({why}); on_inconclusive: advance to {following}"
    return _advance(plan, state, result.at, reason, metrics)


def _on_tick(plan: RolloutPlan, state: RolloutState, event: Tick) -> _Result:
    if state.status == "pending":
        timeout = plan.pre_rollout_timeout_s
        if (
            timeout is not None
            and plan.on_pre_rollout_timeout == "rollback"
            and event.at - state.phase_started_at >= timeout
        ):
            reason = f"pre-rollout gate not passed within {timeout:g}s"
            return _roll_back(plan, state, event.at, "rolled_back", reason, {"pre_rollout_timeout_s": timeout})
        return _ignore(state)
    if _watch_over(plan, state, event.at):
        return _succeed(plan, state, event.at)
    if _approval_timed_out(plan, state, event.at):
        return _approval_timeout(plan, state, event.at)
    if _past_deadline(plan, state, event.at):
        return _deadline_roll_back(plan, state, event.at, "no analysis", {})
    return _ignore(state)


def _past_deadline(plan: RolloutPlan, state: RolloutState, at: float) -> bool:
    """A phase's progress deadline; it does not run while the rollout is paused or waits for approval (the
    person holding it decides), and counts again from the Resume."""
    if state.status not in PHASE_STATUSES or state.paused or state.awaiting_approval:
        return False
    deadline = plan.phases[state.phase_index].max_duration_s
    began = max(state.phase_started_at, state.resumed_at if state.resumed_at is not None else -math.inf)
    return deadline is not None and at - began >= deadline


def _advance(plan: RolloutPlan, state: RolloutState, at: float, reason: str, metrics: dict) -> _Result:
    nxt = state.phase_index + 1
    if nxt < len(plan.phases):
        return _enter_phase(plan, state, nxt, at, reason, metrics)
    return _promote(plan, state, at, reason, metrics)


def _approval_timed_out(plan: RolloutPlan, state: RolloutState, at: float) -> bool:
    if state.status not in PHASE_STATUSES or state.awaiting_approval_since is None or state.gate_timed_out:
        return False
    timeout = plan.phases[state.phase_index].approval_timeout_s
    return timeout is not None and at - state.awaiting_approval_since >= timeout


def _approval_timeout(plan: RolloutPlan, state: RolloutState, at: float) -> _Result:
    phase = plan.phases[state.phase_index]
    waited = at - (state.awaiting_approval_since or at)
    reason = f"phase {phase.name} not approved within {phase.approval_timeout_s:g}s (waited {waited:.0f}s)"
    metrics = {"approval_timeout_s": phase.approval_timeout_s, "waited_s": waited, "outcome": phase.on_approval_timeout}
    if phase.on_approval_timeout == "rollback":
        return _roll_back(plan, state, at, "rolled_back", reason, metrics)
    return _stay(
        state,
        at=at,
        reason=f"{reason}; holding until approved or aborted",
        metrics=metrics,
        event="approval-timeout",
        notify=f"{_label(plan)}: {reason}; holding",
        gate_timed_out=True,
    )


def _on_pause(plan: RolloutPlan, state: RolloutState, event: Pause) -> _Result:
    if state.status not in PHASE_STATUSES or state.paused:
        return _ignore(state)
    return _paused_or_resumed(plan, state, event, "paused", paused=True)


def _on_resume(plan: RolloutPlan, state: RolloutState, event: Resume) -> _Result:
    if state.status not in PHASE_STATUSES or not state.paused:
        return _ignore(state)
    return _paused_or_resumed(plan, state, event, "resumed", paused=False, resumed_at=float(event.at))


def _paused_or_resumed(
    plan: RolloutPlan, state: RolloutState, event: Pause | Resume, what: str, **changes: Any
) -> _Result:
    reason = f"{what}: {_given(event.reason)}"
    return _stay(
        state,
        at=event.at,
        reason=reason,
        metrics={"manual": True, "phase": plan.phases[state.phase_index].name},
        event=what,
        notify=f"{_label(plan)}: {reason}",
        **changes,
    )


def _on_approve(plan: RolloutPlan, state: RolloutState, event: Approve) -> _Result:
    if state.status not in PHASE_STATUSES or not state.awaiting_approval or state.paused:
        return _ignore(state)
    phase = plan.phases[state.phase_index]
    waited = event.at - (state.awaiting_approval_since or event.at)
    reason = f"phase {phase.name} approved: {_given(event.reason)}"
    metrics = {"approved": True, "waited_s": waited, "phase": phase.name}
    return _advance(plan, state, event.at, reason, metrics)


def waiting_for(plan: RolloutPlan, state: RolloutState) -> str:
    """What the rollout is doing, in words (for a refused command: "not waiting for approval: ...")."""
    if state.terminal:
        return f"it has finished ({state.status})"
    if state.status == "pending":
        return "it has not started (pending its pre-rollout gate)"
    if state.status == "promoted_watching":
        return "it is promoted and being watched"
    phase = plan.phases[state.phase_index]
    what = f"it is in phase {phase.name!r} ({state.status})"
    if state.paused:
        return what + ", paused"
    if state.awaiting_approval:
        return what + ", awaiting approval"
    return what + ", gathering evidence"


def _deadline_roll_back(plan: RolloutPlan, state: RolloutState, at: float, why: str, metrics: dict) -> _Result:
    """No evidence that the challenger is good enough within the phase's deadline: it does not get more traffic."""
    phase = plan.phases[state.phase_index]
    elapsed = at - state.phase_started_at
    reason = f"phase {phase.name} undecided after {elapsed:.0f}s (deadline {phase.max_duration_s:g}s): {why}"
    metrics = {**metrics, "max_duration_s": phase.max_duration_s, "elapsed_s": at - state.phase_started_at}
    return _roll_back(plan, state, at, "rolled_back", reason, metrics)


def _on_manual_promote(plan: RolloutPlan, state: RolloutState, event: ManualPromote) -> _Result:
    if state.status not in PHASE_STATUSES:
        return _ignore(state)
    metrics = {
        "manual": True,
        "phase": plan.phases[state.phase_index].name,
        "elapsed_s": event.at - state.phase_started_at,
        "consecutive_failures": state.consecutive_failures,
    }
    return _promote(plan, state, event.at, f"manual promote: {_given(event.reason)}", metrics)


def _on_manual_abort(plan: RolloutPlan, state: RolloutState, event: ManualAbort) -> _Result:
    metrics = {"manual": True, "consecutive_failures": state.consecutive_failures}
    return _roll_back(plan, state, event.at, "aborted", f"manual abort: {_given(event.reason)}", metrics)


def _on_slot_down(plan: RolloutPlan, state: RolloutState, event: SlotDown) -> _Result:
    if state.status == "pending" or event.slot not in (plan.champion_slot, plan.challenger_slot):
        return _ignore(state)
    if _watch_over(plan, state, event.at):
        return _succeed(plan, state, event.at)
    watching = state.status == "promoted_watching"
    metrics = {"slot": event.slot, "detail": event.detail}
    if event.slot == plan.challenger_slot:
        role = "promoted slot" if watching else "challenger slot"
        return _count_failure(plan, state, event.at, f"{role} {event.slot} not ready: {event.detail}", metrics)
    if watching:
        reason = f"previous champion's slot {event.slot} not ready (rollback target unavailable): {event.detail}"
    else:
        reason = f"champion slot {event.slot} not ready (not counted against the challenger): {event.detail}"
    return _stay(
        state,
        at=event.at,
        reason=reason,
        metrics={**metrics, "consecutive_failures": state.consecutive_failures},
        event="slot-down",
        notify=f"{_label(plan)}: {reason}",
    )


def _when(at: float) -> str:
    """A time for a person: an epoch timestamp as a UTC time (formatting only, no clock read), a small (test)
    clock as ``t=...``."""
    if at >= 1e9:
        return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"t={at:g}"


def describe(state: RolloutState, plan: RolloutPlan | None = None) -> str:
    """One line for the CLI."""
    where = state.status
    if state.status in PHASE_STATUSES:
        where += f" phase {state.phase_index}"
        if plan is not None and state.phase_index < len(plan.phases):
            phase = plan.phases[state.phase_index]
            where += f"/{len(plan.phases)} {phase.name!r}"
            where += f" ({phase.kind})" if phase.kind != "canary" else f" ({phase.weight:.0%} to challenger)"
        where += f" since {_when(state.phase_started_at)}"
        if state.paused:
            where += " PAUSED"
        if state.awaiting_approval_since is not None:
            where += f" AWAITING APPROVAL since {_when(state.awaiting_approval_since)}"
    elif state.status == "promoted_watching":
        where += f" since {_when(state.phase_started_at)}"
        if plan is not None:
            where += f" until {_when(state.phase_started_at + plan.post_promotion_watch_s)}"
    limit = f"/{plan.failure_limit}" if plan is not None else ""
    line = (
        f"{state.rollout_id}: {where}, failures {state.consecutive_failures}{limit}, "
        f"decided={'yes' if state.decided else 'no'}, v{state.version}"
    )
    if state.reason:
        line += f"; last: {state.reason}"
    return " ".join(line.split())

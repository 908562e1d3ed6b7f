"""Rollout timeline: the controller's state, sampled every second over HTTP while a rollout runs, and every
analysis the controller recorded (`GET /v1/rollouts/{id}/analyses`), for the demo report (traffic weight and
guardrail values over time). The analyses come from the store, so none is missed between two samples (the one
that ends a phase included) and a controller restart leaves no gap in them."""

from __future__ import annotations

import threading
import time
from typing import Any

from control_plane.rollouts_client import ControllerError, ControllerUnavailable, RolloutsClient


def weight_of(view: dict[str, Any]) -> float:
    """The challenger's live traffic share in a rollout view (`GET /v1/rollouts/{id}`)."""
    state, phases = view["state"], view["plan"]["phases"]
    status, index = state["status"], state["phase_index"]
    if status == "canary" and index < len(phases):
        return float(phases[index].get("weight") or 0.0)
    return 1.0 if status in ("promoted_watching", "succeeded") else 0.0


def sample(view: dict[str, Any], analysis: dict[str, Any] | None, at: float) -> dict[str, Any]:
    """One point of the timeline (pure): time, status, phase, weight, and each guardrail's value and verdict."""
    state, phases = view["state"], view["plan"]["phases"]
    index = state["phase_index"]
    guardrails = {}
    if analysis is not None and analysis.get("phase_index") == index:
        for name, values in analysis.get("values", {}).items():
            guardrails[name] = {k: values.get(k) for k in ("value", "baseline", "verdict", "limit", "samples")}
    return {
        "t": at,
        "rollout_id": view["rollout_id"],
        "status": state["status"],
        "phase": phases[index]["name"] if index < len(phases) else "watch",
        "weight": weight_of(view),
        "guardrails": guardrails,
    }


def analysis_point(view: dict[str, Any], analysis: dict[str, Any]) -> dict[str, Any]:
    """One point of the timeline for a recorded analysis, in the phase it judged (pure)."""
    phases, index = view["plan"]["phases"], analysis["phase_index"]
    if index < len(phases):
        phase = phases[index]
        weight = float(phase.get("weight") or 0.0) if phase["kind"] == "canary" else 0.0
        name = phase["name"]
        status = phase["kind"]
    else:
        weight, name, status = 1.0, "watch", "promoted_watching"
    keys = ("value", "baseline", "verdict", "limit", "samples")
    guardrails = {g: {k: v.get(k) for k in keys} for g, v in (analysis.get("values") or {}).items()}
    return {
        "t": analysis["at"],
        "rollout_id": view["rollout_id"],
        "status": status,
        "phase": name,
        "weight": weight,
        "guardrails": guardrails,
        "analysis": analysis.get("seq"),
        "verdict": analysis.get("verdict"),
    }


def with_decisions(points: list[dict[str, Any]], decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The timeline with one more point per decision that an analysis made (pure).

    Sampling once a second misses the analysis that ends a phase (the next sample already belongs to the new
    phase), so a phase would appear to advance on inconclusive dots. Each decision recorded the guardrail
    values behind it: that analysis becomes a point at the decision's time, in the phase it decided."""
    if not points:
        return points
    extra = []
    for decision in decisions:
        values = (decision.get("metrics") or {}).get("values")
        if not values:
            continue
        before = [p for p in points if p["t"] <= decision["at"]] or points[:1]
        keys = ("value", "baseline", "verdict", "limit", "samples")
        guardrails = {name: {k: v.get(k) for k in keys} for name, v in values.items()}
        extra.append({**before[-1], "t": decision["at"], "guardrails": guardrails, "decision": True})
    return sorted(points + extra, key=lambda p: p["t"])


class TimelineRecorder:
    """Samples whichever rollout is active (and the one just finished) once a second, in a thread."""

    def __init__(self, controller_url: str, interval_s: float = 1.0) -> None:
        self.url, self.interval_s = controller_url, interval_s
        self.points: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="timeline", daemon=True)
        self._last_id: str | None = None
        self._seen: dict[str, int] = {}  # rollout id -> the last analysis seq taken

    def start(self) -> TimelineRecorder:
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(10)
        return self.points

    def for_rollout(self, rollout_id: str) -> list[dict[str, Any]]:
        return [p for p in self.points if p["rollout_id"] == rollout_id]

    def _run(self) -> None:
        with RolloutsClient(self.url, timeout=5.0) as controller:
            while not self._stop.wait(self.interval_s):
                try:
                    self._sample(controller)
                except (ControllerError, ControllerUnavailable, KeyError):
                    continue  # the controller restarting: the timeline simply has a gap

    def _sample(self, controller: RolloutsClient) -> None:
        active = controller.active()
        if active is not None:
            view = active
        elif self._last_id is not None:  # the rollout just ended: one last point with its final status
            view = controller.rollout(self._last_id)
            self._last_id = None
        else:
            return
        rollout_id = view["rollout_id"]
        analyses = controller.analyses(rollout_id, after=self._seen.get(rollout_id, -1))
        if analyses:
            self._seen[rollout_id] = analyses[-1]["seq"]
        self.points.extend(analysis_point(view, analysis) for analysis in analyses)
        self.points.append(sample(view, None, time.time()))  # the state (status, weight) at this moment
        self.points.sort(key=lambda p: p["t"])
        if active is not None:
            self._last_id = rollout_id

"""Hooks declared in the rollout spec: signed notifications, delivered off the controller's loop, and gating calls.

Notifications go through an outbox in the store (`rollout_deliveries`): the driver queues one row per decision
and subscribed hook (idempotent by key) while it executes the decision's ``RecordDecision`` action, so a
controller that dies before the delivery loses nothing: the next one finds the row pending. A `HookSender`
thread posts due rows with the hook's timeout, recording every attempt, and retries failures with exponential
backoff (``backoff_s * 2**(attempt - 1)``) up to ``retries`` times. The loop never waits on a hook.

Gating hooks (`pre-rollout`, `confirm-promotion`) are called by a `GateCaller`, also in threads of its own: the
loop asks "has it said go?" and gets the latest answer at once; a call is (re)made at most every
``max(backoff_s, 1)`` seconds while the gate is closed. Each call is a delivery with one attempt, status ``go``
(2xx) or ``wait``.

Every body is signed: ``X-Mlops-Signature: sha256=<hex HMAC-SHA256 of the body with MLOPS_HOOK_SECRET>``;
``X-Mlops-Event`` names the event, ``X-Mlops-Delivery`` the delivery id. `verify_signature` is the receiver's
check. With no secret configured, bodies go unsigned (no signature header).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from monitoring.rollout.spec import Hook, RolloutSpec
from monitoring.rollout.state_machine import Decision, RolloutPlan

log = logging.getLogger("mlops.controller.hooks")
SIGNATURE_HEADER = "X-Mlops-Signature"
EVENT_HEADER = "X-Mlops-Event"
DELIVERY_HEADER = "X-Mlops-Delivery"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """A receiver's check of ``X-Mlops-Signature`` (constant-time)."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


def notification_body(plan: RolloutPlan, decision: Decision, hook: Hook) -> dict[str, Any]:
    """JSON by default: the rollout, the versions, the phase, the decision and the guardrail values behind it;
    with ``format: slack`` a Slack-compatible message (``text`` plus the same facts as fields)."""
    phase = plan.phases[decision.phase_index].name if decision.phase_index < len(plan.phases) else "watch"
    body: dict[str, Any] = {
        "event": decision.event,
        "rollout_id": plan.rollout_id,
        "model_name": plan.model_name,
        "challenger_version": plan.challenger_version,
        "champion_version": plan.champion_version,
        "phase": phase,
        "from_status": decision.from_status,
        "to_status": decision.to_status,
        "at": decision.at,
        "reason": decision.reason,
        "decision": decision.to_dict(),
        "guardrails": decision.metrics.get("values", {}),
    }
    if hook.format == "slack":
        text = (
            f"*{decision.event}* {plan.model_name} v{plan.challenger_version} vs v{plan.champion_version} "
            f"({plan.rollout_id}, phase {phase}): {decision.reason}"
        )
        fields = [
            {"title": "rollout", "value": plan.rollout_id, "short": True},
            {"title": "status", "value": f"{decision.from_status} -> {decision.to_status}", "short": True},
        ]
        return {"text": text, "attachments": [{"fallback": text, "fields": fields}]}
    return body


def gate_body(plan: RolloutPlan, gate: str, phase: str | None) -> dict[str, Any]:
    return {
        "event": gate,
        "rollout_id": plan.rollout_id,
        "model_name": plan.model_name,
        "challenger_version": plan.challenger_version,
        "champion_version": plan.champion_version,
        "phase": phase,
    }


def _encode(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, default=str)


def _post(
    client: httpx.Client, hook: Hook, event: str, body: str, delivery_id: int, secret: str
) -> tuple[int | None, str | None, float]:
    headers = {"Content-Type": "application/json", EVENT_HEADER: event, DELIVERY_HEADER: str(delivery_id)}
    raw = body.encode()
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, raw)
    began = time.monotonic()
    try:
        response = client.post(hook.url, content=raw, headers=headers, timeout=hook.timeout_s)
    except httpx.HTTPError as error:
        return None, f"{type(error).__name__}: {error}"[:500], time.monotonic() - began
    error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}: {response.text[:200]}"
    return response.status_code, error, time.monotonic() - began


def queue_notifications(store: Any, spec: RolloutSpec, plan: RolloutPlan, decision: Decision, now: float) -> int:
    """Queue the decision for every hook subscribed to its event; returns how many were new."""
    queued = 0
    for hook in spec.hooks_for(decision.event):
        key = f"{plan.rollout_id}|{decision.event}|{decision.at!r}|{hook.name}"
        body = _encode(notification_body(plan, decision, hook))
        if store.enqueue_delivery(key, plan.rollout_id, hook.name, decision.event, hook.url, body, now) is not None:
            queued += 1
    return queued


class HookSender:
    """Delivers queued notifications in a daemon thread; the spec names each hook's timeout and retries: ``spec``,
    or per rollout ``spec_for(rollout_id)`` (a rollout started with a spec of its own)."""

    def __init__(
        self,
        store: Any,
        spec: RolloutSpec,
        secret: str,
        poll_s: float = 0.2,
        clock: Callable[[], float] = time.time,
        spec_for: Callable[[str], RolloutSpec] | None = None,
    ) -> None:
        self.store, self.spec, self.secret, self.poll_s, self.clock = store, spec, secret, poll_s, clock
        self.spec_for = spec_for or (lambda _rollout_id: spec)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hook-sender", daemon=True)
        self._client = httpx.Client()

    def start(self) -> HookSender:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.send_due()
            except Exception:  # the store briefly locked or gone: try again on the next pass
                log.exception("hook delivery pass failed")

    def send_due(self) -> int:
        """One pass over the due deliveries; returns how many attempts it made."""
        made = 0
        for row in self.store.due_deliveries(self.clock()):
            if self._stop.is_set():
                break
            hook = next((h for h in self.spec_for(row["rollout_id"]).hooks if h.name == row["hook"]), None)
            if hook is None:  # the spec changed since it was queued: keep the record, stop trying
                self.store.record_attempt(row["id"], self.clock(), None, "hook no longer in the spec", 0.0, "failed")
                continue
            code, error, took = _post(self._client, hook, row["event"], row["body"], row["id"], self.secret)
            attempt = row["attempts"] + 1
            if error is None:
                status, retry_at = "delivered", None
            elif attempt > hook.retries:
                status, retry_at = "failed", None
                log.warning("hook %s gave up on %s after %d attempts: %s", hook.name, row["event"], attempt, error)
            else:
                status, retry_at = "pending", self.clock() + hook.backoff_s * 2 ** (attempt - 1)
            self.store.record_attempt(row["id"], self.clock(), code, error, took, status, retry_at)
            made += 1
        return made


class GateCaller:
    """Asks gating hooks, each call in a thread of its own, and remembers their latest answer per gate."""

    def __init__(self, store: Any, secret: str, clock: Callable[[], float] = time.time) -> None:
        self.store, self.secret, self.clock = store, secret, clock
        self._lock = threading.Lock()
        self._passed: set[tuple[str, str, str]] = set()
        self._in_flight: set[tuple[str, str, str]] = set()
        self._last_call: dict[tuple[str, str, str], float] = {}
        self._calls = 0

    def passed(self, plan: RolloutPlan, gate: str, hooks: list[Hook], phase: str | None = None) -> bool:
        """True once every hook of the gate has answered 2xx (for this rollout and phase); otherwise starts the
        calls that are due and answers False at once."""
        all_go = True
        for hook in hooks:
            key = (plan.rollout_id, f"{gate}:{phase}", hook.name)
            with self._lock:
                if key in self._passed:
                    continue
                all_go = False
                due = self.clock() - self._last_call.get(key, -1e18) >= max(hook.backoff_s, 1.0)
                if key in self._in_flight or not due:
                    continue
                self._in_flight.add(key)
                self._last_call[key] = self.clock()
                self._calls += 1
                call = self._calls
            threading.Thread(
                target=self._call, args=(key, plan, gate, hook, phase, call), name=f"gate-{hook.name}", daemon=True
            ).start()
        return all_go

    def _call(
        self, key: tuple[str, str, str], plan: RolloutPlan, gate: str, hook: Hook, phase: str | None, call: int
    ) -> None:
        try:
            body = _encode(gate_body(plan, gate, phase))
            now = self.clock()
            delivery = self.store.enqueue_delivery(
                f"{plan.rollout_id}|{gate}|{phase}|{hook.name}|{now!r}|{call}",
                plan.rollout_id,
                hook.name,
                gate,
                hook.url,
                body,
                now,
                status="calling",
            )
            with httpx.Client() as client:
                code, error, took = _post(client, hook, gate, body, delivery or 0, self.secret)
            if delivery is not None:
                self.store.record_attempt(delivery, self.clock(), code, error, took, "go" if error is None else "wait")
            if error is None:
                with self._lock:
                    self._passed.add(key)
        except Exception:
            log.exception("gate %s of hook %s failed", gate, hook.name)
        finally:
            with self._lock:
                self._in_flight.discard(key)

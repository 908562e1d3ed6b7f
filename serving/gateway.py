"""The gateway: the only entry point for clients.

Per request: validate, pick the variant by a sticky hash of the account (`serving.routing`), call that
slot, fall back to the champion when the challenger errors or is late, answer, and log the row. In
shadow mode the request is also queued for the challenger; a bounded queue and a pool of shadow
workers do that work after the client has its answer, so shadow never delays or changes an answer,
and when the queue is full the shadow work (never the client request) is dropped and counted.

The traffic policy is pulled from the control plane (long-poll) and applied only when its generation
is newer than the one in force, so an old policy can never override a newer one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from control_plane.client import AsyncControlPlaneClient, ControlPlaneError, ControlPlaneUnavailable
from control_plane.http_errors import EXCEPTION_HANDLERS
from control_plane.labels_token import resolve_labels_token
from control_plane.models import TrafficPolicy
from control_plane.tokens import check_bearer, resolve_token
from core.prediction_log import (
    DECISION,
    DEGRADED_REASON,
    FEEDBACK_SCHEMA,
    FORCED,
    PREDICTION_SCHEMA,
    BatchedParquetLog,
    RecentIds,
    flush_loop,
)
from core.settings import Settings
from serving.fallback import fallback_decision
from serving.labels import LabelBook, LabelOutcome
from serving.requests import (
    BUDGET_HEADER,
    RequestError,
    Transaction,
    encode,
    features,
    parse_budget,
    parse_feedback,
    parse_transaction,
)
from serving.routing import Route as PolicyRoute
from serving.routing import other_slot, route

log = logging.getLogger("mlops.gateway")
disable_created_metrics()  # `_created` series only clutter dashboards
JSON = "application/json"


SLOT_KEEPALIVE_S = 2.0  # below the slots' server keep-alive (uvicorn: 5 s); see Gateway.start


class SlotFailure(Exception):
    """The slot did not give a usable answer in time."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out  # the deadline passed (vs. the slot answered a failure or was unreachable)


@dataclass
class Attempt:
    answer: SlotAnswer | None
    blamed: bool  # a failure that is the slot's own (not the request's budget running out first)


RULE_VARIANT = "rule"  # who answered a degraded request: the default rule, no model


@dataclass
class SlotAnswer:
    score: float
    model_version: str | None
    latency_ms: float


class _SlotReply(msgspec.Struct):
    score: float
    model_version: str | None = None


class _SlotBatchReply(msgspec.Struct):
    scores: list[float]
    model_version: str | None = None


@dataclass
class BatchAnswer:
    scores: list[float]
    model_version: str | None
    latency_ms: float


_decode_reply = msgspec.json.Decoder(_SlotReply).decode
_decode_batch_reply = msgspec.json.Decoder(_SlotBatchReply).decode


class GatewayMetrics:
    """Per-variant Prometheus metrics, on a registry of our own (not the process-global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gateway_requests_total", "Client requests answered", ["variant", "status"], registry=r)
        self.errors = Counter("gateway_variant_errors_total", "Failed slot calls", ["variant"], registry=r)
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Client-visible latency",
            ["variant"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        # reason: budget (no model answered within the request's budget), overload (shed: over the in-flight
        # bound), slot_error (the slots failed on their own); each answered by the default rule
        self.degraded = Counter(
            "gateway_degraded_total", "Requests answered by the default rule", ["reason"], registry=r
        )
        self.in_flight = Gauge("gateway_requests_in_flight", "Client requests waiting on a slot", registry=r)
        self.invalid = Counter("gateway_invalid_requests_total", "Requests refused (4xx)", ["status"], registry=r)
        self.shadow = Counter("gateway_shadow_requests_total", "Shadow calls", ["status"], registry=r)
        self.shadow_dropped = Counter("gateway_shadow_dropped_total", "Shadow work dropped (queue full)", registry=r)
        # outcome: accepted, duplicate (same label again), conflict (a different label for a labelled id: 409),
        # unknown_id (404), unauthenticated (401), forbidden (403)
        self.feedback = Counter("gateway_feedback_total", "Labels received", ["outcome"], registry=r)
        self.generation = Gauge("gateway_policy_generation", "Traffic policy generation in force", registry=r)
        self.weight = Gauge("gateway_variant_weight", "Traffic weight in force", ["variant"], registry=r)


class LogCollector(Collector):
    """The prediction and feedback logs' own counters, read at scrape time: rows written, and rows that could
    not be written (a full disk, a file-size limit), which the gateway drops and keeps serving."""

    def __init__(self, logs: dict[str, BatchedParquetLog]) -> None:
        self.logs = logs

    def collect(self) -> Iterator[CounterMetricFamily]:
        written = CounterMetricFamily("gateway_log_rows_written", "Log rows written to disk", labels=["log"])
        unwritten = CounterMetricFamily(
            "gateway_log_rows_unwritten", "Log rows dropped because their batch could not be written", labels=["log"]
        )
        errors = CounterMetricFamily("gateway_log_write_errors", "Failed log batch writes", labels=["log"])
        for name, batches in self.logs.items():
            written.add_metric([name], batches.rows_written)
            unwritten.add_metric([name], batches.rows_unwritten)
            errors.add_metric([name], batches.write_errors)
        yield from (written, unwritten, errors)


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slot_urls = settings.slot_urls
        self.policy = TrafficPolicy(
            generation=0,
            weights={"a": 1.0, "b": 0.0},
            shadow=False,
            champion_slot="a",
            reason="default before the first poll",
            updated_at=0.0,
        )
        self.policy_loaded = False
        self.metrics = GatewayMetrics()
        log_dir = settings.prediction_log_dir
        self.predictions = BatchedParquetLog(
            log_dir / "predictions", settings.log_flush_rows, settings.log_flush_seconds, schema=PREDICTION_SCHEMA
        )
        self.feedback = BatchedParquetLog(
            log_dir / "feedback", settings.log_flush_rows, settings.log_flush_seconds, schema=FEEDBACK_SCHEMA
        )
        self.metrics.registry.register(LogCollector({"predictions": self.predictions, "feedback": self.feedback}))
        self.known_ids = RecentIds()
        self.labels = LabelBook(self.known_ids.capacity)
        # Set once the ids and labels of the log's history are loaded (`load_history`). Scoring never waits for
        # it; /v1/feedback does, so that a label for a request served before a restart is judged on the history.
        self.history_loaded = asyncio.Event()
        self.labels_token = resolve_labels_token(settings)
        self.operator_token = resolve_token(settings)  # QA routing (X-Mlops-Variant) is an operator's act
        self.shadow_queue: asyncio.Queue[tuple[dict[str, Any], bytes]] = asyncio.Queue(settings.shadow_queue_size)
        self.session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Shadow work has idle priority: it runs only while no client request is in flight, so on a
        # saturated machine it is shed (dropped and counted) instead of slowing down clients.
        self.client_in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        # Idle connections are dropped well before the slots' server closes them (uvicorn's keep-alive is 5 s):
        # reusing one the server is closing at that moment fails the request ("Server disconnected"), which
        # hit slots whose traffic had just thinned out (the old champion during the watch, then a rollback).
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=SLOT_KEEPALIVE_S)
        self.session = aiohttp.ClientSession(connector=connector)
        self._tasks = [
            asyncio.create_task(self.watch_policy()),
            asyncio.create_task(self.load_history()),
            asyncio.create_task(flush_loop([self.predictions, self.feedback])),
            *[asyncio.create_task(self.shadow_worker()) for _ in range(self.settings.shadow_workers)],
        ]

    async def load_history(self) -> None:
        """Labels for requests served before a restart are still accepted: reload their ids, and the labels already
        given (labelled ids stay labelled). In the background, not before serving: after a few scenarios' traffic
        this read takes seconds (7 s of a 23 s gateway restart in `fault-gateway-kill`, the clients' deadline
        being 10 s), and scoring needs none of it. Ids served meanwhile stay the newest (`RecentIds.add_older`);
        /v1/feedback waits for `history_loaded`, so no label is judged, or offered, before the history is in."""
        try:
            older = RecentIds(self.known_ids.capacity)
            await asyncio.to_thread(older.load, self.predictions.directory)
            self.known_ids.add_older(older)
            await asyncio.to_thread(self.labels.load, self.feedback.directory)
        except Exception:  # an unreadable history must not stop labels for what this process serves
            log.exception("could not load the log's history: labels for requests served before the restart are refused")
        finally:
            self.history_loaded.set()

    async def stop(self) -> None:
        """Clean stop: finish logging what was served (pending shadow work is logged as cancelled)."""
        for task in self._tasks:
            task.cancel()
        try:
            # Collected, not raised, so the log is written below whatever a task died of; logged, so a crashed
            # flush loop or shadow worker is not swallowed.
            outcomes = await asyncio.gather(*self._tasks, return_exceptions=True)
            for task, outcome in zip(self._tasks, outcomes, strict=True):
                if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                    log.error("background task %s had died: %r", task.get_name(), outcome)
            while not self.shadow_queue.empty():
                row, _ = self.shadow_queue.get_nowait()
                self.predictions.append({**row, "shadow_status": "cancelled"})
        finally:
            try:
                self.predictions.flush()
            finally:
                self.feedback.flush()
            log.info(
                "stopped: %d prediction rows and %d labels written in all",
                self.predictions.rows_written,
                self.feedback.rows_written,
            )
            if self.session:
                await self.session.close()

    # --- policy -----------------------------------------------------------------------------------

    def apply_policy(self, policy: TrafficPolicy) -> bool:
        if policy.generation < self.policy.generation or (
            self.policy_loaded and policy.generation == self.policy.generation
        ):
            return False  # stale or already in force: generations only move forward
        self.policy, self.policy_loaded = policy, True
        self.metrics.generation.set(policy.generation)
        challenger = other_slot(policy.champion_slot)
        self.metrics.weight.labels("champion").set(policy.weights[policy.champion_slot])
        self.metrics.weight.labels("challenger").set(policy.weights[challenger])
        log.info("policy generation %s in force: %s", policy.generation, policy.reason)
        return True

    async def watch_policy(self) -> None:
        client = AsyncControlPlaneClient(self.settings.control_plane_url)
        backoff = 0.2
        try:
            while True:
                try:
                    after = self.policy.generation if self.policy_loaded else -1
                    self.apply_policy(await client.wait_policy(after=after, wait=10.0))
                    backoff = 0.2
                except (ControlPlaneUnavailable, ControlPlaneError) as error:
                    log.warning("control plane unreachable (%s); keeping generation %s", error, self.policy.generation)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            await client.close()

    # --- slots ------------------------------------------------------------------------------------

    async def _post(self, slot: str, path: str, payload: bytes, timeout_s: float) -> bytes:
        """POST to a slot; anything but a 200 in time is a `SlotFailure`.

        A connection the slot closed before answering (a pooled keep-alive connection it was closing as we
        reused it) is retried once on a new connection within the same deadline: scoring is idempotent, and
        the slot never saw the request."""
        assert self.session is not None
        deadline = time.monotonic() + timeout_s
        for attempt in (1, 2):
            try:
                async with self.session.post(
                    f"{self.slot_urls[slot]}{path}",
                    data=payload,
                    headers={"content-type": JSON},
                    timeout=aiohttp.ClientTimeout(total=max(deadline - time.monotonic(), 0.001)),
                ) as response:
                    reply = await response.read()
                    if response.status != 200:
                        raise SlotFailure(f"slot {slot} answered {response.status}: {reply[:200]!r}")
                    return reply
            except aiohttp.ServerDisconnectedError as error:
                if attempt == 2 or time.monotonic() >= deadline:
                    raise SlotFailure(f"slot {slot}: {type(error).__name__} {error}") from None
                log.debug("slot %s closed a pooled connection before answering; retrying once", slot)
            except TimeoutError as error:  # before ClientError: aiohttp's ServerTimeoutError is both
                raise SlotFailure(f"slot {slot}: no answer in {timeout_s * 1000:.0f} ms ({error!r})", True) from None
            except aiohttp.ClientError as error:
                raise SlotFailure(f"slot {slot}: {type(error).__name__} {error}") from None
        raise AssertionError("unreachable")

    async def call_slot(self, slot: str, body: bytes, timeout_s: float) -> SlotAnswer:
        started = time.perf_counter()
        try:
            reply = _decode_reply(await self._post(slot, "/v1/predict", body, timeout_s))
        except msgspec.MsgspecError as error:  # a 200 that is not a score is a failed slot, not a gateway crash
            raise SlotFailure(f"slot {slot} answered an unreadable score: {error}") from None
        return SlotAnswer(reply.score, reply.model_version, (time.perf_counter() - started) * 1000)

    async def call_slot_batch(self, slot: str, bodies: list[bytes], timeout_s: float) -> BatchAnswer:
        """Score many already-validated request bodies in one call (their JSON is spliced, not re-encoded)."""
        started = time.perf_counter()
        payload = b'{"instances":[' + b",".join(bodies) + b"]}"
        try:
            decoded = _decode_batch_reply(await self._post(slot, "/v1/predict/batch", payload, timeout_s))
        except msgspec.MsgspecError as error:
            raise SlotFailure(f"slot {slot} answered unreadable scores: {error}") from None
        return BatchAnswer(decoded.scores, decoded.model_version, (time.perf_counter() - started) * 1000)

    # --- requests ---------------------------------------------------------------------------------

    async def score(
        self, body: bytes, forced_variant: str | None = None, budget_ms: float | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Answer one scoring request within its budget (`MLOPS_SCORE_BUDGET_MS`, or less if the client asked).

        Tiers: the routed variant; for a challenger that failed on its own, the champion (`fallback`); and when no
        model answered, the default rule (`serving.fallback`), `status: degraded`. Over `gateway_max_in_flight`
        requests already waiting on slots, a request is answered by the rule at once (shed): the wait never grows
        without bound."""
        budget_ms = self.settings.score_budget_ms if budget_ms is None else budget_ms
        if self.client_in_flight >= self.settings.gateway_max_in_flight:
            return self._shed(body, forced_variant, budget_ms)
        self.client_in_flight += 1
        self.metrics.in_flight.set(self.client_in_flight)
        self.idle.clear()
        try:
            return await self._score(body, forced_variant, budget_ms)
        finally:
            self.client_in_flight -= 1
            self.metrics.in_flight.set(self.client_in_flight)
            if self.client_in_flight == 0:
                self.idle.set()

    async def _attempt(self, slot: str, body: bytes, timeout_ms: float, deadline: float) -> Attempt:
        """One slot call, bounded by the variant's own deadline and by what is left of the request's budget."""
        remaining_ms = (deadline - time.monotonic()) * 1000
        if remaining_ms <= 0:
            return Attempt(None, blamed=False)
        try:
            return Attempt(await self.call_slot(slot, body, min(timeout_ms, remaining_ms) / 1000), blamed=False)
        except SlotFailure as failure:
            log.debug("%s", failure)
            # Blame the variant unless the budget, not the variant's own deadline, cut it short: a client asking
            # for 1 ms must not be able to manufacture a challenger's timeouts (evidence for a rollback).
            return Attempt(None, blamed=not (failure.timed_out and remaining_ms < timeout_ms))

    async def _score(self, body: bytes, forced_variant: str | None, budget_ms: float) -> tuple[int, dict[str, Any]]:
        started = time.perf_counter()
        deadline = time.monotonic() + budget_ms / 1000
        transaction = parse_transaction(body)  # RequestError → 4xx, handled by the route
        policy = self.policy
        champion = policy.champion_slot
        if forced_variant is None:
            chosen = route(transaction.account_id, champion, policy.weights[other_slot(champion)], policy.shadow)
        else:  # QA asked for this variant: no hash, no shadow copy, and no fallback that would hide its answer
            chosen = PolicyRoute(
                forced_variant, champion if forced_variant == "champion" else other_slot(champion), None
            )
        status, variant, slot = "ok", chosen.variant, chosen.slot
        timeout = self.settings.challenger_timeout_ms if variant == "challenger" else self.settings.champion_timeout_ms
        attempt = await self._attempt(slot, body, timeout, deadline)
        answer, reason = attempt.answer, None
        if answer is None:
            if attempt.blamed:
                self.metrics.errors.labels(variant).inc()
            if variant == "challenger" and attempt.blamed and forced_variant is None:
                # The challenger failed on its own: the champion answers (evidence against the challenger).
                second = await self._attempt(champion, body, self.settings.champion_timeout_ms, deadline)
                if second.blamed:
                    self.metrics.errors.labels("champion").inc()
                if second.answer is not None:
                    answer, status, variant, slot = second.answer, "fallback", "champion", champion
            if answer is None:
                # `error`: a variant failed on its own and the row is evidence against it (a challenger's
                # failure stays the challenger's even when the champion then had no time left); `degraded`: the
                # budget ran out first, evidence against neither (see `core.prediction_log.without_degraded`).
                status = "error" if attempt.blamed else "degraded"
                reason = "slot_error" if attempt.blamed else "budget"
        latency_ms = (time.perf_counter() - started) * 1000
        request_id = transaction.transaction_id or uuid.uuid4().hex
        row = self._row(request_id, transaction, policy, variant, slot, answer, latency_ms, status)
        row[FORCED] = forced_variant is not None
        self.metrics.requests.labels(variant, status).inc()
        self.metrics.latency.labels(variant if answer is not None else "rule").observe(latency_ms / 1000)
        if answer is None and forced_variant is not None:
            self._log(row, body, None)
            message = f"the {forced_variant} (slot {slot}) could not answer this request within {budget_ms:g} ms"
            return 503, {"error": message, "request_id": request_id, "variant": variant}
        if answer is None:
            return self._degraded(row, body, transaction, reason or "budget", budget_ms)
        row[DECISION] = "decline" if answer.score >= self.settings.decision_threshold else "approve"
        self._log(row, body, chosen.shadow_slot)
        return 200, {
            "request_id": request_id,
            "score": answer.score,
            "decision": row[DECISION],
            "variant": variant,
            "status": status,  # "fallback": routed to the challenger, answered by the champion
            "model_version": answer.model_version,
            "policy_generation": policy.generation,
        }

    def _degraded(
        self, row: dict[str, Any], body: bytes, transaction: Transaction, reason: str, budget_ms: float
    ) -> tuple[int, dict[str, Any]]:
        """The last tier: the default rule's decision, at once, marked degraded and counted by reason."""
        decision = fallback_decision(transaction.merchant_category, transaction.amount_to_avg_ratio)
        row.update({DECISION: decision, DEGRADED_REASON: reason})
        self.metrics.degraded.labels(reason).inc()
        self._log(row, body, None)
        return 200, {
            "request_id": row["request_id"],
            "score": None,
            "decision": decision,
            "variant": RULE_VARIANT,
            "status": "degraded",
            "reason": reason,  # budget: no model answered in time; overload: shed; slot_error: the slots failed
            "budget_ms": budget_ms,
            "model_version": None,
            "policy_generation": row["policy_generation"],
        }

    def _shed(self, body: bytes, forced_variant: str | None, budget_ms: float) -> tuple[int, dict[str, Any]]:
        """Over the in-flight bound: no slot call, no wait. Evidence against neither variant."""
        transaction = parse_transaction(body)
        policy = self.policy
        champion = policy.champion_slot
        chosen = route(transaction.account_id, champion, policy.weights[other_slot(champion)], False)
        request_id = transaction.transaction_id or uuid.uuid4().hex
        row = self._row(request_id, transaction, policy, chosen.variant, chosen.slot, None, 0.0, "degraded")
        row[FORCED] = forced_variant is not None
        self.metrics.requests.labels(chosen.variant, "degraded").inc()
        if forced_variant is not None:
            self.metrics.degraded.labels("overload").inc()
            self._log(row, body, None)
            message = f"the gateway is over its {self.settings.gateway_max_in_flight} requests in flight; retry"
            return 503, {"error": message, "request_id": request_id, "variant": forced_variant}
        return self._degraded(row, body, transaction, "overload", budget_ms)

    def _row(
        self,
        request_id: str,
        transaction: Transaction,
        policy: TrafficPolicy,
        variant: str,
        slot: str,
        answer: SlotAnswer | None,
        latency_ms: float,
        status: str,
    ) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "ts": time.time(),
            "account_id": transaction.account_id,
            "variant": variant,
            "slot": slot,
            "model_version": answer.model_version if answer else None,
            "score": answer.score if answer else None,
            "latency_ms": latency_ms,
            "status": status,
            "policy_generation": policy.generation,
            **features(transaction),
        }

    def _log(self, row: dict[str, Any], body: bytes, shadow_slot: str | None) -> None:
        self.known_ids.add(row["request_id"])
        if shadow_slot is None:
            self.predictions.append(row)
            return
        row["shadow_slot"] = shadow_slot
        try:
            self.shadow_queue.put_nowait((row, body))
        except asyncio.QueueFull:
            self.metrics.shadow_dropped.inc()
            self.predictions.append({**row, "shadow_status": "dropped"})

    async def shadow_worker(self) -> None:
        """Score queued requests with the challenger after their clients were answered; log the pairs.

        Work is batched: one call to the challenger's batch endpoint scores everything queued so far,
        which makes shadow traffic a small fraction of the gateway's and the slot's CPU time.
        """
        while True:
            batch = [await self.shadow_queue.get()]
            try:
                while not self.idle.is_set():  # re-check after waking: a client may have just arrived
                    await self.idle.wait()
                    await asyncio.sleep(0)
                while len(batch) < self.settings.shadow_batch and not self.shadow_queue.empty():
                    batch.append(self.shadow_queue.get_nowait())
                await self._shadow_batch(batch)
            except asyncio.CancelledError:
                for row, _ in batch:
                    self.predictions.append({**row, "shadow_status": "cancelled"})
                raise

    async def _shadow_batch(self, batch: list[tuple[dict[str, Any], bytes]]) -> None:
        slot = batch[0][0]["shadow_slot"]
        try:
            answer = await self.call_slot_batch(
                slot, [body for _, body in batch], self.settings.challenger_timeout_ms / 1000
            )
            for (row, _), score in zip(batch, answer.scores, strict=True):
                row.update(
                    shadow_score=score,
                    shadow_model_version=answer.model_version,
                    shadow_latency_ms=answer.latency_ms,
                    shadow_status="ok",
                )
            status = "ok"
        except SlotFailure:
            status = "error"
            for row, _ in batch:
                row["shadow_status"] = status
        self.metrics.shadow.labels(status).inc(len(batch))
        for row, _ in batch:
            self.predictions.append(row)

    def record_feedback(self, body: bytes, authorization: str | None = None) -> tuple[int, dict[str, Any]]:
        """One label per served request id, from a holder of the labels token: 202 accepted, 200 the same label
        again, 409 a different label for a labelled id, 404 an id never served, 401/403 no or a wrong token."""
        rejected = check_bearer(authorization, self.labels_token)
        if rejected is not None:
            self.metrics.feedback.labels("unauthenticated" if rejected.status == 401 else "forbidden").inc()
            message = f"labels token required (MLOPS_LABELS_TOKEN): {rejected.message}"
            return rejected.status, {"error": message, "field": "authorization"}
        feedback = parse_feedback(body)
        if feedback.request_id not in self.known_ids:
            self.metrics.feedback.labels("unknown_id").inc()
            return 404, {"error": f"unknown request_id {feedback.request_id!r}", "field": "request_id"}
        outcome = self.labels.offer(feedback.request_id, feedback.label)
        self.metrics.feedback.labels(outcome.value).inc()
        if outcome is LabelOutcome.conflict:
            existing = self.labels.get(feedback.request_id)
            message = (
                f"request_id {feedback.request_id!r} is labelled {existing} already; a label is accepted once, "
                f"{feedback.label} refused"
            )
            return 409, {"error": message, "field": "label"}
        if outcome is LabelOutcome.duplicate:
            return 200, {"request_id": feedback.request_id, "accepted": True, "duplicate": True}
        self.feedback.append({"request_id": feedback.request_id, "label": feedback.label, "received_at": time.time()})
        return 202, {"request_id": feedback.request_id, "accepted": True}


VARIANT_HEADER = "x-mlops-variant"
FORCEABLE_VARIANTS = ("champion", "challenger")


def _refuse_forced_variant(value: str, authorization: str | None, token: str) -> Response | None:
    """A forced variant needs the operator's token and a known name; anything else is refused, never routed by
    hash instead (QA would be told about a variant that did not answer)."""
    rejected = check_bearer(authorization, token)
    if rejected is not None:
        message = (
            f"{VARIANT_HEADER} routes to a variant on purpose and needs the control-plane token: {rejected.message}"
        )
        body = encode({"error": message, "field": "authorization"})
        return Response(body, rejected.status, rejected.headers or None, media_type=JSON)
    if value.strip().lower() not in FORCEABLE_VARIANTS:
        message = f"{VARIANT_HEADER} must be one of {', '.join(FORCEABLE_VARIANTS)}, got {value!r}"
        return Response(encode({"error": message, "field": VARIANT_HEADER}), 422, media_type=JSON)
    return None


def _answered_by(body: dict[str, Any]) -> dict[str, str]:
    """Which variant and which model version answered, on every scored response."""
    headers = {"X-Mlops-Variant": str(body["variant"])} if body.get("variant") else {}
    if body.get("model_version") is not None:
        headers["X-Mlops-Model-Version"] = str(body["model_version"])
    return headers


def create_gateway_app(settings: Settings) -> Starlette:
    gateway = Gateway(settings)

    async def score(request: Request) -> Response:
        forced = request.headers.get(VARIANT_HEADER)
        if forced is not None:
            refused = _refuse_forced_variant(forced, request.headers.get("authorization"), gateway.operator_token)
            if refused is not None:
                gateway.metrics.invalid.labels(str(refused.status_code)).inc()
                return refused
        try:
            budget_ms = parse_budget(request.headers.get(BUDGET_HEADER), settings.score_budget_ms)
            status, body = await gateway.score(
                await request.body(), forced.strip().lower() if forced else None, budget_ms
            )
        except RequestError as error:
            gateway.metrics.invalid.labels(str(error.status)).inc()
            return Response(encode(error.body()), error.status, media_type=JSON)
        return Response(encode(body), status, _answered_by(body), media_type=JSON)

    async def feedback(request: Request) -> Response:
        await gateway.history_loaded.wait()  # seconds after a restart at most; see Gateway.load_history
        try:
            status, body = gateway.record_feedback(await request.body(), request.headers.get("authorization"))
        except RequestError as error:
            gateway.metrics.invalid.labels(str(error.status)).inc()
            return Response(encode(error.body()), error.status, media_type=JSON)
        challenge = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return Response(encode(body), status, challenge, media_type=JSON)

    async def policy(_: Request) -> Response:
        return Response(encode({**gateway.policy.to_json(), "loaded": gateway.policy_loaded}), media_type=JSON)

    async def readyz(_: Request) -> Response:
        body = {"policy_generation": gateway.policy.generation, "policy_loaded": gateway.policy_loaded}
        return Response(encode(body), 200 if gateway.policy_loaded else 503, media_type=JSON)

    async def healthz(_: Request) -> Response:
        return Response(b'{"status":"alive"}', media_type=JSON)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = Starlette(
        routes=[
            Route("/v1/score", score, methods=["POST"]),
            Route("/v1/feedback", feedback, methods=["POST"]),
            Route("/v1/policy", policy),
            Route("/v1/status", readyz),
            Route("/readyz", readyz),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,  # 404/405 as JSON naming the method and path
    )
    app.state.gateway = gateway
    return app

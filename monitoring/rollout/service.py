"""The controller process: its loop in a background thread, and a small HTTP API.

GET  /v1/rollouts                     recent rollouts
GET  /v1/rollouts/active              the active rollout of the model (404 if none)
GET  /v1/rollouts/{id}                plan, state, one-line description
GET  /v1/rollouts/{id}/decisions      every decision with the metric values behind it
GET  /v1/rollouts/{id}/analyses       every analysis (pass, fail, inconclusive) with its guardrail values;
                                      ?after=SEQ for the newer ones only, ?limit=N for the newest N
GET  /v1/rollouts/{id}/deliveries     every hook delivery and gate call, with each attempt
GET  /v1/analysis                     the latest rollout's latest analysis (from the store)
GET  /metrics                         Prometheus: rollout phase and weight, guardrail values, decisions
POST /v1/rollouts                     {"challenger_version": "7"}         (bearer token); optionally with
                                      "spec": a rollout spec of its own (a mapping, validated like a spec file:
                                      422 naming each bad field), stored with the rollout
POST /v1/rollouts/{id}/promote|abort|pause|resume|approve  {"reason": "..."}   (bearer token); pause, resume
                                      and approve answer 409 naming what the rollout is doing when they do not apply
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane.http_errors import EXCEPTION_HANDLERS
from control_plane.tokens import check_bearer
from monitoring.rollout.driver import Controller
from monitoring.rollout.hooks import HookSender
from monitoring.rollout.prometheus_guardrail import source_problems
from monitoring.rollout.spec import RolloutSpec, SpecError, load_spec
from monitoring.rollout.state_machine import (
    Approve,
    ManualAbort,
    ManualPromote,
    Pause,
    Resume,
    describe,
    waiting_for,
)

MANUAL_EVENTS: dict[str, type] = {
    "promote": ManualPromote,
    "abort": ManualAbort,
    "pause": Pause,
    "resume": Resume,
    "approve": Approve,
}
# What a refused command was waiting for (promote and abort are accepted whenever they can apply, as before).
REFUSED_UNLESS = {"pause": "running a phase, unpaused", "resume": "paused", "approve": "waiting for approval"}


def _authorised(request: Request, token: str) -> JSONResponse | None:
    rejected = check_bearer(request.headers.get("authorization"), token)
    if rejected is None:
        return None
    return JSONResponse({"error": rejected.message, "field": "authorization"}, rejected.status, rejected.headers)


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"malformed JSON: {error}") from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


def create_controller_app(controller: Controller, token: str, run_loop: bool = True) -> Starlette:
    lock = threading.Lock()  # API commands and the loop step the same rollout: one at a time here
    store = controller.store

    def _view(rollout_id: str) -> dict[str, Any]:
        plan, state, pending = store.get(rollout_id)
        return {
            "rollout_id": rollout_id,
            "description": describe(state, plan),
            "state": state.to_dict(),
            "plan": plan.to_dict(),
            "pending_actions": len(pending),
        }

    async def list_rollouts(_: Request) -> JSONResponse:
        return JSONResponse({"rollouts": await asyncio.to_thread(store.list_rollouts, 50)})

    async def active(_: Request) -> JSONResponse:
        rollout_id = await asyncio.to_thread(store.active, controller.model_name)
        if rollout_id is None:
            return JSONResponse({"error": "no active rollout", "field": None}, 404)
        return JSONResponse(await asyncio.to_thread(_view, rollout_id))

    async def show(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await asyncio.to_thread(_view, request.path_params["rollout_id"]))
        except KeyError:
            return JSONResponse({"error": "unknown rollout", "field": "rollout_id"}, 404)

    async def decisions(request: Request) -> JSONResponse:
        rollout_id = request.path_params["rollout_id"]
        return JSONResponse(
            {"rollout_id": rollout_id, "decisions": await asyncio.to_thread(store.decisions, rollout_id)}
        )

    async def analyses(request: Request) -> JSONResponse:
        rollout_id = request.path_params["rollout_id"]
        try:
            after = int(request.query_params.get("after", "-1"))
            limit = request.query_params.get("limit")
            newest = None if limit is None else int(limit)
        except ValueError:
            return JSONResponse({"error": "after and limit must be integers", "field": "after"}, 422)
        rows = await asyncio.to_thread(store.analyses, rollout_id, after, newest)
        return JSONResponse({"rollout_id": rollout_id, "analyses": rows})

    async def deliveries(request: Request) -> JSONResponse:
        rollout_id = request.path_params["rollout_id"]
        rows = await asyncio.to_thread(store.deliveries, rollout_id)
        return JSONResponse({"rollout_id": rollout_id, "deliveries": rows})

    async def start(request: Request) -> JSONResponse:
        if (denied := _authorised(request, token)) is not None:
            return denied
        try:
            body = await _json_body(request)
            version = str(body["challenger_version"])
        except (ValueError, KeyError) as error:
            return JSONResponse({"error": f"need challenger_version: {error}", "field": "challenger_version"}, 422)
        spec: RolloutSpec | None = None
        if body.get("spec") is not None:
            if not isinstance(body["spec"], dict):
                return JSONResponse({"error": "spec must be a rollout spec (a JSON object)", "field": "spec"}, 422)
            try:
                spec = load_spec(body["spec"])
                # A guardrail that could never judge here is a spec error, as for the controller's own spec.
                problems = source_problems(spec, "configured" if controller.prometheus is not None else "")
                if problems:
                    raise SpecError(problems, "spec")
            except SpecError as error:
                return JSONResponse({"error": str(error), "field": "spec", "problems": error.problems}, 422)

        def run() -> str:
            with lock:
                return controller.start(version, spec)

        try:
            rollout_id = await asyncio.to_thread(run)
        except Exception as error:  # no champion, an active rollout exists, control plane down: say which
            return JSONResponse({"error": str(error), "field": "challenger_version"}, 409)
        return JSONResponse(await asyncio.to_thread(_view, rollout_id), 201)

    def manual(kind: str):  # type: ignore[no-untyped-def]
        async def handler(request: Request) -> JSONResponse:
            if (denied := _authorised(request, token)) is not None:
                return denied
            try:
                reason = str((await _json_body(request)).get("reason", f"manual {kind}"))
            except ValueError as error:
                return JSONResponse({"error": str(error), "field": None}, 400)
            rollout_id = request.path_params["rollout_id"]
            event_type = MANUAL_EVENTS[kind]

            def run() -> str | None:
                with lock:
                    plan, before, _ = store.get(rollout_id)
                    after = controller.apply(rollout_id, event_type(at=controller.clock(), reason=reason))
                    if after.version == before.version and kind in REFUSED_UNLESS:
                        return f"cannot {kind}: the rollout is not {REFUSED_UNLESS[kind]}; {waiting_for(plan, after)}"
                    return None

            try:
                refused = await asyncio.to_thread(run)
            except KeyError:
                return JSONResponse({"error": "unknown rollout", "field": "rollout_id"}, 404)
            if refused is not None:
                return JSONResponse({"error": refused, "field": "rollout_id"}, 409)
            return JSONResponse(await asyncio.to_thread(_view, rollout_id))

        return handler

    async def analysis(_: Request) -> JSONResponse:
        result = await asyncio.to_thread(latest_analysis, controller)
        if result is None:
            return JSONResponse({"error": "no analysis yet", "field": None}, 404)
        return JSONResponse(result.to_dict())

    async def metrics(_: Request) -> Response:
        text = await asyncio.to_thread(rollout_metrics, controller)
        return Response(text, media_type="text/plain; version=0.0.4")

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "alive", "holder": controller.holder})

    stop = threading.Event()

    def loop() -> None:
        interval = controller.spec.analysis_interval_s
        while not stop.wait(interval):
            try:
                with lock:
                    controller.tick()
                interval = controller.tick_interval()  # the active rollout's own spec may look more often
            except Exception:
                import logging

                logging.getLogger("mlops.controller").exception("tick failed")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        thread = threading.Thread(target=loop, name="controller-loop", daemon=True) if run_loop else None
        sender = (
            HookSender(store, controller.spec, controller.hook_secret, spec_for=controller.spec_for)
            if run_loop
            else None
        )
        if thread and sender:
            thread.start()
            sender.start()
        try:
            yield
        finally:
            stop.set()
            if thread and sender:
                thread.join(timeout=30)
                sender.stop()

    return Starlette(
        routes=[
            Route("/v1/rollouts", list_rollouts),
            Route("/v1/rollouts", start, methods=["POST"]),
            Route("/v1/rollouts/active", active),
            Route("/v1/rollouts/{rollout_id}", show),
            Route("/v1/rollouts/{rollout_id}/decisions", decisions),
            Route("/v1/rollouts/{rollout_id}/analyses", analyses),
            Route("/v1/rollouts/{rollout_id}/deliveries", deliveries),
            *(Route(f"/v1/rollouts/{{rollout_id}}/{kind}", manual(kind), methods=["POST"]) for kind in MANUAL_EVENTS),
            Route("/v1/analysis", analysis),
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Route("/readyz", healthz),
        ],
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,  # 404/405 as JSON naming the method and path
    )


VERDICT_VALUE = {"pass": 1.0, "inconclusive": 0.0, "fail": -1.0}
OUTCOMES = {"succeeded": "promoted", "rolled_back": "rolled_back", "aborted": "aborted"}


def latest_analysis(controller: Controller) -> Any:
    """The latest rollout's latest recorded analysis (an AnalysisResult), from the store: a restarted
    controller shows what its predecessor measured."""
    rollouts = controller.store.list_rollouts(1, controller.model_name)
    return controller.store.latest_analysis(rollouts[0]["rollout_id"]) if rollouts else None


def rollout_metrics(controller: Controller) -> bytes:
    """Prometheus text for the dashboards and alert rules: the latest rollout's phase and weight, the latest
    analysis's guardrail values and verdicts, and decisions by outcome. Built from the store at scrape time,
    so a restarted controller exports the same figures."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    registry = CollectorRegistry()
    info = Gauge("mlops_rollout_info", "The latest rollout (value 1)", ["rollout_id", "status", "phase",
                 "challenger_version", "champion_version"], registry=registry)  # fmt: skip
    phase_index = Gauge("mlops_rollout_phase_index", "Phase index of the latest rollout", registry=registry)
    weight = Gauge("mlops_rollout_challenger_weight", "Live traffic share of the challenger", registry=registry)
    value = Gauge("mlops_guardrail_value", "Latest guardrail value", ["guardrail", "variant"], registry=registry)
    verdict = Gauge("mlops_guardrail_verdict", "1 pass, 0 inconclusive, -1 fail", ["guardrail"], registry=registry)
    decisions = Counter("mlops_rollout_decisions", "Finished rollouts by outcome", ["outcome"], registry=registry)
    rollouts = controller.store.list_rollouts(200, controller.model_name)
    for row in rollouts:
        if row["status"] in OUTCOMES:
            decisions.labels(OUTCOMES[row["status"]]).inc()
    if rollouts:
        plan, state, _ = controller.store.get(rollouts[0]["rollout_id"])
        phase = plan.phases[state.phase_index] if state.phase_index < len(plan.phases) else None
        info.labels(
            plan.rollout_id, state.status, phase.name if phase else "watch", plan.challenger_version,
            plan.champion_version,
        ).set(1)  # fmt: skip
        phase_index.set(state.phase_index)
        live = state.status == "canary" and phase is not None
        weight.set(phase.weight if live else (1.0 if state.status in ("promoted_watching", "succeeded") else 0.0))
    result = controller.store.latest_analysis(rollouts[0]["rollout_id"]) if rollouts else None
    if result is not None:
        for name, values in result.values.items():
            verdict.labels(name).set(VERDICT_VALUE.get(values.get("verdict"), 0.0))
            if values.get("value") is not None:
                value.labels(name, "challenger").set(values["value"])
            if values.get("baseline") is not None:
                value.labels(name, "champion").set(values["baseline"])
    return generate_latest(registry)

"""The controller process: its loop in a background thread, and a small HTTP API.

GET  /v1/rollouts                     recent rollouts
GET  /v1/rollouts/active              the active rollout of the model (404 if none)
GET  /v1/rollouts/{id}                plan, state, one-line description
GET  /v1/rollouts/{id}/decisions      every decision with the metric values behind it
POST /v1/rollouts                     {"challenger_version": "7"}         (bearer token)
POST /v1/rollouts/{id}/promote|abort  {"reason": "..."}                   (bearer token)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from monitoring.controller.driver import Controller
from monitoring.controller.state_machine import ManualAbort, ManualPromote, describe


def _authorised(request: Request, token: str) -> JSONResponse | None:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        return JSONResponse(
            {"error": "missing bearer token", "field": None}, 401, headers={"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        return JSONResponse({"error": "wrong token", "field": None}, 403)
    return None


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

    async def start(request: Request) -> JSONResponse:
        if (denied := _authorised(request, token)) is not None:
            return denied
        try:
            version = str((await _json_body(request))["challenger_version"])
        except (ValueError, KeyError) as error:
            return JSONResponse({"error": f"need challenger_version: {error}", "field": "challenger_version"}, 422)

        def run() -> str:
            with lock:
                return controller.start(version)

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
            event_type = ManualPromote if kind == "promote" else ManualAbort

            def run() -> None:
                with lock:
                    controller.apply(rollout_id, event_type(at=controller.clock(), reason=reason))

            try:
                await asyncio.to_thread(run)
            except KeyError:
                return JSONResponse({"error": "unknown rollout", "field": "rollout_id"}, 404)
            return JSONResponse(await asyncio.to_thread(_view, rollout_id))

        return handler

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "alive", "holder": controller.holder})

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(controller.spec.analysis_interval_s):
            try:
                with lock:
                    controller.tick()
            except Exception:
                import logging

                logging.getLogger("mlops.controller").exception("tick failed")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        thread = threading.Thread(target=loop, name="controller-loop", daemon=True) if run_loop else None
        if thread:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread:
                thread.join(timeout=30)

    return Starlette(
        routes=[
            Route("/v1/rollouts", list_rollouts),
            Route("/v1/rollouts", start, methods=["POST"]),
            Route("/v1/rollouts/active", active),
            Route("/v1/rollouts/{rollout_id}", show),
            Route("/v1/rollouts/{rollout_id}/decisions", decisions),
            Route("/v1/rollouts/{rollout_id}/promote", manual("promote"), methods=["POST"]),
            Route("/v1/rollouts/{rollout_id}/abort", manual("abort"), methods=["POST"]),
            Route("/healthz", healthz),
            Route("/readyz", healthz),
        ],
        lifespan=lifespan,
    )

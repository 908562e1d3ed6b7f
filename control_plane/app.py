"""HTTP API over the control-plane store: open reads with long-polling, token-protected writes.

Long-poll design: one `_Watcher` per app keeps the last known generation of each resource. Writes through this
process notify waiters at once; writes by other processes (another API replica, a CLI writing the database) are
seen by a single background poll every `POLL_INTERVAL_S`, which runs only while someone is waiting. Waiters hold
no thread and no connection while they wait; every database call runs in the thread pool because SQLite may
block for the busy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane.http_errors import http_error
from control_plane.store import (
    SLOTS,
    ControlPlaneStore,
    GenerationConflict,
    Generations,
    PolicyError,
    SlotAssignment,
    StoreContention,
    TrafficPolicy,
    UnknownSlot,
)
from control_plane.tokens import check_bearer, resolve_token

__all__ = ["create_app", "resolve_token", "serve"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_WAIT_S = 30.0
POLL_INTERVAL_S = 0.1
MAX_HISTORY = 1_000
POLICY_KEY = "policy"

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------------------------------------------------------
# Errors: every failure leaves as {"error": ..., "field": ...}.


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field
        self.headers = headers
        self.extra = extra or {}


def _error(
    status: int, error: str, field: str | None = None, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": error, "field": field, **extra}, status_code=status, headers=headers)


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error(exc.status, exc.error, exc.field, exc.headers, **exc.extra)


async def _policy_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PolicyError)
    return _error(422, str(exc), exc.field)


async def _conflict(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GenerationConflict)
    return _error(409, str(exc), "expected_generation", current_generation=exc.current)


async def _unknown_slot(_request: Request, exc: Exception) -> Response:
    return _error(404, str(exc), "slot")


async def _unavailable(_request: Request, exc: Exception) -> Response:
    logger.warning("store unavailable: %s", exc)
    return _error(503, "control-plane store unavailable; retry later")


async def _internal_error(_request: Request, exc: Exception) -> Response:
    # Starlette still logs the traceback; the client gets JSON and the process keeps serving.
    return _error(500, f"internal error: {type(exc).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Request parsing.


class _StrictBody(BaseModel):
    # Strict: "true" is not a boolean and "3" is not a generation. Forbid extras: a misspelt
    # "expected_generation" must fail loudly rather than silently skip the compare-and-set.
    model_config = ConfigDict(strict=True, extra="forbid")


class PolicyBody(_StrictBody):
    weights: dict[str, float]
    shadow: bool
    champion_slot: str
    reason: str
    expected_generation: int | None = None


class AssignmentBody(_StrictBody):
    model_version: str | None
    expected_generation: int | None = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: Request) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"body exceeds {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:  # chunked uploads declare no length; count what actually arrives
                raise ApiError(413, f"body exceeds {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client disconnected before sending the whole body") from None
    try:
        return json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"malformed JSON: {error}") from None


def _parse(model: type[M], payload: Any) -> M:
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(422, f"{field}: {first['msg']}", field) from None


def _long_poll_params(request: Request) -> tuple[int | None, float]:
    """`after` absent means "answer now"; `wait` is capped so a client cannot pin a request forever."""
    raw_after, raw_wait = request.query_params.get("after"), request.query_params.get("wait")
    after: int | None = None
    if raw_after is not None:
        try:
            after = int(raw_after)
        except ValueError:
            raise ApiError(422, f"after: must be an integer generation, got {raw_after!r}", "after") from None
    wait = 0.0
    if raw_wait is not None:
        try:
            wait = float(raw_wait)
        except ValueError:
            wait = math.nan
        if not math.isfinite(wait) or wait < 0:
            raise ApiError(422, f"wait: must be a non-negative number of seconds, got {raw_wait!r}", "wait")
    return after, min(wait, MAX_WAIT_S)


def _slot_param(request: Request) -> str:
    slot = request.path_params["slot"]
    if slot not in SLOTS:
        raise UnknownSlot(slot)
    return str(slot)


def _slot_key(slot: str) -> str:
    return f"slot/{slot}"


# ---------------------------------------------------------------------------------------------------------------
# Long-poll wake-ups.


class _Watcher:
    def __init__(self, store: ControlPlaneStore) -> None:
        self._store = store
        self._generations: dict[str, int] = {}
        self._condition: asyncio.Condition | None = None
        self._poller: asyncio.Task[None] | None = None
        self._closing = False
        self.waiters = 0

    def _ensure_started(self) -> asyncio.Condition:
        # Lazily, inside the running loop: the app may be served with or without a lifespan.
        if self._condition is None:
            self._condition = asyncio.Condition()
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="control-plane-watcher")
        return self._condition

    def generation(self, key: str) -> int:
        return self._generations.get(key, 0)

    async def observe(self, key: str, generation: int) -> None:
        condition = self._ensure_started()
        async with condition:
            # Monotonic: a slow poll must not roll back what a local write already announced.
            if generation > self._generations.get(key, -1):
                self._generations[key] = generation
                condition.notify_all()

    async def observe_all(self, generations: Generations) -> None:
        await self.observe(POLICY_KEY, generations.policy)
        for slot, generation in generations.slots.items():
            await self.observe(_slot_key(slot), generation)

    async def wait_beyond(self, key: str, after: int, timeout: float) -> None:
        condition = self._ensure_started()
        self.waiters += 1
        try:
            async with condition:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await condition.wait_for(lambda: self._closing or self.generation(key) > after)
        finally:
            self.waiters -= 1

    async def _poll(self) -> None:
        failures = 0
        while not self._closing:
            await asyncio.sleep(POLL_INTERVAL_S)
            if not self.waiters:
                continue
            try:
                generations = await run_in_threadpool(self._store.generations)
            except Exception as error:  # keep polling: the database may come back
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    logger.warning("long-poll watcher cannot read the store (%d failures): %s", failures, error)
                continue
            failures = 0
            await self.observe_all(generations)

    async def release(self) -> None:
        """Answer every pending long-poll now, so shutdown does not wait out their timeouts."""
        self._closing = True
        if self._condition is not None:
            async with self._condition:
                self._condition.notify_all()

    async def stop(self) -> None:
        await self.release()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller


# ---------------------------------------------------------------------------------------------------------------
# Metrics.


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # dedicated: several apps per process (tests) must not collide
        self.policy_generation = Gauge(
            "control_plane_policy_generation", "Current traffic-policy generation", registry=self.registry
        )
        self.slot_generation = Gauge(
            "control_plane_slot_generation", "Current assignment generation per slot", ["slot"], registry=self.registry
        )
        self.waiters = Gauge(
            "control_plane_long_poll_waiters", "Long-poll requests waiting now", registry=self.registry
        )
        self.writes = Counter(
            "control_plane_writes",
            "Write requests by resource and outcome",
            ["resource", "outcome"],
            registry=self.registry,
        )

    def set_generations(self, generations: Generations) -> None:
        self.policy_generation.set(generations.policy)
        for slot, generation in generations.slots.items():
            self.slot_generation.labels(slot=slot).set(generation)

    def count_write(self, resource: str, error: BaseException | None) -> None:
        self.writes.labels(resource=resource, outcome=_write_outcome(error)).inc()


def _write_outcome(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    if isinstance(error, GenerationConflict):
        return "conflict"
    if isinstance(error, ApiError) and error.status in (401, 403):
        return "unauthorized"
    if isinstance(error, ApiError | PolicyError | UnknownSlot):
        return "invalid"
    return "error"


# ---------------------------------------------------------------------------------------------------------------
# Endpoints.


class _ControlPlaneApi:
    def __init__(self, store: ControlPlaneStore, token: str) -> None:
        if not token:
            raise ValueError("control-plane token must not be empty")
        self.store = store
        self._token = token
        self.watcher = _Watcher(store)
        self.metrics = _Metrics()

    # -- helpers ------------------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        rejected = check_bearer(request.headers.get("authorization"), self._token)
        if rejected is not None:
            raise ApiError(rejected.status, rejected.message, "authorization", rejected.headers or None)

    async def _long_poll(
        self, request: Request, key: str, read: Callable[[], T], generation_of: Callable[[T], int]
    ) -> T:
        after, wait = _long_poll_params(request)
        current = await run_in_threadpool(read)
        if after is None or wait <= 0 or generation_of(current) > after:
            return current
        await self.watcher.observe(key, generation_of(current))
        await self.watcher.wait_beyond(key, after, wait)
        return await run_in_threadpool(read)

    async def _counted(self, resource: str, write: Awaitable[Response]) -> Response:
        try:
            response = await write
        except Exception as error:
            self.metrics.count_write(resource, error)
            raise
        self.metrics.count_write(resource, None)
        return response

    # -- probes -------------------------------------------------------------------------------------------------

    async def healthz(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, _request: Request) -> Response:
        try:
            await run_in_threadpool(self.store.ping)
        except Exception as error:
            logger.warning("not ready: %s", error)
            return _error(503, "control-plane store unreachable")
        return JSONResponse({"status": "ready"})

    async def metrics_endpoint(self, _request: Request) -> Response:
        try:
            self.metrics.set_generations(await run_in_threadpool(self.store.generations))
        except Exception as error:  # a scrape must still answer, with the last known values
            logger.warning("metrics: cannot read the store: %s", error)
        self.metrics.waiters.set(self.watcher.waiters)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- policy -------------------------------------------------------------------------------------------------

    async def get_policy(self, request: Request) -> Response:
        policy = await self._long_poll(request, POLICY_KEY, self.store.get_policy, lambda p: p.generation)
        return JSONResponse(policy.to_json())

    async def policy_history(self, request: Request) -> Response:
        raw = request.query_params.get("limit", "50")
        if not raw.isdigit():
            raise ApiError(422, f"limit: must be a non-negative integer, got {raw!r}", "limit")
        history = await run_in_threadpool(self.store.policy_history, min(int(raw), MAX_HISTORY))
        return JSONResponse({"policies": [policy.to_json() for policy in history]})

    async def put_policy(self, request: Request) -> Response:
        return await self._counted(POLICY_KEY, self._put_policy(request))

    async def _put_policy(self, request: Request) -> Response:
        self._authorize(request)
        body = _parse(PolicyBody, await _read_json(request))
        policy: TrafficPolicy = await run_in_threadpool(
            self.store.set_policy, body.weights, body.shadow, body.champion_slot, body.reason, body.expected_generation
        )
        logger.info(
            "policy generation %d: weights=%s shadow=%s champion=%s reason=%r",
            policy.generation,
            policy.weights,
            policy.shadow,
            policy.champion_slot,
            policy.reason,
        )
        await self.watcher.observe(POLICY_KEY, policy.generation)
        return JSONResponse(policy.to_json())

    # -- slots --------------------------------------------------------------------------------------------------

    async def get_slots(self, _request: Request) -> Response:
        assignments = await run_in_threadpool(self.store.get_assignments)
        return JSONResponse({"slots": {slot: a.to_json() for slot, a in assignments.items()}})

    async def get_slot(self, request: Request) -> Response:
        slot = _slot_param(request)
        assignment: SlotAssignment = await self._long_poll(
            request, _slot_key(slot), lambda: self.store.get_assignment(slot), lambda a: a.generation
        )
        return JSONResponse(assignment.to_json())

    async def put_slot(self, request: Request) -> Response:
        return await self._counted("slot", self._put_slot(request))

    async def _put_slot(self, request: Request) -> Response:
        self._authorize(request)
        slot = _slot_param(request)
        body = _parse(AssignmentBody, await _read_json(request))
        assignment: SlotAssignment = await run_in_threadpool(
            self.store.assign, slot, body.model_version, body.expected_generation
        )
        logger.info("slot %s generation %d: model_version=%r", slot, assignment.generation, assignment.model_version)
        await self.watcher.observe(_slot_key(slot), assignment.generation)
        return JSONResponse(assignment.to_json())

    def routes(self) -> list[Route]:
        return [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            Route("/v1/policy", self.get_policy, methods=["GET"]),
            Route("/v1/policy", self.put_policy, methods=["PUT"]),
            Route("/v1/policy/history", self.policy_history, methods=["GET"]),
            Route("/v1/slots", self.get_slots, methods=["GET"]),
            Route("/v1/slots/{slot}", self.get_slot, methods=["GET"]),
            Route("/v1/slots/{slot}", self.put_slot, methods=["PUT"]),
        ]


def create_app(store: ControlPlaneStore, token: str) -> Starlette:
    api = _ControlPlaneApi(store, token)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await api.watcher.stop()

    app = Starlette(
        routes=api.routes(),
        lifespan=lifespan,
        exception_handlers={
            ApiError: _api_error,
            PolicyError: _policy_error,
            GenerationConflict: _conflict,
            UnknownSlot: _unknown_slot,
            StoreContention: _unavailable,
            SQLAlchemyError: _unavailable,
            HTTPException: http_error,
            Exception: _internal_error,
        },
    )
    app.state.control_plane = api
    return app


# ---------------------------------------------------------------------------------------------------------------
# Serving.


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, release: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._release = release

    async def shutdown(self, sockets: Any = None) -> None:
        # Answer pending long-polls first; otherwise SIGTERM waits up to MAX_WAIT_S for them to time out.
        await self._release()
        await super().shutdown(sockets)


def _log_config(log_file: Path) -> dict[str, Any]:
    handlers = ["stderr", "file"]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"},
            "file": {
                "class": "logging.FileHandler",
                "formatter": "plain",
                "filename": str(log_file),
                "encoding": "utf-8",
            },
        },
        "loggers": {
            name: {"handlers": handlers, "level": "INFO", "propagate": False}
            for name in ("uvicorn", "uvicorn.access", "control_plane")
        },
    }


def serve(settings: Any, host: str, port: int) -> None:
    """Run the API in this process until SIGTERM/SIGINT (uvicorn handles both and drains connections)."""
    settings.home.mkdir(parents=True, exist_ok=True)
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    store = ControlPlaneStore(settings.control_plane_db)
    try:
        app = create_app(store, resolve_token(settings))
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=_log_config(settings.logs_dir / "control-plane.log"),
            timeout_graceful_shutdown=5,
            lifespan="on",
        )
        _Server(config, app.state.control_plane.watcher.release).run()
    finally:
        store.close()

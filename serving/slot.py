"""A model slot: serves whichever model version the control plane assigned to it.

The slot long-polls its assignment, downloads the new version from MLflow and loads it in a worker
thread while the old model keeps answering; then one reference swap makes the new model live, so a
hot swap never fails a request. If MLflow or the control plane is unreachable, the slot keeps serving
what it has and tries again.

The hot path is a plain Starlette route (msgspec decode, one torch forward, msgspec encode); the
BentoML service in `serving/slot_service.py` mounts this app, so BentoML manages the process while its
per-request machinery stays off the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from control_plane.client import AsyncControlPlaneClient, ControlPlaneError, ControlPlaneUnavailable
from control_plane.http_errors import EXCEPTION_HANDLERS
from control_plane.tokens import check_bearer, resolve_token
from core.model import FraudScorer
from core.schema import CATEGORICAL_FEATURES, COLUMNS_BY_NAME
from core.settings import Settings
from serving.requests import RequestError, encode, features, parse_batch, parse_transaction

log = logging.getLogger("mlops.slot")
disable_created_metrics()  # `_created` series only clutter dashboards
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclass
class Defect:
    """Deliberate faults for scenarios: baked into a model version (`defect.json` beside the model, see
    `mlops scenario`) or switched on at run time through `POST /v1/fault` (token-protected).

    - `extra_latency_ms`: every answer waits this long first (a slower model);
    - `error_rate`: this share of requests fails with a 500 (an error-prone model);
    - `decorrelate`: this share of requests gets the score of an unrelated recent request instead of its
      own. The score distribution and the decline rate stay the same, but at 1.0 every decision is
      independent of the request, and so of the champion's decision: a model that lost its signal, or one
      that answers with random decisions;
    - `flip_share`: this share of requests gets `1 - score` (a model that disagrees with the champion);
    - `random_decisions`: every request is declined with this probability, at random (0: off): a score that
      disagrees with the coin is redrawn uniformly on the coin's side of the decision threshold, so the
      decisions are independent of the request, and so of the champion's, at a decline rate you choose (the
      champion's, ~0.025, makes raw agreement look fine: ~95 %);
    - `score_scale_above`: a score at or above the decision threshold is multiplied by this (1: off), so a
      share of the declines falls below the threshold: fewer declines and a lower recall, nothing else changes;
    - `slice`: the defect applies only to requests in this slice, `{column: category}` (categorical columns
      of the data schema, every pair must match), e.g. `{merchant_category: electronics}`: a regression
      confined to one merchant category or country. Latency and errors are per call, so in a batch they
      apply when any request of the batch is in the slice.
    """

    extra_latency_ms: float = 0.0
    error_rate: float = 0.0
    decorrelate: float = 0.0
    flip_share: float = 0.0
    score_scale_above: float = 1.0
    random_decisions: float = 0.0
    slice: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.extra_latency_ms <= 60_000:
            raise ValueError(f"extra_latency_ms must be within [0, 60000], got {self.extra_latency_ms}")
        for name in ("error_rate", "decorrelate", "flip_share", "score_scale_above", "random_decisions"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        problem = slice_problem(self.slice)
        if problem:
            raise ValueError(problem)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Defect:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown defect field(s) {', '.join(sorted(unknown))}")
        where = data.get("slice") or {}
        if not isinstance(where, dict):
            raise ValueError(f"slice must be a mapping of column to category, got {where!r}")
        numbers = {k: float(v) for k, v in data.items() if k != "slice"}
        return cls(**numbers, slice={str(k): str(v) for k, v in where.items()})

    @classmethod
    def from_model_dir(cls, directory: Path) -> Defect | None:
        path = directory / "defect.json"
        return cls.from_dict(json.loads(path.read_text())) if path.exists() else None

    @property
    def active(self) -> bool:
        return any(
            (self.extra_latency_ms, self.error_rate, self.decorrelate, self.flip_share, self.random_decisions)
        ) or (self.score_scale_above != 1.0)

    def applies_to(self, row: dict[str, Any]) -> bool:
        """Whether a request (its features) is in the defect's slice (every request when there is none)."""
        return all(row.get(column) == category for column, category in self.slice.items())


def slice_problem(where: dict[str, str]) -> str | None:
    """Why `where` is not a slice of the data schema (core/schema.py), naming the field; None when it is."""
    for column, category in where.items():
        known = COLUMNS_BY_NAME.get(column)
        if known is None or known.kind != "categorical":
            columns = ", ".join(CATEGORICAL_FEATURES)
            return f"slice.{column}: not a categorical column of the data schema; one of {columns}"
        if category not in known.categories:
            return f"slice.{column}: unknown category {category!r}; one of {', '.join(known.categories)}"
    return None


@dataclass
class LoadedModel:
    version: str
    scorer: FraudScorer
    defect: Defect | None = None
    loaded_at: float = field(default_factory=time.time)


class SlotState:
    def __init__(self, slot: str) -> None:
        self.slot = slot
        self.model: LoadedModel | None = None
        self.fault: Defect | None = None  # set at run time (POST /v1/fault); cleared by the next model load
        self.recent_scores: deque[float] = deque(maxlen=512)  # what `decorrelate` draws from
        self.threshold = 0.5  # the decision threshold `score_scale_above` acts at (set from the settings)
        self.generation = 0
        self.last_error: str | None = None
        self.registry = CollectorRegistry()
        self.requests = Counter("slot_requests_total", "Scoring requests", ["status"], registry=self.registry)
        self.loads = Counter("slot_model_loads_total", "Model loads", ["outcome"], registry=self.registry)
        self.generation_gauge = Gauge(
            "slot_assignment_generation", "Applied assignment generation", registry=self.registry
        )


def mlflow_loader(settings: Settings) -> Callable[[str], LoadedModel]:
    """Download `models:/<name>/<version>` from MLflow and load it (runs in a worker thread)."""

    def load(version: str) -> LoadedModel:
        from core.registry import connect, download_model

        connect(settings)
        with tempfile.TemporaryDirectory(prefix=f"slot-v{version}-") as workdir:
            model_dir, _ = download_model(f"models:/{settings.model_name}/{version}", workdir)
            return LoadedModel(version, FraudScorer.load(model_dir), Defect.from_model_dir(model_dir))

    return load


async def _score(state: SlotState, rows: list[dict[str, Any]]) -> list[float]:
    model = state.model
    if model is None:
        raise RequestError(503, f"slot {state.slot} has no model loaded yet")
    defect = state.fault or model.defect
    if defect is None:
        return model.scorer.score_records(rows).tolist()
    inside = [defect.applies_to(row) for row in rows]
    if any(inside):
        if defect.extra_latency_ms:
            await asyncio.sleep(defect.extra_latency_ms / 1000)
        if defect.error_rate and random.random() < defect.error_rate:
            raise RequestError(500, f"injected fault in model version {model.version}")
    return _degrade(state, defect, model.scorer.score_records(rows).tolist(), inside)


def _degrade(state: SlotState, defect: Defect, scores: list[float], inside: list[bool] | None = None) -> list[float]:
    """The defect's effect on each score; `inside`: whether each request is in the defect's slice (default all)."""
    out = []
    for score, affected in zip(scores, inside or [True] * len(scores), strict=True):
        state.recent_scores.append(score)
        if not affected:
            out.append(score)
            continue
        if defect.decorrelate and random.random() < defect.decorrelate:
            score = random.choice(state.recent_scores)
        if defect.flip_share and random.random() < defect.flip_share:
            score = 1.0 - score
        if score >= state.threshold:
            score *= defect.score_scale_above
        if defect.random_decisions:
            declined = random.random() < defect.random_decisions
            if declined and score < state.threshold:
                score = state.threshold + (1.0 - state.threshold) * random.random()
            elif not declined and score >= state.threshold:
                score = state.threshold * random.random()
        out.append(score)
    return out


def create_slot_app(
    settings: Settings, slot: str, loader: Callable[[str], LoadedModel] | None = None, watch: bool = True
) -> Starlette:
    state = SlotState(slot)
    state.threshold = settings.decision_threshold
    load = loader or mlflow_loader(settings)

    async def predict(request: Request) -> Response:
        try:
            transaction = parse_transaction(await request.body())
            score = (await _score(state, [features(transaction)]))[0]
        except RequestError as error:
            state.requests.labels("error").inc()
            return Response(encode(error.body()), error.status, media_type="application/json")
        state.requests.labels("ok").inc()
        version = state.model.version if state.model else None
        return Response(encode({"score": score, "model_version": version, "slot": slot}), media_type="application/json")

    async def predict_batch(request: Request) -> Response:
        try:
            batch = parse_batch(await request.body())
            scores = await _score(state, [features(t) for t in batch])
        except RequestError as error:
            state.requests.labels("error").inc()
            return Response(encode(error.body()), error.status, media_type="application/json")
        state.requests.labels("ok").inc(len(scores))
        version = state.model.version if state.model else None
        return Response(
            encode({"scores": scores, "model_version": version, "slot": slot}), media_type="application/json"
        )

    async def readyz(_: Request) -> Response:
        body = {
            "slot": slot,
            "model_version": state.model.version if state.model else None,
            "generation": state.generation,
            "last_error": state.last_error,
        }
        return Response(encode(body), 200 if state.model else 503, media_type="application/json")

    async def healthz(_: Request) -> Response:
        return Response(b'{"status":"alive"}', media_type="application/json")

    token = resolve_token(settings)

    async def fault(request: Request) -> Response:
        """Chaos hook for scenarios: switch a `Defect` on (a JSON object of its fields) or off (`{}`)."""
        rejected = check_bearer(request.headers.get("authorization"), token)
        if rejected is not None:
            body = encode({"error": rejected.message, "field": "authorization"})
            return Response(body, rejected.status, rejected.headers, media_type="application/json")
        try:
            body = json.loads(await request.body() or b"{}")
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            defect = Defect.from_dict(body)
        except (ValueError, TypeError) as error:
            return Response(encode({"error": str(error), "field": None}), 422, media_type="application/json")
        state.fault = defect if defect.active else None
        log.warning("slot %s: runtime fault %s", slot, asdict(defect) if defect.active else "cleared")
        return Response(encode({"slot": slot, "fault": asdict(state.fault) if state.fault else None}))

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(state.registry), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(watch_assignment(settings, state, load)) if watch else None
        try:
            yield
        finally:
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = Starlette(
        routes=[
            Route("/v1/predict", predict, methods=["POST"]),
            Route("/v1/predict/batch", predict_batch, methods=["POST"]),
            # BentoML answers /readyz itself (via __is_ready__); /v1/status carries the details.
            Route("/v1/status", readyz),
            Route("/v1/fault", fault, methods=["POST"]),
            Route("/readyz", readyz),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,  # 404/405 as JSON naming the method and path
    )
    app.state.slot = state
    return app


async def watch_assignment(settings: Settings, state: SlotState, load: Callable[[str], LoadedModel]) -> None:
    """Follow this slot's assignment; load each new version off the event loop, then swap it in."""
    client = AsyncControlPlaneClient(settings.control_plane_url)
    backoff = 0.5
    load_backoff = 1.0  # doubles per failed load of the same assignment, up to the long-poll's 30 s
    try:
        while True:
            try:
                assignment = await client.wait_assignment(state.slot, after=state.generation, wait=10.0)
            except (ControlPlaneUnavailable, ControlPlaneError) as error:
                state.last_error = f"control plane: {error}"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.5
            if assignment.generation <= state.generation:
                continue  # long-poll timed out, or an older generation: never go backwards
            current = state.model.version if state.model else None
            if assignment.model_version and assignment.model_version != current:
                try:
                    state.model = await asyncio.to_thread(load, assignment.model_version)
                    state.fault = None
                    state.loads.labels("ok").inc()
                    # Loading imports MLflow and allocates a lot; freeze what survives so later full GC
                    # passes stay short (they otherwise show up as 50-100 ms spikes in p99).
                    gc.collect()
                    gc.freeze()
                    log.info("slot %s now serves version %s", state.slot, assignment.model_version)
                except Exception as error:  # MLflow down, unknown version, broken artifact: keep serving
                    state.loads.labels("error").inc()
                    state.last_error = f"loading version {assignment.model_version}: {error}"
                    log.warning("slot %s: %s", state.slot, state.last_error)
                    # Retry later, less and less often (a broken version would otherwise be downloaded every
                    # few seconds for ever), but wait as a long-poll: a newer assignment ends the wait at once.
                    load_backoff = min(load_backoff * 2, 30.0)
                    with contextlib.suppress(ControlPlaneUnavailable, ControlPlaneError):
                        await client.wait_assignment(state.slot, after=assignment.generation, wait=load_backoff)
                    continue  # generation not advanced: the next poll returns the newest assignment
                load_backoff = 1.0
            state.generation = assignment.generation
            state.generation_gauge.set(state.generation)
            state.last_error = None
    finally:
        await client.close()

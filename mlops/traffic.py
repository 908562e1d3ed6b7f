"""Traffic simulator: generated card transactions sent through the gateway, labels posted later.

Open loop at a fixed rate (request `i` is due at `start + i / rps`), because real payment traffic does not
slow down when the service does; a bounded number of requests are in flight at once. Every answered request's
true label is posted to `/v1/feedback` `label_delay_s` later, with the labels token (a label writer's
credential, `control_plane.labels_token`), which is how confirmed fraud arrives in production: late.
Transactions come from `core.synthetic` (optionally drifted), so the features and the fraud rule are those
the models were trained on.

Used by `mlops traffic` (with a live display) and by the scenario runner (in a background thread).
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from core.schema import FEATURES, LABEL
from core.synthetic import DRIFT_KINDS, generate_transactions

REQUEST_FIELDS = ("account_id", *FEATURES)
CHUNK_SECONDS = 10  # transactions are generated this many seconds ahead, not all at once...
# ...but never fewer than this many: the generator draws ~rows/25 accounts per call, and a small call's few
# accounts would make clean traffic look drifted (account age, home country) next to the training data.
MIN_CHUNK_ROWS = 20_000
CLIENT_DEADLINE_S = 10.0  # what a client waits for an answer, connection retries included
CONNECT_RETRY_S = 0.2  # pause before trying a refused connection again
CLIENT_KEEPALIVE_S = 2.0  # below the gateway server's keep-alive timeout


@dataclass(frozen=True)
class TrafficPlan:
    rps: float
    duration_s: float
    label_delay_s: float = 5.0
    drift: str | None = None
    fraud_rate: float = 0.02
    seed: int = 0
    label_share: float = 1.0  # share of answered requests whose label ever arrives
    concurrency: int = 64

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.rps <= 5_000:
            problems.append(f"rps must be within (0, 5000], got {self.rps}")
        if not 0 < self.duration_s <= 86_400:
            problems.append(f"duration must be within (0, 86400] seconds, got {self.duration_s}")
        if not 0 <= self.label_delay_s <= 3_600:
            problems.append(f"label delay must be within [0, 3600] seconds, got {self.label_delay_s}")
        if self.drift is not None and self.drift not in DRIFT_KINDS:
            problems.append(f"unknown drift kind {self.drift!r}; choose one of {', '.join(DRIFT_KINDS)}")
        if not 0 < self.fraud_rate < 1:
            problems.append(f"fraud rate must be within (0, 1), got {self.fraud_rate}")
        if not 0 <= self.label_share <= 1:
            problems.append(f"label share must be within [0, 1], got {self.label_share}")
        if not 1 <= self.concurrency <= 4_096:
            problems.append(f"concurrency must be within [1, 4096], got {self.concurrency}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class TrafficStats:
    """What the simulator saw, from the client's side."""

    sent: int = 0
    answered: int = 0  # 2xx
    failed: int = 0  # anything else, transport errors included: what a client would call an outage
    # Of `failed`: sent, then the connection broke with no answer (a gateway that died with them in flight).
    in_flight_lost: int = 0
    # Connections refused (nothing listening: a gateway restarting) and tried again; the request was never sent,
    # so a client retries it within its deadline, as a card terminal does. Not failures unless the deadline passes.
    connects_retried: int = 0
    # Of `failed`: requests whose connection was refused (no gateway listening: the only one was restarting) and
    # that were still unanswered at the deadline. On kind a second gateway replica would have taken them; here they
    # are counted apart, for an expectation to bound (`max_gateway_down_errors`), never dropped.
    gateway_down: int = 0
    by_status: collections.Counter[str] = field(default_factory=collections.Counter)  # the gateway's status field
    by_variant: collections.Counter[str] = field(default_factory=collections.Counter)
    labels_sent: int = 0
    labels_failed: int = 0
    frauds_labelled: int = 0
    errors: list[str] = field(default_factory=list)  # the first few failures, verbatim
    label_errors: list[str] = field(default_factory=list)  # the first few refused labels, verbatim
    latencies_ms: list[float] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    def record_failure(self, message: str, in_flight_lost: bool = False, gateway_down: bool = False) -> None:
        """Count a failed request; keep the first few verbatim, with when they failed (seconds into the run and
        wall-clock time, to place them against the gateway's policy log: an intermittent failure must say when)."""
        self.failed += 1
        self.in_flight_lost += in_flight_lost
        self.gateway_down += gateway_down and not in_flight_lost
        if len(self.errors) < 5:
            now = time.time()
            stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
            self.errors.append(f"t={now - self.started_at:.1f}s ({stamp}): {message}")

    def summary(self) -> dict[str, Any]:
        latencies = np.asarray(self.latencies_ms, dtype=float)
        elapsed = max(time.time() - self.started_at, 1e-9)
        return {
            "sent": self.sent,
            "answered": self.answered,
            "failed": self.failed,
            "in_flight_lost": self.in_flight_lost,
            "connects_retried": self.connects_retried,
            "gateway_down": self.gateway_down,
            "achieved_rps": round(self.sent / elapsed, 1),
            "by_status": dict(self.by_status),
            "by_variant": dict(self.by_variant),
            "labels_sent": self.labels_sent,
            "labels_failed": self.labels_failed,
            "frauds_labelled": self.frauds_labelled,
            "label_errors": list(self.label_errors),
            # None, not NaN (which is not JSON), when nothing was answered
            "latency_p50_ms": round(float(np.percentile(latencies, 50)), 2) if latencies.size else None,
            "latency_p99_ms": round(float(np.percentile(latencies, 99)), 2) if latencies.size else None,
            "errors": list(self.errors),
        }


def transactions(plan: TrafficPlan) -> Iterator[tuple[dict[str, Any], int]]:
    """(request body, true label) pairs, generated a chunk at a time; ids are left to the gateway so that
    repeated runs never reuse one."""
    chunk_rows = max(MIN_CHUNK_ROWS, int(plan.rps * CHUNK_SECONDS))
    chunk = 0
    while True:
        frame = generate_transactions(
            chunk_rows, seed=plan.seed * 1_000_003 + chunk, drift=plan.drift, fraud_rate=plan.fraud_rate
        )
        labels = frame[LABEL].to_numpy()
        frame = frame[[name for name in REQUEST_FIELDS if name in frame]]
        for body, label in zip(json.loads(frame.to_json(orient="records")), labels, strict=True):
            yield body, int(label)
        chunk += 1


async def run_traffic(
    gateway_url: str,
    plan: TrafficPlan,
    stop: threading.Event | None = None,
    on_progress: Callable[[TrafficStats, float], None] | None = None,
    stats: TrafficStats | None = None,
    *,
    labels_token: str,
) -> TrafficStats:
    """Send `plan.rps` requests a second for `plan.duration_s` (or until `stop` is set), post the labels late
    (with `labels_token`), and return what the client saw. Labels still due when the traffic ends are posted
    before returning, unless `stop` was set (then the caller no longer wants them)."""
    stats = stats or TrafficStats()
    stats.started_at = time.time()
    due_labels: collections.deque[tuple[float, str, int]] = collections.deque()
    rng = np.random.default_rng(plan.seed)
    limit = asyncio.Semaphore(plan.concurrency)
    # Idle connections are dropped after 2 s, before the gateway's server closes them (uvicorn: 5 s): a request sent
    # on a connection the server is closing at that moment fails with "Server disconnected" (seen in the scenarios
    # as a client error in a quiet moment; the gateway does the same towards its slots).
    connector = aiohttp.TCPConnector(limit=plan.concurrency * 2, keepalive_timeout=CLIENT_KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=CLIENT_DEADLINE_S)
    stopped = stop or threading.Event()
    label_headers = {"Authorization": f"Bearer {labels_token}"}
    async with aiohttp.ClientSession(gateway_url, connector=connector, timeout=timeout) as session:

        async def post_score(body: dict[str, Any], sent_at: float, refused: list[bool]) -> tuple[int, Any]:
            """One request; a refused connection (never sent) is tried again until the client's deadline, and
            noted in `refused`."""
            while True:
                try:
                    async with session.post("/v1/score", json=body) as response:
                        return response.status, await response.json(content_type=None)
                except aiohttp.ClientConnectorError:
                    refused[0] = True
                    if time.perf_counter() - sent_at + CONNECT_RETRY_S >= CLIENT_DEADLINE_S:
                        raise
                    stats.connects_retried += 1
                    await asyncio.sleep(CONNECT_RETRY_S)

        async def score(body: dict[str, Any], label: int) -> None:
            sent_at = time.perf_counter()
            refused = [False]  # met no listening gateway: a failure by the deadline is then `gateway_down`
            try:
                status, answer = await asyncio.wait_for(post_score(body, sent_at, refused), CLIENT_DEADLINE_S)
                if status >= 300:
                    stats.record_failure(f"HTTP {status}: {answer}")
                    return
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
                lost = not isinstance(error, aiohttp.ClientConnectorError)  # sent, and the connection broke
                stats.record_failure(f"{type(error).__name__}: {error}", in_flight_lost=lost, gateway_down=refused[0])
                return
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as error:
                stats.record_failure(f"{type(error).__name__}: {error}", gateway_down=refused[0])
                return
            finally:
                limit.release()
            stats.answered += 1
            stats.by_status[str(answer.get("status", "ok"))] += 1
            stats.by_variant[str(answer.get("variant", "?"))] += 1
            stats.latencies_ms.append((time.perf_counter() - sent_at) * 1000)
            if rng.random() < plan.label_share:
                due_labels.append((time.monotonic() + plan.label_delay_s, str(answer["request_id"]), label))

        async def post_label(request_id: str, label: int) -> None:
            try:
                body = {"request_id": request_id, "label": label}
                async with session.post("/v1/feedback", json=body, headers=label_headers) as response:
                    answer = await response.read()
                    ok = response.status < 300
                    refusal = f"HTTP {response.status}: {answer[:200].decode(errors='replace')}"
            except (aiohttp.ClientError, TimeoutError) as error:
                ok, refusal = False, f"{type(error).__name__}: {error}"
            if not ok and len(stats.label_errors) < 5:
                stats.label_errors.append(refusal)
            stats.labels_sent += ok
            stats.labels_failed += not ok
            stats.frauds_labelled += ok and label == 1

        async def labeller(sending_done: asyncio.Event) -> None:
            pending: set[asyncio.Task[None]] = set()
            while not stopped.is_set() and not (sending_done.is_set() and not due_labels):
                now = time.monotonic()
                while due_labels and due_labels[0][0] <= now:
                    _, request_id, label = due_labels.popleft()
                    task = asyncio.create_task(post_label(request_id, label))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.sleep(0.05)
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

        async def reporter() -> None:
            while True:
                if on_progress is not None:
                    on_progress(stats, time.time() - stats.started_at)
                await asyncio.sleep(0.5)

        sending_done = asyncio.Event()
        label_task = asyncio.create_task(labeller(sending_done))
        report_task = asyncio.create_task(reporter())
        in_flight: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        total = int(plan.rps * plan.duration_s)
        for index, (body, label) in enumerate(transactions(plan)):
            if index >= total or stopped.is_set():
                break
            delay = start + index / plan.rps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await limit.acquire()  # at most `concurrency` in flight; beyond that the rate falls behind
            stats.sent += 1
            task = asyncio.create_task(score(body, label))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
        sending_done.set()
        await label_task
        report_task.cancel()
        if on_progress is not None:
            on_progress(stats, time.time() - stats.started_at)
    return stats


class BackgroundTraffic:
    """`run_traffic` in a thread, for callers that do other things meanwhile (the scenario runner)."""

    def __init__(self, gateway_url: str, plan: TrafficPlan, *, labels_token: str) -> None:
        self.stats = TrafficStats()
        self._labels_token = labels_token
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(gateway_url, plan), name="traffic", daemon=True)

    def _run(self, gateway_url: str, plan: TrafficPlan) -> None:
        try:
            asyncio.run(run_traffic(gateway_url, plan, self._stop, stats=self.stats, labels_token=self._labels_token))
        except BaseException as error:  # surfaced by stop(): a broken simulator must not look like a quiet run
            self._error = error

    def start(self) -> BackgroundTraffic:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> TrafficStats:
        self._stop.set()
        self._thread.join(timeout)
        if self._error is not None:
            raise RuntimeError(f"traffic simulator failed: {self._error}") from self._error
        return self.stats

"""The traffic client's count of requests that met no listening gateway (`TrafficStats.gateway_down`): a request
refused throughout its deadline is a failure counted apart, never dropped (`fault-gateway-kill` bounds it)."""

from __future__ import annotations

import asyncio

import pytest

from core.processes import free_port
from mlops import traffic
from mlops.traffic import TrafficPlan, run_traffic


def test_requests_refused_until_their_deadline_are_failures_counted_as_gateway_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(traffic, "CLIENT_DEADLINE_S", 1.0)  # the client's deadline, shortened for the test
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every connection is refused
    stats = asyncio.run(
        run_traffic(url, TrafficPlan(rps=10, duration_s=0.5, concurrency=4, label_delay_s=0), labels_token="t")
    )
    assert stats.sent > 0 and stats.answered == 0
    assert stats.failed == stats.sent == stats.gateway_down  # failures, all of them, and each counted apart
    assert stats.in_flight_lost == 0 and stats.connects_retried > 0
    assert stats.summary()["gateway_down"] == stats.gateway_down

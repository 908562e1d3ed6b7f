"""The control-plane API as deployed: a real server process on loopback, exercised over HTTP and by the clients.

Each server runs with `MLOPS_HOME` in a pytest temporary directory, in its own session, and is stopped by
killing its process group.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from starlette.requests import Request

from control_plane.app import MAX_WAIT_S, _long_poll_params, create_app
from control_plane.client import (
    AsyncControlPlaneClient,
    ControlPlaneClient,
    ControlPlaneConflict,
    ControlPlaneError,
    ControlPlaneUnavailable,
)
from control_plane.store import ControlPlaneStore
from control_plane.tokens import resolve_token
from core.processes import free_port, stop_pid

REPO = Path(__file__).resolve().parents[1]
POLICY: dict[str, Any] = {"weights": {"a": 0.9, "b": 0.1}, "shadow": False, "champion_slot": "a", "reason": "test"}


@dataclass
class Server:
    url: str
    home: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def token(self) -> str:
        return (self.home / "control-plane.token").read_text().strip()

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.home / 'control-plane.db'}"

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def client(self, token: str | None = None) -> ControlPlaneClient:
        return ControlPlaneClient(self.url, token=token or self.token)


def _start_server(root: Path) -> Server:
    """`mlops serve control-plane` with a clean environment: no token configured, so it generates one."""
    home, log = root / "home", root / "server.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")}
    env.update(
        {"MLOPS_HOME": str(home), "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlops.cli", "serve", "control-plane", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", home, proc, log)
    try:
        _wait_ready(server)
    except BaseException:
        stop_pid(server.proc.pid, 15, server.proc)
        raise
    return server


def _wait_ready(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, f"server exited:\n{server.log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"control plane not ready:\n{server.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = _start_server(tmp_path_factory.mktemp("control-plane"))
    try:
        yield running
    finally:
        stop_pid(running.proc.pid, 15, running.proc)


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def _current_generation(http: httpx.Client) -> int:
    return int(http.get("/v1/policy").json()["generation"])


# -- reads, auth ----------------------------------------------------------------------------------------------------


def test_reads_need_no_token(http: httpx.Client) -> None:
    for path in (
        "/healthz",
        "/readyz",
        "/v1/policy",
        "/v1/policy/history",
        "/v1/slots",
        "/v1/slots/a",
        "/v1/slots/b",
        "/metrics",
    ):
        assert http.get(path).status_code == 200, path
    assert set(http.get("/v1/slots").json()["slots"]) == {"a", "b"}


@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwYXNz", "Bearer", "token-without-scheme"])
def test_write_without_a_bearer_token_is_401_with_challenge(http: httpx.Client, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    before = _current_generation(http)
    response = http.put("/v1/policy", json=POLICY, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["field"] == "authorization"
    assert _current_generation(http) == before


def test_write_with_wrong_token_is_403(server: Server, http: httpx.Client) -> None:
    before = _current_generation(http)
    for path, body in (("/v1/policy", POLICY), ("/v1/slots/a", {"model_version": "1"})):
        response = http.put(path, json=body, headers=server.auth("not-the-token"))
        assert response.status_code == 403, path
        assert "error" in response.json()
    assert _current_generation(http) == before


def test_write_with_right_token_is_200_and_visible_to_readers(server: Server, http: httpx.Client) -> None:
    before = _current_generation(http)
    response = http.put("/v1/policy", json={**POLICY, "reason": "right token"}, headers=server.auth())
    assert response.status_code == 200
    assert response.json()["generation"] == before + 1
    assert http.get("/v1/policy").json()["reason"] == "right token"


def test_generated_token_file_is_private_and_shared_with_clients(server: Server) -> None:
    path = server.home / "control-plane.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    settings = SimpleNamespace(control_plane_token="", home=server.home)
    assert resolve_token(settings) == server.token  # another local process resolves the same token
    with server.client(resolve_token(settings)) as client:
        assert client.assign("a", "v-shared").model_version == "v-shared"


def test_resolve_token_prefers_configured_token_and_creates_file_once(tmp_path: Path) -> None:
    assert resolve_token(SimpleNamespace(control_plane_token="configured", home=tmp_path)) == "configured"
    assert not (tmp_path / "control-plane.token").exists()
    generated = resolve_token(SimpleNamespace(control_plane_token="", home=tmp_path / "home"))
    assert len(generated) >= 40
    assert resolve_token(SimpleNamespace(control_plane_token="", home=tmp_path / "home")) == generated
    assert stat.S_IMODE((tmp_path / "home" / "control-plane.token").stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["control-plane.token"]  # no temp left


# -- request validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"weights": NaN}', b"\xff\xfe", b"[" * 20_000])
def test_malformed_json_is_400(server: Server, http: httpx.Client, body: bytes) -> None:
    response = http.put("/v1/policy", content=body, headers=server.auth())
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]


@pytest.mark.parametrize("field", ["weights", "shadow", "champion_slot", "reason"])
def test_missing_field_is_422_naming_it(server: Server, http: httpx.Client, field: str) -> None:
    body = {k: v for k, v in POLICY.items() if k != field}
    response = http.put("/v1/policy", json=body, headers=server.auth())
    assert response.status_code == 422
    assert response.json()["field"] == field
    assert field in response.json()["error"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"shadow": "true"}, "shadow"),
        ({"weights": {"a": "0.5", "b": 0.5}}, "weights.a"),
        ({"weights": [0.5, 0.5]}, "weights"),
        ({"expected_generation": "3"}, "expected_generation"),
        ({"expected_generaton": 3}, "expected_generaton"),
        ({"champion_slot": "c"}, "champion_slot"),
        ({"reason": ""}, "reason"),
    ],
)
def test_mistyped_or_bad_field_is_422_naming_it(
    server: Server, http: httpx.Client, change: dict[str, Any], field: str
) -> None:
    response = http.put("/v1/policy", json={**POLICY, **change}, headers=server.auth())
    assert response.status_code == 422
    assert response.json()["field"] == field


def test_body_that_is_not_an_object_is_422(server: Server, http: httpx.Client) -> None:
    response = http.put("/v1/policy", json=[1, 2], headers=server.auth())
    assert response.status_code == 422
    assert response.json()["field"] == "body"


@pytest.mark.parametrize("weights", [{"a": 0.5, "b": 0.4}, {"a": 0.7, "b": 0.7}, {"a": 1.0}, {"a": 1.2, "b": -0.2}])
def test_weights_that_are_not_a_distribution_over_a_and_b_are_422_naming_weights(
    server: Server, http: httpx.Client, weights: dict[str, float]
) -> None:
    before = _current_generation(http)
    response = http.put("/v1/policy", json={**POLICY, "weights": weights}, headers=server.auth())
    assert response.status_code == 422
    assert response.json()["field"] == "weights"
    assert _current_generation(http) == before


def test_oversized_body_is_413(server: Server, http: httpx.Client) -> None:
    big = {**POLICY, "reason": "x" * (100 * 1024)}
    assert http.put("/v1/policy", json=big, headers=server.auth()).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count what arrives
        yield json.dumps(big).encode()

    response = http.put("/v1/policy", content=chunks(), headers=server.auth())
    assert response.status_code == 413
    assert "bytes" in response.json()["error"]


def test_unknown_slot_is_404(server: Server, http: httpx.Client) -> None:
    assert http.get("/v1/slots/c").status_code == 404
    assert http.get("/v1/slots/c").json()["field"] == "slot"
    assert http.put("/v1/slots/c", json={"model_version": "1"}, headers=server.auth()).status_code == 404


@pytest.mark.parametrize(
    "query", ["after=x", "after=1&wait=-1", "after=1&wait=nan", "after=1&wait=inf", "after=1&wait=abc"]
)
def test_bad_long_poll_parameters_are_422_naming_them(http: httpx.Client, query: str) -> None:
    response = http.get(f"/v1/policy?{query}")
    assert response.status_code == 422
    assert response.json()["field"] in query


def test_garbage_requests_never_take_the_server_down(server: Server, http: httpx.Client) -> None:
    auth = server.auth()
    attempts = [
        ("PUT", "/v1/policy", b"null"),
        ("PUT", "/v1/policy", b'"string"'),
        ("PUT", "/v1/policy", b"1e999"),
        ("PUT", "/v1/policy", b'{"weights": {"a": 1e999, "b": 0}}'),
        ("PUT", "/v1/slots/a", b'{"model_version": 5}'),
        ("PUT", "/v1/slots/a", b"{}"),
        ("POST", "/v1/policy", b"{}"),
        ("DELETE", "/v1/slots/a", b""),
        ("GET", "/v1/policy?after=99999999999999999999999&wait=0.1", b""),
        ("GET", "/v1/slots/%00", b""),
        ("GET", "/v1/policy/history?limit=-1", b""),
    ]
    for method, path, body in attempts:
        response = http.request(method, path, content=body, headers=auth)
        assert 400 <= response.status_code < 500 or response.status_code == 200, (method, path, response.text)
        assert "error" in response.json() or response.status_code == 200
    assert http.get("/healthz").status_code == 200
    assert server.proc.poll() is None


# -- long-poll ------------------------------------------------------------------------------------------------------


def _long_poll_in_thread(server: Server, after: int, wait: float) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def poll() -> None:
        with ControlPlaneClient(server.url) as reader:
            result["policy"] = reader.wait_policy(after=after, wait=wait)
            result["returned_at"] = time.monotonic()

    thread = threading.Thread(target=poll)
    thread.start()
    return thread, result


def test_long_poll_returns_within_a_second_of_a_write_by_another_client(server: Server, http: httpx.Client) -> None:
    current = _current_generation(http)
    thread, result = _long_poll_in_thread(server, after=current, wait=20)
    time.sleep(0.5)  # let the poll park on the server
    assert "policy" not in result
    with server.client() as writer:
        written_at = time.monotonic()
        written = writer.set_policy(**{**POLICY, "reason": "wake up"})
    thread.join(timeout=5)
    latency = result["returned_at"] - written_at
    print(f"\nlong-poll latency after a write through the API: {latency * 1000:.1f} ms")
    assert result["policy"].generation == written.generation == current + 1
    assert result["policy"].reason == "wake up"
    assert latency < 1.0


def test_long_poll_sees_a_write_made_directly_in_the_database_by_another_process(
    server: Server, http: httpx.Client
) -> None:
    current = _current_generation(http)
    thread, result = _long_poll_in_thread(server, after=current, wait=20)
    time.sleep(0.5)
    store = ControlPlaneStore(server.db_url)  # this test process is "another process" sharing the SQLite file
    try:
        written_at = time.monotonic()
        written = store.set_policy(**{**POLICY, "reason": "direct write"})
    finally:
        store.close()
    thread.join(timeout=5)
    latency = result["returned_at"] - written_at
    print(f"\nlong-poll latency after a write by another process: {latency * 1000:.1f} ms")
    assert result["policy"].generation == written.generation
    assert latency < 1.0


def test_long_poll_returns_the_current_policy_when_the_wait_expires(server: Server, http: httpx.Client) -> None:
    current = http.get("/v1/policy").json()
    started = time.monotonic()
    response = http.get("/v1/policy", params={"after": current["generation"], "wait": 0.7})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json() == current
    assert 0.65 <= elapsed < 2.0


def test_long_poll_answers_at_once_when_the_generation_is_already_newer(server: Server, http: httpx.Client) -> None:
    with server.client() as writer:
        writer.set_policy(**POLICY)
    started = time.monotonic()
    response = http.get("/v1/policy", params={"after": 0, "wait": 20})
    assert response.status_code == 200 and response.json()["generation"] >= 1
    assert time.monotonic() - started < 0.5


def test_slot_long_poll_wakes_on_assignment(server: Server) -> None:
    with server.client() as client:
        current = client.get_assignment("b").generation
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(a=_wait_for_slot_b(server, current)))
        thread.start()
        time.sleep(0.5)
        written_at = time.monotonic()
        client.assign("b", "v42")
        thread.join(timeout=5)
    assert result["a"][0].model_version == "v42"
    assert result["a"][1] - written_at < 1.0


def _wait_for_slot_b(server: Server, after: int) -> tuple[Any, float]:
    with ControlPlaneClient(server.url) as reader:
        return reader.wait_assignment("b", after=after, wait=20), time.monotonic()


# -- compare-and-set ------------------------------------------------------------------------------------------------


def test_older_expected_generation_gets_409_and_never_overrides_a_newer_policy(server: Server) -> None:
    with server.client() as first, server.client() as second:
        seen = first.get_policy().generation
        newer = first.set_policy(
            weights={"a": 0.5, "b": 0.5}, shadow=False, champion_slot="a", reason="newer", expected_generation=seen
        )
        with pytest.raises(ControlPlaneConflict) as caught:
            second.set_policy(
                weights={"a": 1.0, "b": 0.0}, shadow=False, champion_slot="a", reason="stale", expected_generation=seen
            )
        assert caught.value.status == 409
        assert caught.value.current_generation == newer.generation
        assert first.get_policy() == newer


def test_concurrent_compare_and_set_over_http_lets_exactly_one_writer_win(server: Server) -> None:
    with server.client() as client:
        seen = client.get_policy().generation
    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def write(index: int) -> None:
        with server.client() as writer:
            barrier.wait()
            try:
                writer.set_policy(**{**POLICY, "reason": f"writer {index}"}, expected_generation=seen)
                statuses.append(200)
            except ControlPlaneError as error:
                statuses.append(error.status)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] + [409] * 5
    with server.client() as client:
        assert client.get_policy().generation == seen + 1


# -- clients, metrics, lifecycle ------------------------------------------------------------------------------------


def test_client_surfaces_server_error_text_and_field(server: Server) -> None:
    with server.client() as client, pytest.raises(ControlPlaneError) as caught:
        client.set_policy(weights={"a": 0.2, "b": 0.2}, shadow=False, champion_slot="a", reason="bad")
    assert (caught.value.status, caught.value.field) == (422, "weights")
    assert "sum to 1" in caught.value.message
    with ControlPlaneClient(server.url) as anonymous, pytest.raises(ControlPlaneError) as caught:
        anonymous.assign("a", "1")
    assert caught.value.status == 401


def test_client_reports_unreachable_server_as_unavailable() -> None:
    with ControlPlaneClient(f"http://127.0.0.1:{free_port()}", timeout=1) as client:
        with pytest.raises(ControlPlaneUnavailable):
            client.get_policy()
        with pytest.raises(ControlPlaneUnavailable):
            client.wait_policy(after=0, wait=0.1)


def test_async_client_reads_and_long_polls(server: Server) -> None:
    async def scenario() -> tuple[Any, Any, Any, float]:
        async with AsyncControlPlaneClient(server.url) as client:
            policy = await client.get_policy()
            waiting = asyncio.create_task(client.wait_policy(after=policy.generation, wait=20))
            await asyncio.sleep(0.3)
            written_at = time.monotonic()
            with server.client() as writer:  # sync write from a thread: the async client is read-side here
                await asyncio.to_thread(writer.set_policy, **{**POLICY, "reason": "async"})
            woken = await waiting
            latency = time.monotonic() - written_at
            slot = await client.wait_assignment("a", after=(await client.get_assignment("a")).generation, wait=0.2)
            return policy, woken, slot, latency

    before, woken, slot, latency = asyncio.run(scenario())
    assert woken.generation == before.generation + 1 and woken.reason == "async"
    assert slot.slot == "a"
    assert latency < 1.0

    async def unreachable() -> None:
        async with AsyncControlPlaneClient(f"http://127.0.0.1:{free_port()}", timeout=1) as client:
            await client.get_policy()

    with pytest.raises(ControlPlaneUnavailable):
        asyncio.run(unreachable())


def test_metrics_expose_the_policy_generation(server: Server, http: httpx.Client) -> None:
    with server.client() as client:
        generation = client.set_policy(**POLICY).generation
    lines = http.get("/metrics").text.splitlines()
    assert f"control_plane_policy_generation {float(generation)}" in lines
    assert any(line.startswith('control_plane_writes_total{outcome="ok",resource="policy"}') for line in lines)


def test_policy_history_lists_generations_newest_first(server: Server) -> None:
    with server.client() as client:
        client.set_policy(**{**POLICY, "reason": "history 1"})
        client.set_policy(**{**POLICY, "reason": "history 2"})
        history = client.policy_history(limit=2)
    assert [p.reason for p in history] == ["history 2", "history 1"]
    assert history[0].generation == history[1].generation + 1


def test_sigterm_answers_pending_long_polls_and_exits_promptly(tmp_path: Path) -> None:
    own = _start_server(tmp_path)
    try:
        thread, result = _long_poll_in_thread(own, after=0, wait=25)
        time.sleep(0.5)
        started = time.monotonic()
        os.killpg(own.proc.pid, signal.SIGTERM)
        own.proc.wait(timeout=10)
        thread.join(timeout=5)
        assert time.monotonic() - started < 5.0
        assert own.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean drain
        assert result["policy"].generation == 0  # answered with the current policy, not an error
        log = (own.home / "logs" / "control-plane.log").read_text()
        assert "Finished server process" in log
    finally:
        stop_pid(own.proc.pid, 15, own.proc)


# -- in-process: failure modes that are awkward to provoke in a separate process -----------------------------------


def test_long_poll_wait_is_capped_at_thirty_seconds() -> None:
    request = Request(
        {"type": "http", "method": "GET", "path": "/v1/policy", "query_string": b"after=3&wait=999", "headers": []}
    )
    assert _long_poll_params(request) == (3, MAX_WAIT_S) == (3, 30.0)


def test_store_failures_answer_json_errors_and_the_app_keeps_serving(tmp_path: Path) -> None:
    store = ControlPlaneStore(f"sqlite:///{tmp_path / 'cp.db'}")
    app = create_app(store, "secret")

    async def scenario() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
            with store._engine.begin() as conn:  # white-box: lose the tables to simulate a broken database
                conn.execute(text("DROP TABLE control_plane_policy"))
            responses = {
                "readyz": await client.get("/readyz"),
                "policy": await client.get("/v1/policy"),
                "metrics": await client.get("/metrics"),
            }
            store.get_assignments = lambda: 1 / 0  # type: ignore[method-assign]  # an unexpected bug
            responses["bug"] = await client.get("/v1/slots")
            responses["healthz"] = await client.get("/healthz")
            return responses

    try:
        responses = asyncio.run(scenario())
    finally:
        store.close()
    assert responses["readyz"].status_code == 503
    assert responses["policy"].status_code == 503 and "unavailable" in responses["policy"].json()["error"]
    assert responses["metrics"].status_code == 200
    assert responses["bug"].status_code == 500 and responses["bug"].json()["error"].startswith("internal error")
    assert responses["healthz"].status_code == 200

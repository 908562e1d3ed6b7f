"""Property-based fuzzing of the four HTTP APIs: the gateway, a model slot, the control plane and the controller.

Hypothesis sends arbitrary bodies (bytes, JSON of any shape, valid requests with one field broken), headers
(tokens right, wrong and garbled, budgets, forced variants, content types), methods and paths to each app. For
every answer: no 5xx, no error logged, and every 4xx body is a JSON object whose `error` says what is wrong.

The apps are the real ones, built the way their processes build them, run in this process (Starlette's
TestClient, lifespan included): a process per example would cost seconds each. The gateway's slots are a real
slot app with a real (untrained) model, served by uvicorn on a free port, so valid requests go the whole way.
The gateway follows a real control plane app served the same way. The controller's control plane is
unreachable, so a rollout start with the right token is refused (409);
its MLflow is a SQLite store under a temporary home.

`derandomize=True`: the same examples every run (CI reproducible); ~150 examples per API.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from control_plane.app import create_app as create_control_plane_app
from control_plane.store import ControlPlaneStore
from core.model import FraudScorer, NetworkConfig, Preprocessor, build_network
from core.processes import free_port
from core.schema import FEATURES
from core.settings import Settings
from core.synthetic import generate_transactions
from monitoring.rollout.process import build_controller
from monitoring.rollout.service import create_controller_app
from serving.gateway import create_gateway_app
from serving.slot import LoadedModel, create_slot_app

TOKEN, LABELS_TOKEN = "operator-token", "labels-token"
# FUZZ_EXAMPLES / FUZZ_RANDOM=1: a longer, random hunt by hand; CI runs the fixed 150.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    derandomize=os.environ.get("FUZZ_RANDOM") != "1",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

VALID = {"account_id": "acct-1", **{k: v for k, v in generate_transactions(1, seed=1).iloc[0].items() if k in FEATURES}}
VALID = json.loads(json.dumps(VALID, default=float))


# --- strategies ---------------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def broken_object(draw: st.DrawFn, valid: dict[str, Any]) -> bytes:
    """A valid body with one field replaced, dropped or added."""
    body = dict(valid)
    key = draw(st.sampled_from([*valid, "extra"]))
    action = draw(st.sampled_from(["replace", "drop"]))
    if action == "drop":
        body.pop(key, None)
    else:
        body[key] = draw(json_values)
    return json.dumps(body).encode()


def bodies(valid_objects: list[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([json.dumps(v).encode() for v in valid_objects]),
        *[broken_object(v) for v in valid_objects],
        st.sampled_from([b"", b"{", b"null", b"[]", b'{"a":NaN}', b'"\\ud800"', b"\xff\xfe", b"1e999", b"{}" * 2]),
    )


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


def auth_headers(token: str) -> st.SearchStrategy[str | None]:
    return st.one_of(
        st.none(),
        st.sampled_from([f"Bearer {token}", "Bearer wrong", "Bearer", "Basic abc", "bearer " + token, ""]),
        header_text,
    )


@st.composite
def requests(
    draw: st.DrawFn,
    paths: list[str],
    valid_objects: list[dict[str, Any]],
    token: str,
    extra_headers: dict[str, st.SearchStrategy[str | None]],
) -> tuple[str, str, bytes, dict[str, str]]:
    path = draw(
        st.one_of(
            st.sampled_from(paths),
            st.sampled_from(paths).flatmap(lambda p: header_text.map(lambda t: p + "?" + t)),
            header_text.map(lambda t: "/" + t.lstrip("/").replace("#", "").replace("?", "")),
        )
    )
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
    headers: dict[str, str] = {}
    for name, strategy in {"authorization": auth_headers(token), "content-type": header_text, **extra_headers}.items():
        value = draw(st.one_of(st.none(), strategy))
        if value is not None:
            headers[name] = value
    return method, path, draw(bodies(valid_objects)), headers


# --- the check ----------------------------------------------------------------------------------------------


class ErrorRecords(logging.Handler):
    """Every record at ERROR or above, and every record carrying an exception, from any logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@pytest.fixture(scope="module")
def error_records() -> Iterator[ErrorRecords]:
    handler = ErrorRecords()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


def check(
    client: TestClient, records: ErrorRecords, request: tuple[str, str, bytes, dict[str, str]], seen: set[int]
) -> None:
    method, path, body, headers = request
    response = client.request(method, path, content=body if method not in ("GET", "HEAD") else None, headers=headers)
    seen.add(response.status_code)
    where = f"{method} {path!r} headers={headers} body={body[:120]!r}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:300]}"
    assert not records.records, f"{where} logged: {[r.getMessage()[:200] for r in records.records]}"
    if 400 <= response.status_code < 500 and method != "HEAD":
        try:
            answer = response.json()
        except ValueError:
            pytest.fail(f"{where} -> {response.status_code} with a body that is not JSON: {response.text[:200]!r}")
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str) and answer["error"].strip(), (
            f"{where} -> {response.status_code} without an `error` saying what is wrong: {answer!r}"
        )


def assert_reached(seen: set[int]) -> None:
    """The examples got past validation as well as into it: a fuzz that only ever met 404s proves little."""
    assert {200, 404, 405} <= seen and seen & {400, 401, 403, 422}, sorted(seen)


# --- the apps -------------------------------------------------------------------------------------------------


def scorer(workdir: Path) -> FraudScorer:
    frame = generate_transactions(500, seed=0)
    preprocessor = Preprocessor.fit(frame)
    config = NetworkConfig()
    FraudScorer(preprocessor, build_network(preprocessor, config), config).save(workdir / "model")
    return FraudScorer.load(workdir / "model")


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-home")


@pytest.fixture(scope="module")
def slot_app(home: Path) -> Any:
    settings_ = Settings(home=home, control_plane_url=closed_port_url(), control_plane_token=TOKEN)
    app = create_slot_app(settings_, "a", loader=lambda version: LoadedModel(version, scorer(home)), watch=False)
    app.state.slot.model = LoadedModel("1", scorer(home))
    return app


class Served:
    """A Starlette app served by uvicorn on a free port in a thread of this process."""

    def __init__(self, app: Any) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.server.started:
            time.sleep(0.05)
        assert self.server.started, f"{app} did not start on {self.url}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def slot_url(slot_app: Any) -> Iterator[str]:
    """The slot app served over HTTP, for the gateway to call."""
    served = Served(slot_app)
    yield served.url
    served.stop()


@pytest.fixture(scope="module")
def control_plane_url(home: Path) -> Iterator[str]:
    """A control plane over HTTP for the gateway to follow (its default policy: the gateway becomes ready)."""
    store = ControlPlaneStore(f"sqlite:///{home / 'gateway-control-plane.db'}")
    served = Served(create_control_plane_app(store, TOKEN))
    yield served.url
    served.stop()
    store.close()


def test_the_gateway_never_answers_5xx_and_names_what_is_wrong_in_every_4xx(
    home: Path, slot_url: str, control_plane_url: str, error_records: ErrorRecords
) -> None:
    settings_ = Settings(
        home=home / "gateway",
        slot_a_url=slot_url,
        slot_b_url=slot_url,
        control_plane_url=control_plane_url,
        control_plane_token=TOKEN,
        labels_token=LABELS_TOKEN,
    )
    paths = ["/v1/score", "/v1/feedback", "/v1/policy", "/v1/status", "/readyz", "/healthz", "/metrics"]
    valid = [VALID, {**VALID, "transaction_id": "t-1"}, {"request_id": "t-1", "label": 1}]
    extra = {
        "x-mlops-budget-ms": st.one_of(st.sampled_from(["0", "-1", "nan", "1", "50", "1e9", "inf"]), header_text),
        "x-mlops-variant": st.one_of(st.sampled_from(["champion", "challenger", "CHAMPION ", "rule"]), header_text),
    }
    with TestClient(create_gateway_app(settings_), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)  # the first policy poll
        error_records.records.clear()
        seen: set[int] = set()

        @FUZZ
        @given(requests(paths, valid, TOKEN, extra))
        def fuzz(request: tuple[str, str, bytes, dict[str, str]]) -> None:
            if request[1].startswith("/v1/feedback"):  # labels take the labels token, not the operator's
                headers = dict(request[3])
                if headers.get("authorization") == f"Bearer {TOKEN}":
                    headers["authorization"] = f"Bearer {LABELS_TOKEN}"
                request = (*request[:3], headers)
            check(client, error_records, request, seen)

        fuzz()
        assert_reached(seen)


def test_a_model_slot_never_answers_5xx_and_names_what_is_wrong_in_every_4xx(
    slot_app: Any, error_records: ErrorRecords
) -> None:
    paths = ["/v1/predict", "/v1/predict/batch", "/v1/status", "/v1/fault", "/readyz", "/healthz", "/metrics"]
    valid = [VALID, {"instances": [VALID, VALID]}, {"extra_latency_ms": 1}, {}]
    with TestClient(slot_app, raise_server_exceptions=False) as client:
        error_records.records.clear()
        seen: set[int] = set()

        @FUZZ
        @given(requests(paths, valid, TOKEN, {}))
        def fuzz(request: tuple[str, str, bytes, dict[str, str]]) -> None:
            try:
                check(client, error_records, request, seen)
            finally:
                slot_app.state.slot.fault = None  # a fault switched on with the token is by design, not a defect

        fuzz()
        assert_reached(seen)


def test_the_control_plane_never_answers_5xx_and_names_what_is_wrong_in_every_4xx(
    home: Path, error_records: ErrorRecords
) -> None:
    store = ControlPlaneStore(f"sqlite:///{home / 'control-plane.db'}")
    paths = ["/v1/policy", "/v1/policy/history", "/v1/slots", "/v1/slots/a", "/v1/slots/b", "/v1/slots/c"]
    paths += ["/readyz", "/healthz", "/metrics", "/v1/policy?after=0&wait=0"]
    valid = [
        {"weights": {"a": 0.9, "b": 0.1}, "shadow": False, "champion_slot": "a", "reason": "fuzz"},
        {"model_version": "1"},
    ]
    try:
        with TestClient(create_control_plane_app(store, TOKEN), raise_server_exceptions=False) as client:
            error_records.records.clear()
            seen: set[int] = set()

            @FUZZ
            @given(requests(paths, valid, TOKEN, {}))
            def fuzz(request: tuple[str, str, bytes, dict[str, str]]) -> None:
                method, path, body, headers = request
                if "wait=" in path or path.startswith("/v1/policy?"):
                    path = path.split("?")[0] + "?wait=0"  # a long-poll would wait its 30 s out, by design
                check(client, error_records, (method, path, body, headers), seen)

            fuzz()
            assert_reached(seen)
    finally:
        store.close()


def test_the_controller_never_answers_5xx_and_names_what_is_wrong_in_every_4xx(
    home: Path, error_records: ErrorRecords
) -> None:
    settings_ = Settings(home=home / "controller", control_plane_url=closed_port_url(), control_plane_token=TOKEN)
    settings_.ensure_dirs()
    controller = build_controller(settings_)
    paths = ["/v1/rollouts", "/v1/rollouts/active", "/v1/rollouts/r-1", "/v1/analysis", "/metrics", "/healthz"]
    paths += [f"/v1/rollouts/r-1/{kind}" for kind in ("decisions", "analyses", "deliveries", "pause", "resume")]
    paths += ["/v1/rollouts/r-1/approve", "/v1/rollouts/r-1/abort", "/v1/rollouts/r-1/analyses?after=x&limit=2"]
    valid = [{"challenger_version": "2"}, {"reason": "fuzz"}]
    with TestClient(create_controller_app(controller, TOKEN, run_loop=False), raise_server_exceptions=False) as client:
        error_records.records.clear()
        seen: set[int] = set()

        @FUZZ
        @given(requests(paths, valid, TOKEN, {}))
        def fuzz(request: tuple[str, str, bytes, dict[str, str]]) -> None:
            check(client, error_records, request, seen)

        fuzz()
        assert_reached(seen)

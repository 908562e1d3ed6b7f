"""Containers' commands start: each Deployment of the project image, run from its rendered command, args and
environment as a local process, answers its rendered readiness and liveness paths.

How a pod is played here:
- the image's entrypoint (`mlops`, Dockerfile) or the rendered `command` (`mlflow`) runs from the project's
  venv (`python -m mlops.cli` / `python -m mlflow`, the same packages as the image, through the same lock);
- Kubernetes' `$(VAR)` expansion is applied to args and env, secret references get generated values and
  the `metadata.namespace` field reference gets `mlops`;
- service host names (`http://mlflow:5000`, `postgres:5432`, ...) are mapped to loopback ports, and each
  rendered port to a free one (this machine's ports are shared), after checking that the rendered `--port`
  is the container port the probes use;
- `/data` and `/tmp` (emptyDirs in the pod) are temp dirs; the prediction-log volume is one dir they share;
- Postgres is a real one (Debian's `postgresql`, started by the test, see test_pod_snippets.py). The S3
  store (SeaweedFS) cannot run here: the test's name says so, and nothing on these paths talks to it.
Every process is stopped by its PID at the end.
"""

from __future__ import annotations

import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from core.processes import ManagedProcess, free_port, start_process, stop_process
from tests.test_helm_chart import Helm, find, helm, render  # noqa: F401
from tests.test_pod_snippets import Postgres, postgres  # noqa: F401  (the module-scoped real PostgreSQL)

REPO = Path(__file__).resolve().parents[1]
PROJECT_IMAGE_DEPLOYMENTS = ["control-plane", "controller", "mlflow", "gateway", "slot-a", "slot-b", "drift-monitor"]
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion (variables defined earlier in the container's env)."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def container_env(container: dict[str, Any], secret_values: dict[str, str], namespace: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
        elif "secretKeyRef" in item.get("valueFrom", {}):
            env[item["name"]] = secret_values[item["valueFrom"]["secretKeyRef"]["key"]]
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[item["name"]] = namespace
        else:
            raise AssertionError(f"unhandled env entry {item}")
    return env


def local_command(container: dict[str, Any]) -> list[str]:
    """The container's process from the venv: the image's ENTRYPOINT is `mlops`."""
    command = container.get("command") or ["mlops"]
    programs = {"mlops": [sys.executable, "-m", "mlops.cli"], "mlflow": [sys.executable, "-m", "mlflow"]}
    assert command[0] in programs, f"unexpected program {command[0]}"
    return [*programs[command[0]], *command[1:], *container.get("args", [])]


def rendered_port(container: dict[str, Any]) -> int:
    (port,) = container["ports"]
    args = container.get("args", [])
    assert "--port" in args, "the process must be told its port"
    assert int(args[args.index("--port") + 1]) == port["containerPort"], "--port differs from the container port"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in container:
            assert container[probe]["httpGet"]["port"] in (port["name"], port["containerPort"]), probe
    return int(port["containerPort"])


def map_hosts(text: str, hosts: dict[str, tuple[str, int]]) -> str:
    """`http://mlflow:5000` / `@postgres:5432` -> the loopback port standing in for that Service."""
    for (host, port), (local_host, local_port) in [
        ((h.split(":")[0], int(h.split(":")[1])), v) for h, v in hosts.items()
    ]:
        text = re.sub(rf"(?<=[/@]){re.escape(host)}:{port}\b", f"{local_host}:{local_port}", text)
    return text


def plan(
    docs: list[dict[str, Any]], root: Path, postgres_port: int, secret_values: dict[str, str]
) -> dict[str, tuple[list[str], dict[str, str], int, dict[str, Any]]]:
    """For each project-image Deployment: (command, env, local port, container)."""
    containers = {
        name: find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        for name in PROJECT_IMAGE_DEPLOYMENTS
    }
    ports = {name: free_port() for name in containers}
    hosts = {f"{name}:{rendered_port(c)}": ("127.0.0.1", ports[name]) for name, c in containers.items()}
    hosts["postgres:5432"] = ("127.0.0.1", postgres_port)
    shared_log = root / "prediction-log"
    shared_log.mkdir()
    planned = {}
    for name, container in containers.items():
        data, tmp = root / name / "data", root / name / "tmp"
        tmp.mkdir(parents=True)
        data.mkdir()
        (data / "prediction-log").symlink_to(shared_log)
        env = container_env(container, secret_values, "mlops")
        env = {key: map_hosts(value, hosts) for key, value in env.items()}
        env |= {
            "MLOPS_HOME": str(data),
            "HOME": str(tmp),
            "TMPDIR": str(tmp),
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        }
        args = [map_hosts(expand(arg, env), hosts) for arg in local_command(container)]
        args[args.index("--port") + 1] = str(ports[name])
        planned[name] = (args, env, ports[name], container)
    return planned


@pytest.fixture(scope="module")
def databases(postgres: Postgres) -> Postgres:  # noqa: F811
    with psycopg.connect(host="127.0.0.1", port=postgres.port, user="mlops", dbname="postgres", autocommit=True) as db:
        for name in ("mlflow", "controlplane"):
            db.execute(f'CREATE DATABASE "{name}" OWNER mlops')
    return postgres


@pytest.fixture(scope="module")
def started(helm: Helm, databases: Postgres) -> Iterator[dict[str, tuple[ManagedProcess, int, dict[str, Any]]]]:  # noqa: F811
    docs = render(helm, "--set", "driftMonitor.enabled=true")
    secret_values = {
        "control-plane-token": secrets.token_urlsafe(24),
        "labels-token": secrets.token_urlsafe(24),
        "postgres-password": "unused-trust-auth",
        "minio-root-user": "mlops-test",
        "minio-root-password": secrets.token_hex(20),
        "grafana-admin-password": secrets.token_hex(8),
    }
    root = Path(tempfile.mkdtemp(prefix="mlops-test-pods-"))
    running: dict[str, tuple[ManagedProcess, int, dict[str, Any]]] = {}
    try:
        for name, (args, env, port, container) in plan(docs, root, databases.port, secret_values).items():
            running[name] = (start_process(name, args, env, root / "logs", cwd=REPO), port, container)
        yield running
    finally:
        for process, _, _ in running.values():
            stop_process(process, timeout=20)
        shutil.rmtree(root, ignore_errors=True)


def status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=3.0).status_code
    except httpx.HTTPError:
        return None


@pytest.mark.slow
@pytest.mark.parametrize("deployment", PROJECT_IMAGE_DEPLOYMENTS)
def test_the_rendered_command_starts_and_answers_its_probes_with_a_real_postgres_and_no_s3(
    started: dict[str, tuple[ManagedProcess, int, dict[str, Any]]], deployment: str
) -> None:
    process, port, container = started[deployment]
    paths = {container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
    deadline = time.monotonic() + 240  # seven services importing torch/BentoML/MLflow at once on two cores
    answers = {path: status(f"http://127.0.0.1:{port}{path}") for path in paths}
    while set(answers.values()) != {200} and time.monotonic() < deadline:
        assert process.alive(), f"{deployment} exited:\n{process.log_tail()}"
        time.sleep(1)
        answers = {path: status(f"http://127.0.0.1:{port}{path}") for path in paths}
    assert set(answers.values()) == {200}, f"{deployment}: {answers}\n{process.log_tail()}"


def test_a_port_arg_that_differs_from_the_container_port_is_caught() -> None:
    container = {"args": ["serve", "gateway", "--port", "8711"], "ports": [{"name": "http", "containerPort": 8710}]}
    with pytest.raises(AssertionError, match="--port differs"):
        rendered_port(container)


def test_secret_and_field_references_and_variable_expansion_are_played_like_kubernetes() -> None:
    container = {
        "env": [
            {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "s", "key": "postgres-password"}}},
            {"name": "URL", "value": "postgresql://u:$(POSTGRES_PASSWORD)@postgres:5432/db"},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ]
    }
    env = container_env(container, {"postgres-password": "pw"}, "team-a")
    assert env == {"POSTGRES_PASSWORD": "pw", "URL": "postgresql://u:pw@postgres:5432/db", "NS": "team-a"}
    assert map_hosts(env["URL"], {"postgres:5432": ("127.0.0.1", 4242)}) == "postgresql://u:pw@127.0.0.1:4242/db"
    assert map_hosts("http://slot-a:8721", {"slot-a:8721": ("127.0.0.1", 1)}) == "http://127.0.0.1:1"


def test_a_rendered_command_that_cannot_start_is_caught(tmp_path: Path) -> None:
    """The check's other side: a container whose args name no service exits, and the test sees it."""
    container = {"args": ["serve", "gatewy", "--host", "127.0.0.1", "--port", str(free_port())]}
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "MLOPS_HOME": str(tmp_path)}
    process = start_process("bad", local_command(container), env, tmp_path / "logs", cwd=REPO)
    try:
        assert process.process.wait(timeout=120) != 0
    finally:
        stop_process(process, timeout=5)

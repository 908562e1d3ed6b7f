"""The serving stack as local processes: control plane, two model slots, gateway.

Started the way a user starts them (`mlops serve ...`), each in its own process group with its log
under the stack's log folder, health-checked before the next one starts. Used by the tests and the
benchmarks; `mlops up` builds on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from mlops.processes import (
    ManagedProcess,
    free_port,
    mlops_command,
    port_is_free,
    start_process,
    stop_pid,
    stop_process,
    wait_until_ready,
)

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("control-plane", "slot-a", "slot-b", "gateway")


@dataclass
class LocalStack:
    home: Path
    token: str = "local-stack-token"
    extra_env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, ManagedProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SERVICES:
            self.ports.setdefault(name, free_port())

    @property
    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")}
        return {
            **base,
            "MLOPS_HOME": str(self.home),
            "MLOPS_CONTROL_PLANE_URL": self.url("control-plane"),
            "MLOPS_CONTROL_PLANE_TOKEN": self.token,
            "MLOPS_SLOT_A_PORT": str(self.ports["slot-a"]),
            "MLOPS_SLOT_B_PORT": str(self.ports["slot-b"]),
            "MLOPS_GATEWAY_PORT": str(self.ports["gateway"]),
            "RAY_USAGE_STATS_ENABLED": "0",
            **self.extra_env,
        }

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def command(self, name: str) -> list[str]:
        if name == "control-plane":
            return mlops_command("serve", "control-plane")
        if name.startswith("slot-"):
            return mlops_command("serve", "slot", "--slot", name[-1])
        return mlops_command("serve", "gateway")

    def start(self, *names: str, timeout: float = 120.0) -> None:
        for name in names or SERVICES:
            managed = start_process(name, self.command(name), self.env, self.home / "logs", cwd=REPO)
            self.processes[name] = managed
            health = "/readyz" if name == "control-plane" else "/healthz"
            wait_until_ready(managed, self.url(name) + health, timeout=timeout)

    def stop(self, *names: str) -> dict[str, int | None]:
        codes = {}
        for name in reversed(names or tuple(self.processes)):
            managed = self.processes.pop(name, None)
            if managed is not None:
                codes[name] = stop_process(managed)
        return codes

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(mlops_command(*args), env=self.env, cwd=REPO, capture_output=True, text=True, check=True)


# --- `mlops up` / `mlops status` / `mlops down`: the stack on the configured ports, detached ----------

STACK_ORDER = ("mlflow", "control-plane", "controller", "slot-a", "slot-b", "gateway")


@dataclass
class ServiceSpec:
    name: str
    port: int
    command: list[str]
    health_path: str


def stack_services(settings: Any) -> list[ServiceSpec]:
    """What `mlops up` runs, on the ports the settings name."""
    from urllib.parse import urlsplit

    cp_port = urlsplit(settings.control_plane_url).port or 8700
    controller_port = urlsplit(settings.controller_url).port or 8730
    mlflow = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.mlflow_port),
        "--backend-store-uri",
        _local_store(settings),
        "--default-artifact-root",
        settings.artifact_root.as_uri(),
        "--workers",
        "1",
    ]
    return [
        ServiceSpec("mlflow", settings.mlflow_port, mlflow, "/health"),
        ServiceSpec("control-plane", cp_port, mlops_command("serve", "control-plane"), "/readyz"),
        ServiceSpec("controller", controller_port, mlops_command("serve", "controller"), "/readyz"),
        ServiceSpec("slot-a", settings.slot_a_port, mlops_command("serve", "slot", "--slot", "a"), "/healthz"),
        ServiceSpec("slot-b", settings.slot_b_port, mlops_command("serve", "slot", "--slot", "b"), "/healthz"),
        ServiceSpec("gateway", settings.gateway_port, mlops_command("serve", "gateway"), "/healthz"),
    ]


def _local_store(settings: Any) -> str:
    """The MLflow server serves the same SQLite store the CLI uses without a server."""
    uri = settings.mlflow_tracking_uri or settings.tracking_uri
    if uri.startswith("http"):
        raise StackError(f"MLOPS_MLFLOW_TRACKING_URI={uri} points at a server already; `mlops up` runs its own")
    return uri


class StackError(RuntimeError):
    """`mlops up` cannot proceed; the message says why and what to do."""


def _state_path(settings: Any) -> Path:
    return settings.home / "stack" / "state.json"


def read_state(settings: Any) -> dict[str, dict[str, Any]]:
    path = _state_path(settings)
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(settings: Any, state: dict[str, dict[str, Any]]) -> None:
    path = _state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def stack_status(settings: Any) -> list[dict[str, Any]]:
    state = read_state(settings)
    rows = []
    for spec in stack_services(settings):
        entry = state.get(spec.name)
        pid = entry["pid"] if entry else None
        alive = bool(pid) and psutil.pid_exists(pid)
        url = f"http://127.0.0.1:{spec.port}"
        rows.append(
            {
                "name": spec.name,
                "pid": pid,
                "alive": alive,
                "url": url,
                "healthy": alive and _healthy(url + spec.health_path),
                "log": str(settings.logs_dir / f"{spec.name}.out"),
            }
        )
    return rows


def stack_up(settings: Any, on_progress: Any = print) -> list[dict[str, Any]]:
    """Start what is not running (a running, healthy service is left alone: `up` twice is a no-op)."""
    settings.ensure_dirs()
    state = read_state(settings)
    tracking = f"http://127.0.0.1:{settings.mlflow_port}"
    env = {
        **os.environ,
        "MLOPS_HOME": str(settings.home),
        "MLOPS_MLFLOW_TRACKING_URI": tracking,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for spec in stack_services(settings):
        entry = state.get(spec.name)
        url = f"http://127.0.0.1:{spec.port}"
        if entry and psutil.pid_exists(entry["pid"]) and _healthy(url + spec.health_path):
            on_progress(f"{spec.name}: already running (pid {entry['pid']})")
            continue
        if not port_is_free(spec.port):
            raise StackError(
                f"port {spec.port} for {spec.name} is already in use by another process; stop it or "
                f"choose another port (see `mlops settings`)"
            )
        managed = start_process(spec.name, spec.command, env, settings.logs_dir, cwd=REPO)
        state[spec.name] = {"pid": managed.pid, "port": spec.port}
        _write_state(settings, state)  # written per service, so `down` can stop a half-started stack
        wait_until_ready(managed, url + spec.health_path, timeout=180)
        on_progress(f"{spec.name}: started (pid {managed.pid}) at {url}")
    return stack_status(settings)


def stack_down(settings: Any, on_progress: Any = print) -> list[str]:
    """Stop exactly the processes `up` started (recorded in MLOPS_HOME/stack/state.json)."""
    state = read_state(settings)
    stopped = []
    for name in reversed(STACK_ORDER):
        entry = state.pop(name, None)
        if entry and psutil.pid_exists(entry["pid"]):
            stop_pid(entry["pid"])
            stopped.append(name)
            on_progress(f"{name}: stopped (pid {entry['pid']})")
    _write_state(settings, state)
    return stopped

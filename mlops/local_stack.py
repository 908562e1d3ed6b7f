"""The serving stack as local processes: control plane, two model slots, gateway.

Started the way a user starts them (`mlops serve ...`), each in its own process group with its log
under the stack's log folder, health-checked before the next one starts. Used by the tests and the
benchmarks; `mlops up` builds on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from core.processes import (
    ManagedProcess,
    ProcessFailed,
    free_port,
    group_members,
    mlops_command,
    pid_running,
    port_is_free,
    start_process,
    stop_pid,
    stop_process,
    wait_until_ready,
)

log = logging.getLogger("mlops.supervisor")
REPO = Path(__file__).resolve().parents[1]
SERVICES = ("control-plane", "slot-a", "slot-b", "gateway")


@dataclass
class LocalStack:
    home: Path
    token: str = "local-stack-token"
    labels_token: str = "local-stack-labels-token"
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
            "MLOPS_LABELS_TOKEN": self.labels_token,
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

STACK_ORDER = ("mlflow", "control-plane", "controller", "slot-a", "slot-b", "gateway", "drift-monitor", "supervisor")
# MLflow and the control plane first (the others talk to them as they start), then everything else at once.
START_WAVES = (("mlflow", "control-plane"), ("controller", "slot-a", "slot-b", "gateway", "drift-monitor"))
RESTART_WINDOW_S = 120.0  # a service restarted more than MAX_RESTARTS times within this window is given up on
MAX_RESTARTS = 5


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
    drift_port = urlsplit(settings.drift_monitor_url).port or 8740
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
        ServiceSpec("drift-monitor", drift_port, mlops_command("serve", "drift-monitor"), "/healthz"),
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


@contextlib.contextmanager
def _state_lock(settings: Any) -> Iterator[None]:
    """`up`, `down` and the supervisor all update state.json: read-modify-write under one file lock, so that
    none of them writes back a stale copy (a restarted service's new pid must never be lost)."""
    path = _state_path(settings).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _update_state(settings: Any, name: str, entry: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    with _state_lock(settings):
        state = read_state(settings)
        if entry is None:
            state.pop(name, None)
        else:
            state[name] = entry
        _write_state(settings, state)
        return state


def _write_state(settings: Any, state: dict[str, dict[str, Any]]) -> None:
    path = _state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state, indent=2))
    os.replace(temporary, path)  # readers (status, the supervisor) never see half a file


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
        alive = pid_running(pid)
        url = f"http://127.0.0.1:{spec.port}"
        rows.append(
            {
                "name": spec.name,
                "pid": pid,
                "alive": alive,
                "url": url,
                "healthy": alive and _healthy(url + spec.health_path),
                "restarts": entry.get("restarts", 0) if entry else 0,
                "log": str(settings.logs_dir / f"{spec.name}.out"),
            }
        )
    supervisor = state.get("supervisor")
    pid = supervisor["pid"] if supervisor else None
    rows.append(
        {
            "name": "supervisor",
            "pid": pid,
            "alive": pid_running(pid),
            "url": "-",
            "healthy": pid_running(pid),
            "restarts": 0,
            "log": str(settings.logs_dir / "supervisor.out"),
        }
    )
    return rows


def _stack_env(settings: Any) -> dict[str, str]:
    return {
        **os.environ,
        "MLOPS_HOME": str(settings.home),
        "MLOPS_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{settings.mlflow_port}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def stack_up(settings: Any, on_progress: Any = print) -> list[dict[str, Any]]:
    """Start what is not running (a running, healthy service is left alone: `up` twice is a no-op), then the
    supervisor that restarts any service that dies."""
    settings.ensure_dirs()
    state = read_state(settings)
    env = _stack_env(settings)
    specs = {spec.name: spec for spec in stack_services(settings)}
    for wave in START_WAVES:  # each wave starts at once, then waits: the stack is up in two start-up times
        starting = []
        for spec in (specs[name] for name in wave):
            entry = state.get(spec.name)
            url = f"http://127.0.0.1:{spec.port}"
            if entry and pid_running(entry["pid"]):
                try:  # running: wait for it to be healthy (it may be starting, or restarted by the supervisor)
                    wait_until_ready(None, url + spec.health_path, timeout=60)
                except ProcessFailed:
                    raise StackError(
                        f"{spec.name} (pid {entry['pid']}) runs but is not healthy at {url}; see its log "
                        f"{settings.logs_dir / (spec.name + '.out')}, or `mlops down` and `mlops up` again"
                    ) from None
                on_progress(f"{spec.name}: already running (pid {entry['pid']})")
                continue
            if not port_is_free(spec.port):
                raise StackError(
                    f"port {spec.port} for {spec.name} is already in use by another process; stop it or "
                    f"choose another port (see `mlops settings`)"
                )
            managed = start_process(spec.name, spec.command, env, settings.logs_dir, cwd=REPO)
            # Recorded at once, so that `down` can stop a half-started stack.
            _update_state(settings, spec.name, {"pid": managed.pid, "port": spec.port, "mark": managed.mark})
            starting.append((spec, managed, url))
        for spec, managed, url in starting:
            wait_until_ready(managed, url + spec.health_path, timeout=180)
            on_progress(f"{spec.name}: started (pid {managed.pid}) at {url}")
    supervisor = state.get("supervisor")
    if supervisor and pid_running(supervisor["pid"]):
        on_progress(f"supervisor: already running (pid {supervisor['pid']})")
    else:
        # The supervisor gets the caller's settings (not the services' env, which points MLflow at the server).
        own_env = {**os.environ, "MLOPS_HOME": str(settings.home)}
        managed = start_process(
            "supervisor", mlops_command("serve", "supervisor"), own_env, settings.logs_dir, cwd=REPO
        )
        _update_state(settings, "supervisor", {"pid": managed.pid, "mark": managed.mark})
        on_progress(f"supervisor: started (pid {managed.pid}); it restarts services that die")
    return stack_status(settings)


def supervise(settings: Any, stop: Callable[[], bool], poll_s: float = 1.0) -> None:
    """Restart stack services that die (a crash, an OOM kill), like a pod's restart policy: after a back-off
    that doubles from 0.5 s up to 30 s, and not more than MAX_RESTARTS times in RESTART_WINDOW_S (then the
    service is marked `gave_up` with its last log lines, and `mlops status` shows it down).

    `mlops down` stops the supervisor first, so a stopped stack is never restarted behind its back."""
    specs = {spec.name: spec for spec in stack_services(settings)}
    env = _stack_env(settings)
    dead_since: dict[str, float] = {}
    while not stop():
        state = read_state(settings)
        for name, spec in specs.items():
            entry = state.get(name)
            if entry is None or entry.get("gave_up") or pid_running(entry.get("pid")):
                dead_since.pop(name, None)
                continue
            now = time.time()
            recent = [t for t in entry.get("restart_times", []) if now - t < RESTART_WINDOW_S]
            backoff = min(30.0, 2.0 ** len(recent) / 2)
            if name not in dead_since:  # at once, not after the back-off: a dead leader's workers keep its port
                end_orphans(name, entry, spec.port)
            if now - dead_since.setdefault(name, now) < backoff:
                continue
            if len(recent) >= MAX_RESTARTS:
                entry["gave_up"] = f"restarted {len(recent)} times in {RESTART_WINDOW_S:.0f}s"
                log.error("%s: giving up: %s", name, entry["gave_up"])
            else:
                managed = start_process(name, spec.command, env, settings.logs_dir, cwd=REPO)
                entry.update(
                    pid=managed.pid,
                    mark=managed.mark,
                    restarts=entry.get("restarts", 0) + 1,
                    restart_times=[*recent, now],
                )
                log.warning("%s died; restarted as pid %s (restart %s)", name, managed.pid, entry["restarts"])
            dead_since.pop(name, None)
            with _state_lock(settings):
                latest = read_state(settings)  # `down` may have run meanwhile: never resurrect a stopped stack
                if "supervisor" in latest:
                    latest[name] = entry
                    _write_state(settings, latest)
            if "supervisor" not in latest:
                if not entry.get("gave_up"):
                    stop_pid(entry["pid"], mark=entry.get("mark", ""))
                return
        time.sleep(poll_s)


def end_orphans(name: str, entry: dict[str, Any], port: int | None, timeout: float = 10.0) -> list[int]:
    """End what is left of a service whose leader died (its group, its marked workers) and wait, up to
    `timeout`, for its port to be free, so that the restarted service owns it. Returns the pids ended."""
    orphans = [p.pid for p in group_members(entry["pid"], entry.get("mark", ""))]
    if orphans:
        log.warning("%s: leader %s gone; ending its orphans %s", name, entry["pid"], orphans)
        stop_pid(entry["pid"], timeout=5.0, mark=entry.get("mark", ""))
    deadline = time.monotonic() + timeout
    while port and not port_is_free(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    return orphans


def stack_down(settings: Any, on_progress: Any = print) -> list[str]:
    """Stop exactly the processes `up` started (recorded in MLOPS_HOME/stack/state.json): each service's whole
    group, and the orphans of a leader that died already."""
    stopped = []
    for name in reversed(STACK_ORDER):  # the supervisor first: nothing is restarted behind our back
        entry = read_state(settings).get(name)
        _update_state(settings, name, None)
        if not entry:
            continue
        leader_alive = pid_running(entry["pid"])
        orphans = [p.pid for p in group_members(entry["pid"], entry.get("mark", "")) if p.pid != entry["pid"]]
        if leader_alive or orphans:
            stop_pid(entry["pid"], mark=entry.get("mark", ""))
            stopped.append(name)
            what = f"pid {entry['pid']}" if leader_alive else f"leader {entry['pid']} gone; {len(orphans)} orphan(s)"
            on_progress(f"{name}: stopped ({what})")
    return stopped

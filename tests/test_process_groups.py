"""A service's leader dies; its workers must not outlive it (issue 12: a SIGKILLed MLflow kept serving).

Real processes throughout: a spawner that forks workers the way `mlflow server` and BentoML do (one in the
leader's group, one that moves to a session of its own), and a real `mlflow server` started as `mlops up`
starts it. Each test SIGKILLs the leader alone, as the OOM killer does, and then shows that the stack's way of
ending a service leaves nothing of it and frees its port.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from core.processes import (
    ManagedProcess,
    free_port,
    group_members,
    kill_leader,
    kill_tree,
    port_is_free,
    start_process,
    stop_process,
    wait_until_ready,
)
from core.settings import Settings
from mlops.local_stack import _update_state, end_orphans, read_state, stack_down, stack_services, supervise

SPAWNER = """
import os, socket, subprocess, sys, time
port = int(sys.argv[1])
listener = '''
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
while True:
    conn, _ = s.accept(); conn.sendall(b"still here"); conn.close()
'''
# A worker in the leader's group that owns the port, like uvicorn under `mlflow server`.
subprocess.Popen([sys.executable, "-c", listener, str(port)])
# A worker that leaves the group and the session, like BentoML's workers and MLflow's job executors.
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
time.sleep(600)
"""


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def spawner(tmp_path: Path) -> Iterator[tuple[ManagedProcess, int]]:
    port = free_port()
    managed = start_process("spawner", [sys.executable, "-c", SPAWNER, str(port)], dict(os.environ), tmp_path)
    try:
        _wait_for(lambda: _connects(port) and len(group_members(managed.pid, managed.mark)) == 3, 30, "workers")
        yield managed, port
    finally:
        kill_tree(managed.pid, managed.mark)  # whatever a failed test left, by pid and mark only
        managed.process.wait()


def test_a_sigkilled_leaders_workers_keep_its_port_until_the_group_is_ended(
    spawner: tuple[ManagedProcess, int],
) -> None:
    managed, port = spawner
    workers = [p for p in group_members(managed.pid, managed.mark) if p.pid != managed.pid]
    outside = [p for p in workers if os.getsid(p.pid) != managed.pid]
    assert len(workers) == 2 and len(outside) == 1, "one worker left the session, one stayed"

    kill_leader(managed.pid)
    managed.process.wait()
    time.sleep(0.3)
    # The defect the stack must handle: the leader is dead, yet its workers run and answer on its port.
    assert all(p.is_running() for p in workers)
    assert _connects(port)
    # The session's members are found without the mark; the worker that left its session only with it.
    assert {p.pid for p in group_members(managed.pid)} == {p.pid for p in workers} - {outside[0].pid}
    assert {p.pid for p in group_members(managed.pid, managed.mark)} == {p.pid for p in workers}

    ended = end_orphans("spawner", {"pid": managed.pid, "mark": managed.mark}, port)

    assert sorted(ended) == sorted(p.pid for p in workers)
    assert not any(psutil.pid_exists(p.pid) and p.status() != psutil.STATUS_ZOMBIE for p in workers)
    assert group_members(managed.pid, managed.mark) == []
    assert not _connects(port), "connect must fail: nothing of the group listens"
    assert port_is_free(port), "bind must succeed: a restarted service can own the port"


def test_mlops_down_ends_the_orphans_of_a_leader_that_died_already(
    spawner: tuple[ManagedProcess, int], tmp_path: Path
) -> None:
    managed, port = spawner
    settings = Settings(home=tmp_path / "home")
    _update_state(settings, "mlflow", {"pid": managed.pid, "port": port, "mark": managed.mark})
    workers = [p for p in group_members(managed.pid, managed.mark) if p.pid != managed.pid]
    kill_leader(managed.pid)
    managed.process.wait()

    progress: list[str] = []
    assert stack_down(settings, on_progress=progress.append) == ["mlflow"]

    assert "orphan" in progress[0], progress
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
    assert port_is_free(port) and not _connects(port)
    assert read_state(settings) == {}


def test_stop_process_keeps_the_leaders_exit_code_and_ends_its_workers(
    spawner: tuple[ManagedProcess, int],
) -> None:
    managed, port = spawner
    workers = [p for p in group_members(managed.pid, managed.mark) if p.pid != managed.pid]
    code = stop_process(managed, timeout=10)
    assert code == -15, "the leader ended by SIGTERM, reaped by Popen"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
    assert port_is_free(port)


def test_a_reused_pid_without_the_mark_is_not_taken_for_the_service(tmp_path: Path) -> None:
    stranger = start_process(
        "stranger", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), tmp_path
    )
    try:
        assert group_members(stranger.pid, "mlflow:someone-else") == []
        assert [p.pid for p in group_members(stranger.pid, stranger.mark)] == [stranger.pid]
    finally:
        stop_process(stranger, timeout=5)


@pytest.mark.slow
def test_supervisor_ends_a_killed_mlflow_servers_workers_and_its_restart_owns_the_port(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", mlflow_port=free_port())
    settings.ensure_dirs()
    spec = next(s for s in stack_services(settings) if s.name == "mlflow")
    env = {**os.environ, "MLOPS_HOME": str(settings.home)}
    url = f"http://127.0.0.1:{spec.port}"
    mlflow = start_process("mlflow", spec.command, env, settings.logs_dir)  # as stack_up starts it
    # A stand-in supervisor entry (`supervise` writes back only while one is recorded), stopped by `down`.
    stand_in = start_process("supervisor", [sys.executable, "-c", "import time; time.sleep(600)"], env, tmp_path)
    stop_supervising = threading.Event()
    supervisor = threading.Thread(target=supervise, args=(settings, stop_supervising.is_set, 0.2), daemon=True)
    restarted_pid: int | None = None
    try:
        wait_until_ready(mlflow, url + spec.health_path, timeout=180)
        # The job runner and its huey consumers come up after the health endpoint.
        _wait_for(lambda: len(group_members(mlflow.pid, mlflow.mark)) >= 4, 60, "MLflow's workers")
        workers = [p for p in group_members(mlflow.pid, mlflow.mark) if p.pid != mlflow.pid]
        names = " ".join(" ".join(p.cmdline()) for p in workers)
        assert "uvicorn" in names and "huey" in names, names
        _update_state(settings, "mlflow", {"pid": mlflow.pid, "port": spec.port, "mark": mlflow.mark})
        _update_state(settings, "supervisor", {"pid": stand_in.pid, "mark": stand_in.mark})

        kill_leader(mlflow.pid)
        mlflow.process.wait()
        assert httpx.get(url + "/health", timeout=5).status_code == 200, "the orphans answer for a dead MLflow"

        supervisor.start()
        _wait_for(lambda: read_state(settings)["mlflow"]["pid"] != mlflow.pid, 30, "the supervisor's restart")
        restarted_pid = read_state(settings)["mlflow"]["pid"]
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
        wait_until_ready(None, url + spec.health_path, timeout=180)
        restarted = psutil.Process(restarted_pid)
        # The new server, not an orphan, owns the port.
        listeners = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == spec.port}
        members = {p.pid for p in group_members(restarted_pid, read_state(settings)["mlflow"]["mark"])}
        assert listeners and listeners <= members, (listeners, members, restarted.cmdline())
    finally:
        stop_supervising.set()
        if supervisor.is_alive():
            supervisor.join(timeout=10)
        stack_down(settings, on_progress=lambda _line: None)
        kill_tree(mlflow.pid, mlflow.mark)
    assert restarted_pid is not None
    assert group_members(restarted_pid) == []
    assert not stand_in.alive() or stand_in.process.wait(timeout=5) is not None
    assert port_is_free(spec.port)


def test_a_hung_service_has_every_member_stopped_until_resumed_and_a_restart_ends_the_whole_group(
    spawner: tuple[ManagedProcess, int], tmp_path: Path
) -> None:
    """The scenario runner's `chaos.action` on the local stack: hang (SIGSTOP for `for_s`, then SIGCONT) reaches
    the workers in sessions of their own too; restart (SIGTERM, the supervisor starts a new one) leaves nothing of
    the old group, so the new process can own the port."""
    from mlops.scenarios.runner import LocalTarget

    managed, port = spawner
    settings = Settings(home=tmp_path / "home")
    _update_state(settings, "gateway", {"pid": managed.pid, "port": port, "mark": managed.mark})
    target = LocalTarget(settings)
    members = group_members(managed.pid, managed.mark)
    assert len(members) == 3

    target.hang("gateway")
    _wait_for(lambda: all(p.status() == psutil.STATUS_STOPPED for p in members), 10, "every member stopped")
    target.resume("gateway")
    _wait_for(lambda: all(p.status() != psutil.STATUS_STOPPED for p in members), 10, "every member running")
    assert _connects(port)

    target.restart("gateway")
    managed.process.wait()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in members)
    assert port_is_free(port) and not _connects(port)
    with pytest.raises(RuntimeError, match="not part of the running local stack"):
        target.restart("drift-monitor")

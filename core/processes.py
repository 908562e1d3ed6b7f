"""Starting, health-checking and stopping the local stack's processes.

Each process runs in its own session (process group), so stopping it by PID also stops the workers it
forked (BentoML's supervisor forks a worker; uvicorn may too) and nothing else. Output goes to a log
file under MLOPS_HOME/logs.

A leader that dies does not take its group with it: `mlflow server`'s uvicorn worker, job runner and huey
consumers outlive a SIGKILLed leader and keep answering on its port. So ending a service always ends its
group, found by process group and session id (which survive re-parenting to init) and, for workers that
moved to sessions of their own, by a mark in their environment (`MLOPS_PROCESS_MARK`, inherited by every
descendant), never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

PROCESS_MARK = "MLOPS_PROCESS_MARK"  # env var set on every process start_process starts, unique per start


class ProcessFailed(RuntimeError):
    """A stack process exited or never became healthy; the message quotes its log."""


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    mark: str = field(default="")

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mlops_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlops.cli", *args]


def start_process(
    name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path | None = None
) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.out"
    mark = f"{name}:{uuid.uuid4().hex}"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, PROCESS_MARK: mark},
            cwd=cwd,
            start_new_session=True,
        )
    return ManagedProcess(name, process, log_path, mark)


def wait_until_ready(managed: ManagedProcess | None, url: str, timeout: float = 90.0) -> None:
    """Poll `url` until it answers 200; fail early, with the log, if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if managed is not None and not managed.alive():
            raise ProcessFailed(f"{managed.name} exited with {managed.process.returncode}:\n{managed.log_tail()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    tail = f":\n{managed.log_tail()}" if managed is not None else ""
    raise ProcessFailed(f"{managed.name if managed else url} not ready at {url} after {timeout:.0f}s{tail}")


def stop_process(managed: ManagedProcess, timeout: float = 20.0) -> int | None:
    """SIGTERM the process group, wait, then SIGKILL what is left. Returns the exit code."""
    return stop_pid(managed.pid, timeout, managed.process, mark=managed.mark)


def stop_pid(
    pid: int, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None, mark: str = ""
) -> int | None:
    """SIGTERM the leader's group and every other member (workers in other sessions, orphans whose leader is
    gone already), wait up to `timeout`, then SIGKILL what is left. Returns the leader's exit code when it is
    our child."""
    members = group_members(pid, mark)
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    deadline = time.monotonic() + timeout
    if process is not None:  # our child: Popen reaps it, so that its exit code is kept
        members = [m for m in members if m.pid != pid]
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    _, alive = psutil.wait_procs(members, timeout=max(0.0, deadline - time.monotonic()))
    if alive or group_members(pid, mark):  # stragglers, or workers forked while we waited
        kill_tree(pid, mark)
    rest = [m for m in group_members(pid, mark) if process is None or m.pid != pid]
    psutil.wait_procs(rest, timeout=5.0)
    return process.wait() if process is not None else None


def group_members(pid: int, mark: str = "") -> list[psutil.Process]:
    """Every live process of the service whose leader is (or was) `pid`: its descendants, the members of its
    process group and session (pgid and sid equal the leader's pid, since start_process starts a new session,
    and they stay so after the leader dies and its children move to init), and any process carrying `mark`
    in its environment. Zombies and this process are left out."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
        leader = psutil.Process(pid)
        if mark and leader.environ().get(PROCESS_MARK) != mark:
            # A live leader without the mark is a stranger that reused the pid after the whole group was gone
            # (the kernel does not hand out a pid that is still some process's group or session id).
            return []
        found.update({p.pid: p for p in [leader, *leader.children(recursive=True)]})
    me = os.getpid()
    for process in psutil.process_iter():
        if process.pid == me or process.pid in found:
            continue
        try:
            in_group = os.getpgid(process.pid) == pid or os.getsid(process.pid) == pid
            if in_group or (mark and process.environ().get(PROCESS_MARK) == mark):
                found[process.pid] = process
        except (OSError, psutil.Error):  # gone meanwhile, or another user's process: not ours
            continue
    return [p for p in found.values() if _live(p)]


def _live(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_hard(managed: ManagedProcess) -> None:
    """SIGKILL the process and every member of its group: what a crash or an OOM kill of the pod looks like.

    BentoML's supervisor starts its workers in sessions of their own, so killing the group alone would leave
    a worker serving on the inherited socket; the mark finds them.
    """
    kill_tree(managed.pid, managed.mark)
    managed.process.wait()


def kill_tree(pid: int, mark: str = "") -> None:
    """SIGKILL everything `group_members` finds for `pid` (and `mark`)."""
    for process in group_members(pid, mark):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def kill_leader(pid: int) -> None:
    """SIGKILL the leader alone, leaving its group: what the OOM killer does to the biggest process."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def pid_running(pid: int | None) -> bool:
    """Whether `pid` is a live process (a zombie, dead but not yet reaped, is not; it is reaped here when
    it is our child)."""
    if not pid:
        return False
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            return True
    except psutil.NoSuchProcess:
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return False

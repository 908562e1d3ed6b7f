"""Starting, health-checking and stopping the local stack's processes.

Each process runs in its own session (process group), so stopping it by PID also stops the workers it
forked (BentoML's supervisor forks a worker; uvicorn may too) and nothing else. Output goes to a log
file under MLOPS_HOME/logs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil


class ProcessFailed(RuntimeError):
    """A stack process exited or never became healthy; the message quotes its log."""


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

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
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    return ManagedProcess(name, process, log_path)


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
    return stop_pid(managed.pid, timeout, managed.process)


def stop_pid(pid: int, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None) -> int | None:
    """SIGTERM the group and wait; then make sure no descendant outlives it (workers in other sessions)."""
    descendants = _descendants(pid)
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return process.poll() if process else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (process.poll() is not None) if process is not None else not pid_running(pid):
            break
        time.sleep(0.1)
    else:
        kill_tree(pid)
    _, alive = psutil.wait_procs(descendants, timeout=max(0.0, min(5.0, deadline - time.monotonic())))
    for leftover in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    return process.wait() if process is not None else None


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_hard(managed: ManagedProcess) -> None:
    """SIGKILL the process and every descendant: what a crash or an OOM kill of the pod looks like.

    Descendants are collected first: BentoML's supervisor starts its workers in sessions of their own,
    so killing the group alone would leave a worker serving on the inherited socket.
    """
    kill_tree(managed.pid)
    managed.process.wait()


def kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


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

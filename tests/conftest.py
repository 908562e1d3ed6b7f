"""Shared fixtures: an isolated MLOPS_HOME per test, a real MLflow server, and a CLI runner.

Every process a test starts is stopped by the fixture that started it (by PID), and all state lives
under pytest's temporary directories.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.processes import free_port, start_process, stop_process, wait_until_ready

REPO = Path(__file__).resolve().parents[1]


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict[str, Any]:
        lines = [line for line in self.stdout.strip().splitlines() if line.strip()]
        assert lines, f"no stdout; stderr was:\n{self.stderr[-3000:]}"
        return json.loads(lines[-1])


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> CliResult:
    """Run `mlops ARGS` as a user would: a separate process with its own environment."""
    proc = subprocess.run(
        [sys.executable, "-m", "mlops.cli", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "mlops-home"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """A SQLite database for a store, in a folder that does not exist yet (the store makes it)."""
    return f"sqlite:///{tmp_path / 'state' / 'control-plane.db'}"


@pytest.fixture
def cli_env(home: Path) -> dict[str, str]:
    """Environment for CLI subprocesses: isolated home, SQLite registry (no server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")}
    env.update({"MLOPS_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    return env


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (SQLite backend, proxied artifact store) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    args += ["--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    server = start_process("mlflow-server", args, dict(os.environ), root, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(server, f"{url}/health", timeout=120)
        yield url
    finally:
        stop_process(server)

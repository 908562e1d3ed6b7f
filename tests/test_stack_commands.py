"""`mlops up`, `mlops status`, `mlops down` on real processes, on free ports in a temporary home."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import psutil
import pytest

from core.processes import free_port, kill_tree
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def stack_env(cli_env: dict[str, str]) -> dict[str, str]:
    ports = {name: free_port() for name in ("cp", "ctl", "a", "b", "gw", "mlflow", "drift")}
    return {
        **cli_env,
        "MLOPS_CONTROL_PLANE_URL": f"http://127.0.0.1:{ports['cp']}",
        "MLOPS_CONTROLLER_URL": f"http://127.0.0.1:{ports['ctl']}",
        "MLOPS_SLOT_A_PORT": str(ports["a"]),
        "MLOPS_SLOT_B_PORT": str(ports["b"]),
        "MLOPS_GATEWAY_PORT": str(ports["gw"]),
        "MLOPS_MLFLOW_PORT": str(ports["mlflow"]),
        "MLOPS_DRIFT_MONITOR_URL": f"http://127.0.0.1:{ports['drift']}",
    }


def wait_for_restart(env: dict[str, str], name: str, old_pid: int, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = next(s for s in run_cli(["status", "--json"], env).json["services"] if s["name"] == name)
        if row["pid"] != old_pid and row["healthy"]:
            return row
        time.sleep(1.0)
    raise AssertionError(f"{name} was not restarted within {timeout}s")


def test_up_twice_is_a_no_op_a_dead_service_is_restarted_and_down_stops_exactly_what_up_started(
    cli_env: dict[str, str], home: Path
) -> None:
    env = stack_env(cli_env)
    pids: dict[str, int] = {}
    try:
        first = run_cli(["up"], env, timeout=600)
        assert first.code == 0, first.stderr[-3000:]
        status = run_cli(["status", "--json"], env).json
        assert status["healthy"], status
        pids = {s["name"]: s["pid"] for s in status["services"]}
        assert set(pids) == {
            "mlflow",
            "control-plane",
            "controller",
            "slot-a",
            "slot-b",
            "gateway",
            "drift-monitor",
            "supervisor",
        }
        second = run_cli(["up"], env, timeout=120)
        assert second.code == 0 and second.stderr.count("already running") == 8
        assert {s["name"]: s["pid"] for s in run_cli(["status", "--json"], env).json["services"]} == pids
        assert (home / "logs" / "gateway.out").exists()

        kill_tree(pids["slot-b"])  # what an OOM kill looks like: the supervisor must bring it back
        restarted = wait_for_restart(env, "slot-b", pids["slot-b"])
        assert restarted["restarts"] == 1
        pids["slot-b (restarted)"] = restarted["pid"]
    finally:
        down = run_cli(["down"], env, timeout=180)
    assert down.code == 0, down.stderr
    assert not any(psutil.pid_exists(pid) for pid in pids.values())
    assert not run_cli(["status", "--json"], env).json["healthy"]


def test_up_names_a_port_that_is_already_taken(cli_env: dict[str, str]) -> None:
    env = stack_env(cli_env)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", int(env["MLOPS_MLFLOW_PORT"])))
        blocker.listen()
        result = run_cli(["up"], env, timeout=120)
    assert result.code == 1
    assert f"port {env['MLOPS_MLFLOW_PORT']} for mlflow is already in use" in result.stderr
    run_cli(["down"], env)

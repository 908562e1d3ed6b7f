"""The fault matrix end to end (`mlops scenario all --group faults`): every stack service killed and hung at its
most dangerous phase of a real rollout on the real local stack. Each scenario must reach its outcome with no
client error (requests in flight to a dead gateway counted apart and bounded), no second decision, and the traffic
policy, slot assignments and MLflow aliases agreeing with the outcome once the stack has recovered."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.processes import port_is_free
from mlops.scenarios.spec import resolve
from tests.conftest import run_cli
from tests.test_stack_commands import stack_env

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_every_fault_scenario_reaches_its_outcome_and_leaves_the_platform_consistent(
    cli_env: dict[str, str], home: Path
) -> None:
    faults = {s.name for s in resolve("all", group="faults")}
    assert len(faults) >= 14
    env = {**stack_env(cli_env), "MLOPS_MODEL_NAME": "fraud-faults"}
    result = run_cli(["scenario", "all", "--group", "faults", "--json"], env, timeout=2400)
    report = result.json
    by_name = {s["name"]: s for s in report["scenarios"]}
    failed = {name: (s["outcome"], s["failures"]) for name, s in by_name.items() if not s["passed"]}
    assert result.code == 0 and report["passed"], f"{failed}\n{result.stderr[-4000:]}"
    assert set(by_name) == faults
    for summary in by_name.values():
        assert summary["outcome"] == summary["expected"] and summary["reason"]

    urls = (env["MLOPS_CONTROL_PLANE_URL"], env["MLOPS_CONTROLLER_URL"], env["MLOPS_DRIFT_MONITOR_URL"])
    ports = [int(url.rsplit(":", 1)[1]) for url in urls]
    ports += [int(env[f"MLOPS_{name}_PORT"]) for name in ("SLOT_A", "SLOT_B", "GATEWAY", "MLFLOW")]
    assert all(port_is_free(port) for port in ports)

"""The whole training pipeline on KFP's local runner against a real MLflow server.

Runs share one registry (module scope) and happen in order: a first model becomes champion, a second
becomes challenger, then bad data and a bad model must leave that registry exactly as it was. The first run
happens in a real terminal (tmux), as a person would start it, and its pane is checked while it runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from core.synthetic import CORRUPT_KINDS, generate_transactions
from pipelines.runner import STEPS
from tests.conftest import CliResult, run_cli
from tests.terminal import PaneRun, run_in_tmux

pytestmark = pytest.mark.slow
FAST = ["--param", "epochs=2", "--param", "min_rows=1000"]


@pytest.fixture(scope="module")
def env(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import os

    home = tmp_path_factory.mktemp("pipeline-home")
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")}
    return {
        **base,
        "MLOPS_HOME": str(home),
        "MLOPS_MLFLOW_TRACKING_URI": mlflow_server,
        "MLOPS_MODEL_NAME": "fraud-pipeline-test",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


@pytest.fixture(scope="module")
def client(mlflow_server: str) -> MlflowClient:
    return MlflowClient(mlflow_server)


def registry_state(client: MlflowClient, name: str) -> dict[str, Any]:
    versions = client.search_model_versions(f"name = '{name}'")
    return {v.version: sorted(client.get_model_version(name, v.version).aliases) for v in versions}


@pytest.fixture(scope="module")
def first_run(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> PaneRun:
    """In a tmux pane (stdout, the JSON line, to a file): what a person sees is captured every second."""
    args = ["run", "--generate", "12000", "--param", "seed=1", *FAST, "--json"]
    return run_in_tmux(args, env, tmp_path_factory.mktemp("first-run-pane"), "run")


@pytest.fixture(scope="module")
def second_run(env: dict[str, str], first_run: PaneRun) -> CliResult:
    # A looser PR-AUC tolerance: this test is about aliases, not about which of two similar models wins.
    return run_cli(
        ["run", "--generate", "12000", "--param", "seed=2", "--param", "max_pr_auc_drop=0.5", *FAST, "--json"], env
    )


def elapsed_seconds(pane: str) -> int | None:
    match = re.search(r"elapsed (?:(\d+)m )?(\d+)s\b", pane)
    return int(match.group(1) or 0) * 60 + int(match.group(2)) if match else None


def test_a_person_sees_the_current_step_and_the_elapsed_time_while_the_pipeline_runs(
    first_run: PaneRun, env: dict[str, str]
) -> None:
    """`mlops run` used to show nothing for the whole run: its live status was drawn into pipeline.log."""
    assert first_run.code == 0, first_run.stderr[-3000:]
    running = [pane for _, pane in first_run.frames if "running" in pane]
    assert running, f"no frame showed a running step; the pane at the end:\n{first_run.final[-2000:]}"
    seen = {step for pane in running for i, step in enumerate(STEPS) if f"step {i + 1}/{len(STEPS)}: {step}" in pane}
    assert {"validate", "train"} <= seen, seen  # the view followed the run step by step
    elapsed = [e for pane in running if (e := elapsed_seconds(pane)) is not None]
    assert len(elapsed) >= 3 and elapsed == sorted(elapsed) and elapsed[-1] > elapsed[0], elapsed
    assert all(f"✓  {step}" in first_run.final for step in STEPS), first_run.final[-2000:]
    assert "SUCCEEDED" in first_run.final
    log = Path(env["MLOPS_HOME"]) / "runs" / first_run.json["run_id"] / "pipeline.log"
    assert "Executing task" in log.read_text() and "elapsed" not in log.read_text()  # the view stays out of it


def test_first_run_registers_a_champion_with_lineage(first_run: CliResult, client: MlflowClient) -> None:
    assert first_run.code == 0, first_run.stderr[-3000:]
    result = first_run.json
    assert result["status"] == "SUCCEEDED" and result["failed_step"] is None
    assert result["model_version"] == "1" and result["aliases"] == ["champion"]
    assert 0.2 < result["metrics"]["test_pr_auc"] <= 1.0
    assert {"test_roc_auc", "test_recall_at_precision", "test_log_loss", "test_ece"} <= set(result["metrics"])
    version = client.get_model_version("fraud-pipeline-test", "1")
    assert version.tags["mlops.pipeline_run_id"] == result["run_id"]
    assert len(version.tags["mlops.data_sha256"]) == 64
    assert version.tags["mlops.validation"].startswith("passed")
    assert version.tags["mlops.git_sha"]
    assert "checkpoint_" in version.tags["mlops.checkpoint"]


def test_second_run_becomes_challenger_and_the_first_stays_champion(
    second_run: CliResult, client: MlflowClient
) -> None:
    assert second_run.code == 0, second_run.stderr[-3000:]
    assert second_run.json["model_version"] == "2" and second_run.json["aliases"] == ["challenger"]
    assert registry_state(client, "fraud-pipeline-test") == {"1": ["champion"], "2": ["challenger"]}


EXPECTED_COMPLAINT = {
    "missing-column": "amount",
    "wrong-type": "wrong type",
    "out-of-range": "outside",
    "null-burst": "null",
    "label-rate": "is_fraud",
    "empty": "0 rows",
}


@pytest.mark.parametrize("kind", CORRUPT_KINDS)
def test_corrupt_data_stops_at_validate_and_registers_nothing(
    kind: str, env: dict[str, str], second_run: CliResult, client: MlflowClient, tmp_path: Path
) -> None:
    before = registry_state(client, "fraud-pipeline-test")
    data = tmp_path / f"{kind}.parquet"
    generate_transactions(3000, seed=9, corrupt=kind).to_parquet(data)  # type: ignore[arg-type]
    result = run_cli(["run", "--data", str(data), *FAST, "--json"], env)
    assert result.code == 1
    outcome = result.json
    assert outcome["status"] == "FAILED" and outcome["failed_step"] == "validate"
    assert outcome["model_version"] is None
    assert EXPECTED_COMPLAINT[kind] in outcome["reason"]
    assert registry_state(client, "fraud-pipeline-test") == before


def test_a_model_below_the_offline_gate_is_not_registered(
    env: dict[str, str], second_run: CliResult, client: MlflowClient
) -> None:
    before = registry_state(client, "fraud-pipeline-test")
    result = run_cli(["run", "--generate", "5000", "--param", "epochs=1", "--param", "min_pr_auc=0.99", "--json"], env)
    assert result.code == 1
    assert result.json["failed_step"] == "evaluate"
    assert "PR-AUC" in result.json["reason"]
    assert registry_state(client, "fraud-pipeline-test") == before

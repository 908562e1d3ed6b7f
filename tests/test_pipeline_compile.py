"""The compiled KFP IR: the steps, their order and the gates are what the design says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipelines.runner import compile_pipeline


def _compiled(tmp_path: Path) -> dict[str, Any]:
    return yaml.safe_load(compile_pipeline(tmp_path / "p.yaml").read_text())


def test_pipeline_has_the_seven_steps_and_deploy_follows_register(tmp_path: Path) -> None:
    tasks = _compiled(tmp_path)["root"]["dag"]["tasks"]
    assert set(tasks) == {
        "ingest-op",
        "validate-op",
        "drift-check-op",
        "train-op",
        "evaluate-op",
        "register-op",
        "deploy-op",
    }
    assert tasks["deploy-op"]["dependentTasks"] == ["register-op"]


def test_training_and_drift_wait_for_validation_and_register_waits_for_the_gate(tmp_path: Path) -> None:
    tasks = _compiled(tmp_path)["root"]["dag"]["tasks"]
    assert "validate-op" in tasks["drift-check-op"]["dependentTasks"]
    assert "drift-check-op" in tasks["train-op"]["dependentTasks"]  # reference = champion before this run
    assert {"evaluate-op", "train-op", "validate-op"} <= set(tasks["register-op"]["dependentTasks"])


def test_validation_publishes_data_docs_as_html_and_steps_install_nothing(tmp_path: Path) -> None:
    spec = _compiled(tmp_path)
    outputs = spec["components"]["comp-validate-op"]["outputDefinitions"]["artifacts"]
    assert outputs["data_docs"]["artifactType"]["schemaTitle"] == "system.HTML"
    for executor in spec["deploymentSpec"]["executors"].values():
        command = " ".join(executor["container"]["command"])
        assert "pip install" not in command  # the project's image / venv already has everything

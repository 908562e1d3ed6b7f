"""Ray Train fault tolerance with real Ray: a dead worker and a dead driver both resume from checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.support import registered_checkpoint_epoch

pytestmark = pytest.mark.slow


def test_worker_killed_mid_training_resumes_from_its_checkpoint(cli_env: dict[str, str]) -> None:
    result = run_cli(
        [
            "train",
            "--rows",
            "8000",
            "--epochs",
            "3",
            "--workers",
            "2",
            "--inject-worker-failure-at-epoch",
            "3",
            "--json",
        ],
        cli_env,
    )
    assert result.code == 0, result.stderr[-3000:]
    outcome = result.json
    assert outcome["restarts"] == 1
    assert outcome["resumed_from_epoch"] is not None and outcome["resumed_from_epoch"] >= 1
    assert outcome["epochs_completed"] == 3
    assert Path(outcome["checkpoint"]).is_dir()
    assert 0.0 < outcome["metrics"]["val_pr_auc"] <= 1.0


def test_rerun_with_the_same_name_after_a_driver_crash_resumes(cli_env: dict[str, str], home: Path) -> None:
    args = [
        sys.executable,
        "-m",
        "mlops.cli",
        "train",
        "--rows",
        "100000",
        "--epochs",
        "10",
        "--workers",
        "1",
        "--run-name",
        "crashy",
        "--json",
    ]
    run_dir = home / "checkpoints" / "crashy"
    # Own session: the SIGKILL below takes the driver and the Ray processes it started, nothing else.
    driver = subprocess.Popen(
        args, env=cli_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while registered_checkpoint_epoch(run_dir) < 2:
            assert driver.poll() is None, "training finished or died before the crash could be injected"
            assert time.monotonic() < deadline, "no checkpoint for epoch 2 within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    crashed_at = registered_checkpoint_epoch(run_dir)
    assert crashed_at < 10, "the driver was killed after training had already finished"

    result = run_cli(
        ["train", "--rows", "100000", "--epochs", "10", "--workers", "1", "--run-name", "crashy", "--json"], cli_env
    )
    assert result.code == 0, result.stderr[-3000:]
    outcome = result.json
    assert outcome["resumed_from_epoch"] is not None and outcome["resumed_from_epoch"] >= 2
    assert outcome["epochs_completed"] == 10

"""A training step whose Ray cluster dies starts a new one and resumes from its last checkpoint; a training bug is
not retried. The slow tests run real Ray and kill the worker node of the cluster the test's own attempt started: its
raylet and its `ray::` worker processes (Ray Train's controller and workers), by PID, found among that attempt's
descendants, never by name or `ray stop`. The driver then sees `ActorDiedError` at once. (Killing the GCS works too,
but the driver then waits `GCS_RECONNECT_TIMEOUT_S` before Ray ends it; a raylet alone is noticed by its workers
only after their own timeouts: both cost CI time for the same recovery.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RaySystemError
from ray.train import TrainingFailedError

from components.dataset import write_transactions
from components.rayjob import RayJobTraining
from components.train import TrainParams
from components.train_attempts import (
    EXIT_CLUSTER_LOST,
    EXIT_TRAINING_FAILED,
    ClusterLost,
    TrainingFailed,
    attempt_verdict,
    exit_code_for,
    is_cluster_loss,
    train_in_fresh_clusters,
)
from core.processes import group_members
from core.settings import Settings
from core.synthetic import generate_transactions
from tests.support import registered_checkpoint_epoch

# --- which errors are retried (pure) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ActorUnavailableError("Socket closed: the task may or may not have been executed on the actor", None),
        ActorDiedError(),
        NodeDiedError("node lost"),
        RaySystemError("raylet gone"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_errors_of_a_lost_cluster_are_retried(error: BaseException) -> None:
    assert is_cluster_loss(error)
    assert exit_code_for(error) == EXIT_CLUSTER_LOST
    assert attempt_verdict(exit_code_for(error)) == "lost"


@pytest.mark.parametrize(
    "error",
    [TrainingFailedError("the training loop raised"), ValueError("no fraud labels"), OSError("disk full")],
    ids=lambda error: type(error).__name__,
)
def test_errors_of_the_training_itself_are_not_retried(error: BaseException) -> None:
    assert not is_cluster_loss(error)
    assert exit_code_for(error) == EXIT_TRAINING_FAILED
    assert attempt_verdict(exit_code_for(error)) == "failed"


def test_an_attempt_that_never_reported_is_a_lost_cluster() -> None:
    assert attempt_verdict(-9) == "lost"  # SIGKILL: the OOM killer, a node loss
    assert attempt_verdict(1) == "lost"  # Ray ends the driver itself once its GCS is gone
    assert attempt_verdict(2) == "failed"  # a usage error
    assert attempt_verdict(0) == "done"


def test_the_rayjob_backoff_limit_is_the_cluster_retries_setting() -> None:
    for retries in (0, 3):
        settings = Settings(target="kind", train_cluster_retries=retries)
        manifest = RayJobTraining(settings).manifest("train-abc", TrainParams(workers=2, epochs=2))
        assert manifest["spec"]["backoffLimit"] == retries


def test_cluster_retries_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="train_cluster_retries"):
        Settings(train_cluster_retries=-1)


# --- real Ray -----------------------------------------------------------------------------------------------------


def _data(tmp_path: Path, rows: int = 8000) -> Path:
    path = tmp_path / "data.parquet"
    write_transactions(generate_transactions(rows, seed=0), path)
    return path


@pytest.mark.slow
def test_killed_ray_cluster_is_replaced_and_training_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    data, storage, run_name, epochs = _data(tmp_path), tmp_path / "checkpoints", "lost-cluster", 8
    attempts: list[tuple[int, int]] = []
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["outcome"] = train_in_fresh_clusters(
                data, storage, run_name, TrainParams(workers=1, epochs=epochs, max_failures=1), tmp_path / "model",
                retries=2, log_dir=tmp_path / "logs", on_attempt=lambda n, pid: attempts.append((n, pid)),
            )  # fmt: skip
        except BaseException as error:  # reported by the assertions below
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    while registered_checkpoint_epoch(storage / run_name) < 1:
        assert thread.is_alive(), f"training ended before the kill: {result}"
        assert time.monotonic() < deadline, "no registered checkpoint within 240 s"
        time.sleep(0.1)
    first_attempt_pid = attempts[0][1]
    descendants = psutil.Process(first_attempt_pid).children(recursive=True)
    node = [p for p in descendants if p.name() == "raylet" or p.name().startswith("ray::")]
    assert sum(p.name() == "raylet" for p in node) == 1 and any("TrainController" in p.name() for p in node), node
    killed_at = registered_checkpoint_epoch(storage / run_name)
    for process in node:  # the node is lost: its raylet and every worker process on it, by PID
        process.kill()
    thread.join(timeout=400)
    assert not thread.is_alive(), "training did not end within 400 s of the kill"
    assert "error" not in result, result.get("error")
    outcome = result["outcome"]
    assert killed_at < epochs, "the cluster was killed after training had finished"
    assert [number for number, _ in attempts] == [1, 2]
    assert outcome.attempts == 2
    assert outcome.epochs_completed == epochs
    assert outcome.resumed_from_epoch is not None and outcome.resumed_from_epoch >= killed_at
    assert [entry["epoch"] for entry in outcome.history] == list(range(1, epochs + 1))  # no epoch trained twice
    assert Path(outcome.model_dir).is_dir()
    assert group_members(first_attempt_pid) == []  # nothing of the lost cluster was left running


@pytest.mark.slow
def test_a_bug_in_the_training_loop_is_not_retried(tmp_path: Path) -> None:
    attempts: list[int] = []
    params = TrainParams(workers=1, epochs=2, max_failures=0, inject_error_at_epoch=1)
    with pytest.raises(TrainingFailed, match="not retried") as raised:
        train_in_fresh_clusters(
            _data(tmp_path, 4000), tmp_path / "checkpoints", "buggy", params, tmp_path / "model",
            retries=2, log_dir=tmp_path / "logs", on_attempt=lambda n, pid: attempts.append(n),
        )  # fmt: skip
    assert attempts == [1]
    assert f"exit {EXIT_TRAINING_FAILED}" in str(raised.value)
    assert "injected training-loop error" in (tmp_path / "logs" / "train-buggy-attempt-1.out").read_text()


def test_retries_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An attempt that is lost every time (here: a driver that exits 75 at once) is tried 1 + retries times."""
    import components.train_attempts as module

    monkeypatch.setattr(
        module, "entry_args", lambda *args: [module.sys.executable, "-c", f"raise SystemExit({EXIT_CLUSTER_LOST})"]
    )
    monkeypatch.setattr(module, "RETRY_PAUSE_S", 0.0)
    attempts: list[int] = []
    with pytest.raises(ClusterLost, match="lost its Ray cluster 3 times"):
        train_in_fresh_clusters(
            tmp_path / "none.parquet", tmp_path, "always-lost", TrainParams(), tmp_path / "model",
            retries=2, log_dir=tmp_path / "logs", on_progress=lambda line: None,
            on_attempt=lambda n, pid: attempts.append(n),
        )  # fmt: skip
    assert attempts == [1, 2, 3]

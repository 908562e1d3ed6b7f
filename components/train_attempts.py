"""A training step that survives the loss of its Ray cluster: a fresh cluster, resumed from the last checkpoint.

Two kinds of failure, two owners:

- **a Ray Train worker dies** (one process OOM-killed, a worker pod lost): Ray Train itself restarts the worker
  group inside the running cluster, `FailureConfig(max_failures)` times (`MLOPS_TRAIN_MAX_FAILURES`);
- **the cluster itself dies** (its GCS or raylet killed, the node lost): nothing inside that cluster can recover,
  and the driver sees `ActorDiedError` / `ActorUnavailableError` ("Socket closed ... the task may or may not
  have been executed on the actor") or, when the GCS is gone, Ray ends the driver process itself. That is this
  module's job: each attempt runs the training entry (`python -m components.train_entry`) as a process of its
  own, with the Ray cluster it starts; when the attempt loses its cluster, what is left of it is ended (the whole
  process group and every process carrying its mark) and a new attempt starts a new cluster with the same
  `(storage_path, run_name)`, so Ray Train resumes from the latest registered checkpoint.
  At most `MLOPS_TRAIN_CLUSTER_RETRIES` new clusters per step. On kind the same setting is the RayJob's
  `backoffLimit` (`components.rayjob`), where KubeRay makes the new cluster.

Which attempts are retried (`attempt_verdict`, from the attempt's exit status):

- retried: exit `EXIT_CLUSTER_LOST` (the entry caught an error of `CLUSTER_LOSS_ERRORS`: the cluster went away
  under the driver), or an end the entry never reported: killed by a signal (the OOM killer, a node loss) or
  ended by Ray itself after losing its GCS (`RAY_gcs_rpc_server_reconnect_timeout_s`, 15 s here);
- not retried: exit `EXIT_TRAINING_FAILED`, which the entry reports for every other error: a bug in the training
  loop (Ray Train's `TrainingFailedError`, after its own `max_failures` worker restarts), bad data, storage
  errors; and exit 2, a usage error. A fresh cluster would only repeat those.

KubeRay cannot tell these apart: on kind `backoffLimit` retries any failed attempt, a training bug included
(the exit code in the driver's log says which it was).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from components.train import TrainOutcome, TrainParams
from core.processes import kill_tree, start_process

EXIT_OK = 0
EXIT_USAGE = 2  # argparse
EXIT_TRAINING_FAILED = 3  # the attempt failed on its own: never retried
EXIT_CLUSTER_LOST = 75  # EX_TEMPFAIL: the attempt's Ray cluster went away under it
# How long a driver or raylet waits for a GCS that died before Ray ends it (Ray's default is 60 s).
GCS_RECONNECT_TIMEOUT_S = "15"
RETRY_PAUSE_S = 1.0  # lets the ports and the session directory of a dead cluster go before the next one

Verdict = Literal["done", "lost", "failed"]


def cluster_loss_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the Ray cluster went away under the driver (not that the training failed)."""
    from ray import exceptions as ray_errors

    return (
        ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError: Ray Train's controller actor is gone
        ray_errors.NodeDiedError,
        ray_errors.LocalRayletDiedError,
        ray_errors.RaySystemError,
        ray_errors.WorkerCrashedError,
        ray_errors.ObjectLostError,  # OwnerDiedError among them
        ray_errors.RpcError,
    )


def is_cluster_loss(error: BaseException) -> bool:
    """Whether `error`, raised by `trainer.fit()`, means the cluster was lost. Ray Train's `TrainingFailedError`
    (the training loop raised, or workers kept dying past `max_failures`) is not one of them."""
    return isinstance(error, cluster_loss_errors())


def exit_code_for(error: BaseException) -> int:
    """The training entry's exit status for an error it caught."""
    return EXIT_CLUSTER_LOST if is_cluster_loss(error) else EXIT_TRAINING_FAILED


def attempt_verdict(returncode: int) -> Verdict:
    """What an attempt's exit status means: `done`, `failed` (never retried) or `lost` (retried)."""
    if returncode == EXIT_OK:
        return "done"
    if returncode in (EXIT_TRAINING_FAILED, EXIT_USAGE):
        return "failed"
    # EXIT_CLUSTER_LOST, a signal (negative), or Ray's own exit after losing the GCS: the entry never got to
    # report an error of the training, so the cluster (or the driver's node) was lost.
    return "lost"


class TrainingFailed(RuntimeError):
    """The training failed on its own (a bug, bad data): retrying on a new cluster would only repeat it."""


class ClusterLost(RuntimeError):
    """The Ray cluster was lost more often than `MLOPS_TRAIN_CLUSTER_RETRIES` allows."""


def entry_args(
    data_path: str | Path,
    storage_path: str | Path,
    run_name: str,
    params: TrainParams,
    model_dir: str | Path,
    outcome: Path,
) -> list[str]:
    args = [
        sys.executable, "-m", "components.train_entry",
        "--data", str(data_path),
        "--storage", str(storage_path),
        "--run-name", run_name,
        "--model-out", str(model_dir),
        "--outcome", str(outcome),
    ]  # fmt: skip
    return args + params.entry_args()


def _attempt_env() -> dict[str, str]:
    project = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([project, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", GCS_RECONNECT_TIMEOUT_S)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.pop("RAY_ADDRESS", None)  # each attempt starts a cluster of its own
    return env


def train_in_fresh_clusters(
    data_path: str | Path,
    storage_path: str | Path,
    run_name: str,
    params: TrainParams,
    model_dir: str | Path,
    retries: int,
    log_dir: Path,
    on_progress: Callable[[str], None] = lambda line: print(line, flush=True),
    on_attempt: Callable[[int, int], None] | None = None,
) -> TrainOutcome:
    """Train as `components.train.train_model` does, in attempts of a process and Ray cluster each; an attempt
    that loses its cluster is followed by a new one (at most `retries` times) that resumes from the latest
    checkpoint of `storage_path/run_name`. `on_attempt(number, pid)` is told each attempt's process id.
    Raises `TrainingFailed` (not retried) or `ClusterLost` (retries spent), each quoting the attempt's log."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="train-attempts-") as scratch:
        outcome_path = Path(scratch) / "outcome.json"
        for attempt in range(1, retries + 2):
            name = f"train-{run_name}-attempt-{attempt}"
            managed = start_process(
                name,
                entry_args(data_path, storage_path, run_name, params, model_dir, outcome_path),
                _attempt_env(),
                log_dir,
            )
            if on_attempt is not None:
                on_attempt(attempt, managed.pid)
            returncode = managed.process.wait()
            # What a lost cluster leaves behind (a raylet without its GCS, workers without their raylet) must not
            # linger into the next attempt: end the attempt's whole group and every process with its mark.
            kill_tree(managed.pid, managed.mark)
            verdict = attempt_verdict(returncode)
            if verdict == "done":
                outcome = TrainOutcome(**json.loads(outcome_path.read_text()))
                outcome.attempts = attempt
                return outcome
            tail = managed.log_tail(2000)
            if verdict == "failed":
                raise TrainingFailed(f"training {run_name} failed (exit {returncode}), not retried:\n{tail}")
            if attempt > retries:
                raise ClusterLost(
                    f"training {run_name} lost its Ray cluster {attempt} times (exit {returncode}); "
                    f"MLOPS_TRAIN_CLUSTER_RETRIES={retries}:\n{tail}"
                )
            on_progress(
                f"training {run_name}: attempt {attempt} lost its Ray cluster (exit {returncode}); "
                f"starting a new one, resuming from the latest checkpoint ({attempt}/{retries} retries)"
            )
            with contextlib.suppress(OSError):
                outcome_path.unlink()
            time.sleep(RETRY_PAUSE_S)
    raise AssertionError("unreachable")  # pragma: no cover

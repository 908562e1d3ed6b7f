"""Compile and run the training pipeline: `kfp.local` on the embedded default.

A run is identified by our own `run_id` (a pipeline parameter), so its outcome can be read back the
same way on any target: the model version tagged with it in MLflow, or the failure record a step left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kfp import compiler

from core.settings import Settings
from pipelines.training import training_pipeline


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(raw)
    return lowered in ("true", "1", "yes")


_boolean.__name__ = "bool"

PARAMETER_TYPES: dict[str, Any] = {
    "data_path": str,
    "rows": int,
    "seed": int,
    "min_rows": int,
    "workers": int,
    "epochs": int,
    "batch_size": int,
    "learning_rate": float,
    "inject_failure_at_epoch": int,
    "min_pr_auc": float,
    "max_pr_auc_drop": float,
    "max_ece": float,
    "deploy": _boolean,
}
STEPS = ("ingest", "validate", "drift-check", "train", "evaluate", "register", "deploy")


class ParameterError(ValueError):
    """A `--param k=v` the pipeline cannot take."""


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`["epochs=3", "learning_rate=0.01"]` → typed values, or a `ParameterError` that names the problem."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ParameterError(f"--param {pair!r}: expected KEY=VALUE")
        if key not in PARAMETER_TYPES:
            raise ParameterError(f"--param {key}: unknown parameter; known: {', '.join(sorted(PARAMETER_TYPES))}")
        kind = PARAMETER_TYPES[key]
        try:
            params[key] = kind(raw)
        except ValueError:
            raise ParameterError(f"--param {key}={raw!r}: expected {kind.__name__}") from None
    _check_ranges(params)
    return params


def _check_ranges(params: dict[str, Any]) -> None:
    positive = ("rows", "workers", "epochs", "batch_size", "min_rows")
    for key in positive:
        if key in params and params[key] < 1:
            raise ParameterError(f"--param {key}={params[key]}: must be >= 1")
    if "learning_rate" in params and not 0 < params["learning_rate"] < 1:
        raise ParameterError(f"--param learning_rate={params['learning_rate']}: must be in (0, 1)")
    if "inject_failure_at_epoch" in params and params["inject_failure_at_epoch"] < 0:
        raise ParameterError("--param inject_failure_at_epoch: must be >= 0 (0 = no failure)")
    for key in ("min_pr_auc", "max_pr_auc_drop", "max_ece"):
        if key in params and not 0 <= params[key] <= 1:
            raise ParameterError(f"--param {key}={params[key]}: must be in [0, 1]")


def default_params(settings: Settings) -> dict[str, Any]:
    return {
        "workers": settings.train_workers,
        "epochs": settings.train_epochs,
        "batch_size": settings.train_batch_size,
        "learning_rate": settings.train_learning_rate,
        "min_pr_auc": settings.gate_min_pr_auc,
        "max_pr_auc_drop": settings.gate_max_pr_auc_drop,
        "max_ece": settings.gate_max_ece,
    }


def compile_pipeline(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(training_pipeline, str(path))
    return path


@dataclass
class RunResult:
    status: str
    run_id: str
    model_name: str
    model_version: str | None = None
    aliases: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    failed_step: str | None = None
    reason: str | None = None
    seconds: float = 0.0
    deploy: dict[str, Any] | None = None  # what the deploy step did (rollout started, skipped, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_local(
    settings: Settings, params: dict[str, Any], run_id: str | None = None, log_path: Path | None = None
) -> RunResult:
    """Run the pipeline with KFP's local SubprocessRunner in this environment (no cluster, no Docker)."""
    import kfp.local

    settings.ensure_dirs()
    run_id = run_id or new_run_id()
    os.environ["MLOPS_HOME"] = str(settings.home)  # steps run as subprocesses: they must see the same home
    if settings.mlflow_tracking_uri:
        os.environ["MLOPS_MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(settings.pipeline_root),
        raise_on_error=True,
    )
    arguments = {**default_params(settings), **params, "run_id": run_id}
    # The local runner warns that our image name "has no python in it" and that display names are
    # no-ops locally: both are true and harmless for the embedded default.
    warnings.filterwarnings("ignore", message=".*(non-Python base image|have no effect in the current local).*")
    started = time.perf_counter()
    error: Exception | None = None
    with _captured_kfp_logs(log_path or settings.runs_dir / run_id / "pipeline.log"):
        try:
            training_pipeline(**arguments)
        except RuntimeError as caught:
            error = caught
    return outcome(settings, run_id, error, time.perf_counter() - started, log_path)


@contextlib.contextmanager
def _captured_kfp_logs(path: Path) -> Iterator[None]:
    """KFP's local runner prints every step's output to stdout; send it to the run's log file instead,
    line-buffered so a progress display can follow it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        yield


def outcome(
    settings: Settings, run_id: str, error: Exception | None, seconds: float, log_path: Path | None = None
) -> RunResult:
    """Read back what a run did: the version it registered, or the step that stopped it and why."""
    from components.steps import read_failure
    from core.registry import connect

    result = RunResult(status="SUCCEEDED", run_id=run_id, model_name=settings.model_name, seconds=round(seconds, 1))
    failure = read_failure(settings, run_id)
    if error is not None or failure is not None:
        result.status = "FAILED"
        result.failed_step = failure["failed_step"] if failure else _failed_task(str(error))
        result.reason = failure["reason"] if failure else _crash_reason(log_path)
        return result
    client = connect(settings)
    versions = client.search_model_versions(
        f"name = '{settings.model_name}' and tags.`mlops.pipeline_run_id` = '{run_id}'"
    )
    if not versions:
        result.status, result.reason = "FAILED", "the pipeline finished but registered no model version"
        return result
    version = client.get_model_version(settings.model_name, versions[0].version)  # search omits aliases
    result.model_version = str(version.version)
    result.aliases = sorted(version.aliases)
    if "mlops.deploy" in version.tags:
        result.deploy = json.loads(version.tags["mlops.deploy"])
    run = client.get_run(version.run_id)
    result.metrics = {k: round(v, 6) for k, v in sorted(run.data.metrics.items()) if k.startswith("test_")}
    return result


def _crash_reason(log_path: Path | None) -> str:
    """A step crashed without recording why (a bug, not a gate): quote the last exception in its log."""
    lines = log_path.read_text(errors="replace").splitlines() if log_path and log_path.exists() else []
    errors = [line.strip() for line in lines if re.match(r"^\s*[\w.]+(Error|Exception|Failed)\b.*:", line)]
    where = f" (full log: {log_path})" if log_path else ""
    return (_strip_ansi(errors[-1]) if errors else "a step crashed") + where


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _failed_task(message: str) -> str | None:
    """KFP says "Inner task failed: <name>."; map it back to our step names."""
    message = _strip_ansi(message)
    for step in STEPS:
        if f"'{step}-op'" in message:
            return step
    return None

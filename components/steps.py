"""The training pipeline's steps as plain functions over files: what each KFP component runs.

The KFP wrappers in `components/kfp_components.py` only move artifacts in and out; everything that
decides anything is here, testable without KFP. A step that must stop the run raises `StepFailed`,
after recording which step failed and why under `MLOPS_HOME/runs/<run_id>/failure.json`, so the CLI
can tell the user exactly what went wrong instead of "a task failed".
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from components.dataset import file_sha256, read_transactions, split_by_account, write_transactions
from components.evaluate import GateTolerances, compute_metrics, offline_gate, slice_gaps, slice_metrics
from components.train import TrainOutcome, TrainParams
from core.model import FraudScorer
from core.schema import FEATURES, LABEL
from core.settings import Settings
from core.synthetic import generate_transactions

REFERENCE_ROWS = 5_000


class StepFailed(RuntimeError):
    """A step refused to continue; the message says why in words a person can act on."""


def record_failure(settings: Settings, run_id: str, step: str, reason: str) -> None:
    run_dir = settings.runs_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "failure.json").write_text(json.dumps({"failed_step": step, "reason": reason}))


def read_failure(settings: Settings, run_id: str) -> dict[str, str] | None:
    path = settings.runs_dir / run_id / "failure.json"
    return json.loads(path.read_text()) if path.exists() else None


def fail(settings: Settings, run_id: str, step: str, reason: str) -> StepFailed:
    record_failure(settings, run_id, step, reason)
    return StepFailed(f"{step} failed: {reason}")


# --- ingest -----------------------------------------------------------------------------------------


def ingest(settings: Settings, run_id: str, data_path: str, rows: int, seed: int, out_path: str | Path) -> str:
    """Copy the given file, or generate `rows` transactions, to `out_path`; returns the data's SHA-256."""
    try:
        if data_path:
            frame = read_transactions(data_path)
            shutil.copyfile(data_path, out_path)
        else:
            frame = generate_transactions(rows, seed=seed)
            write_transactions(frame, out_path)
    except ValueError as error:
        raise fail(settings, run_id, "ingest", str(error)) from None
    del frame
    return file_sha256(out_path)


# --- validate ---------------------------------------------------------------------------------------


def validate(
    settings: Settings, run_id: str, data_path: str | Path, docs_dir: str | Path, html_path: str | Path, min_rows: int
) -> dict[str, Any]:
    """Run the GX suite; stop the run when the data breaks the contract. Returns the summary dict."""
    from components.validate import validate_transactions

    frame = read_transactions(data_path)
    summary = validate_transactions(frame, docs_dir, min_rows=min_rows)
    if summary.docs_index:
        _copy_docs_page(Path(summary.docs_index), Path(html_path))
    passed = summary.evaluated - len(summary.failed)
    record_step(settings, run_id, "validate", {**summary.to_dict(), "passed": passed}, html_path)
    if not summary.success:
        raise fail(settings, run_id, "validate", summary.describe_failures())
    return summary.to_dict()


def record_step(
    settings: Settings, run_id: str, step: str, result: dict[str, Any], html: str | Path | None = None
) -> None:
    """Keep a step's result (and its HTML page) under `runs/<run_id>/steps/`, where reports and people find
    them by run id (KFP's own artifact paths are named by its run, not ours)."""
    directory = settings.runs_dir / run_id / "steps"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{step}.json").write_text(json.dumps(result, indent=2, default=str))
    if html is not None and Path(html).exists():
        shutil.copy(html, directory / f"{step}.html")


def _copy_docs_page(index: Path, html_path: Path) -> None:
    """KFP renders one HTML file per artifact: use the validation-result page of the Data Docs site."""
    pages = sorted((index.parent / "validations").rglob("*.html")) if (index.parent / "validations").exists() else []
    shutil.copyfile(pages[-1] if pages else index, html_path)


# --- drift check ------------------------------------------------------------------------------------


def drift_check(
    settings: Settings, data_path: str | Path, html_path: str | Path, workdir: str | Path, run_id: str | None = None
) -> dict[str, Any]:
    """Evidently drift of the new data against the champion's training reference (informational)."""
    from core.drift import drift_report
    from core.registry import CHAMPION, load_alias

    champion = load_alias(settings, CHAMPION, workdir)
    if champion is None:
        Path(html_path).write_text(
            "<html><body><h1>Drift check</h1><p>No champion yet: nothing to compare "
            "the new data with. This run's training data becomes the reference.</p></body></html>"
        )
        result: dict[str, Any] = {"drift_share": None, "reference": None}
    else:
        version, _, reference_file = champion
        summary = drift_report(pd.read_parquet(reference_file), read_transactions(data_path), html_path)
        result = {**summary.to_dict(), "reference": f"champion v{version}"}
    if run_id is not None:
        record_step(settings, run_id, "drift_check", result, html_path)
    return result


# --- train ------------------------------------------------------------------------------------------


@dataclass
class TrainStepResult:
    mlflow_run_id: str
    model_uri: str
    checkpoint: str
    metrics: dict[str, float]
    restarts: int
    resumed_from_epoch: int | None


class TrainingBackend(Protocol):
    """Where the Ray training runs; one implementation per target, chosen once by `training_backend`."""

    def train(
        self, data_path: str | Path, run_name: str, params: TrainParams, model_dir: str | Path
    ) -> TrainOutcome: ...


@dataclass
class LocalTraining:
    """The embedded default: Ray on this machine, checkpoints under `MLOPS_HOME/checkpoints`. Each attempt starts
    a Ray cluster of its own; one that loses it is followed by a new cluster resuming from the last checkpoint,
    `MLOPS_TRAIN_CLUSTER_RETRIES` times at most (`components.train_attempts` says which errors are retried)."""

    settings: Settings

    def train(self, data_path: str | Path, run_name: str, params: TrainParams, model_dir: str | Path) -> TrainOutcome:
        from components.train_attempts import train_in_fresh_clusters

        return train_in_fresh_clusters(
            data_path,
            self.settings.checkpoint_root,
            run_name,
            params,
            model_dir,
            self.settings.train_cluster_retries,
            self.settings.logs_dir,
        )


def training_backend(settings: Settings) -> TrainingBackend:
    """`local`: Ray in this process tree; `kind`: a KubeRay RayJob running the same training code
    (`components.rayjob.RayJobTraining`, checkpoints and model on MinIO)."""
    if settings.target == "kind":
        from components.rayjob import RayJobTraining

        return RayJobTraining(settings)
    return LocalTraining(settings)


def train(
    settings: Settings, run_id: str, data_path: str | Path, data_sha: str, params: TrainParams, model_dir: str | Path
) -> TrainStepResult:
    outcome = training_backend(settings).train(data_path, f"train-{run_id}", params, model_dir)
    reference = Path(model_dir).parent / f"{Path(model_dir).name}-reference.parquet"
    train_frame, _ = split_by_account(read_transactions(data_path))
    train_frame.sample(min(REFERENCE_ROWS, len(train_frame)), random_state=0).to_parquet(reference, index=False)
    tags = {
        "mlops.pipeline_run_id": run_id,
        "mlops.data_sha256": data_sha,
        "mlops.run_name": f"train-{run_id}",
        "mlops.checkpoint": outcome.checkpoint,
    }
    from core.registry import log_training_run

    logged = log_training_run(settings, model_dir, reference, outcome.params, outcome.history, tags)
    metrics = {k: float(v) for k, v in outcome.metrics.items()}
    return TrainStepResult(
        logged.run_id, logged.model_uri, outcome.checkpoint, metrics, outcome.restarts, outcome.resumed_from_epoch
    )


# --- evaluate ---------------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    champion_metrics: dict[str, float] | None
    champion_version: str | None
    slices: dict[str, Any]
    gate: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    settings: Settings,
    run_id: str,
    data_path: str | Path,
    model_dir: str | Path,
    mlflow_run_id: str,
    tolerances: GateTolerances,
    workdir: str | Path,
) -> EvaluationResult:
    """Score the holdout with the new model and the champion; refuse to register a model that loses."""
    from core.registry import CHAMPION, load_alias, log_evaluation

    _, holdout = split_by_account(read_transactions(data_path))
    labels = holdout[LABEL].to_numpy()
    scores = FraudScorer.load(model_dir).score_frame(holdout[list(FEATURES)])
    metrics = compute_metrics(labels, scores, settings.recall_at_precision, settings.decision_threshold)
    slices = slice_metrics(holdout, scores, precision_target=settings.recall_at_precision)
    metrics.update(slice_gaps(slices))
    champion = load_alias(settings, CHAMPION, workdir)
    champion_metrics = None
    if champion is not None:
        champion_scores = champion[1].score_frame(holdout[list(FEATURES)])
        champion_metrics = compute_metrics(
            labels, champion_scores, settings.recall_at_precision, settings.decision_threshold
        )
    decision = offline_gate(metrics, champion_metrics, tolerances)
    result = EvaluationResult(metrics, champion_metrics, champion[0] if champion else None, slices, decision.to_dict())
    log_evaluation(settings, mlflow_run_id, metrics, result.to_dict())
    if not decision.passed:
        raise fail(settings, run_id, "evaluate", f"offline gate: {decision.reasons()}")
    return result


# --- register ---------------------------------------------------------------------------------------


def register(
    settings: Settings, run_id: str, model_uri: str, mlflow_run_id: str, data_sha: str, validation: str, checkpoint: str
) -> tuple[str, list[str]]:
    from core.registry import git_sha, register_version

    tags = {
        "mlops.pipeline_run_id": run_id,
        "mlops.data_sha256": data_sha,
        "mlops.validation": validation,
        "mlops.git_sha": git_sha(),
        "mlops.checkpoint": checkpoint,
    }
    return register_version(settings, model_uri, mlflow_run_id, tags)


# --- deploy -----------------------------------------------------------------------------------------


def deploy(settings: Settings, run_id: str, version: str, aliases: list[str]) -> dict[str, Any]:
    """Hand the new version to the platform: a challenger goes to the rollout controller, which brings it to
    traffic only while the guardrails hold; a first champion (nothing to compare with) is put on the champion
    slot. With no platform running (no controller or control plane answering), nothing is deployed and the
    result says so and what to run later: training must not need the serving stack.

    The outcome is recorded as the version's `mlops.deploy` tag, so `mlops run` can report it."""
    import httpx

    from control_plane.rollouts_client import ControllerUnavailable
    from control_plane.tokens import resolve_token
    from core.aliases import CHAMPION
    from core.registry import connect

    token = resolve_token(settings)
    try:
        if CHAMPION in aliases:
            from control_plane.client import ControlPlaneClient, ControlPlaneUnavailable

            try:
                with ControlPlaneClient(settings.control_plane_url, token=token) as control:
                    slot = control.get_policy().champion_slot
                    control.assign(slot, version)
                result = {"action": "assigned", "slot": slot, "reason": f"first champion v{version} on slot {slot}"}
            except ControlPlaneUnavailable as error:
                raise httpx.ConnectError(str(error)) from None
        else:
            from control_plane.rollouts_client import ControllerError, RolloutsClient

            try:
                with RolloutsClient(settings.controller_url, token=token, timeout=60) as controller:
                    payload = controller.start(version)
                result = {
                    "action": "rollout_started",
                    "rollout_id": payload["rollout_id"],
                    "reason": payload.get("description", ""),
                }
            except ControllerError as error:
                result = {"action": "refused", "reason": f"controller refused the rollout: {error.error}"}
    except (httpx.HTTPError, ControllerUnavailable) as error:
        result = {
            "action": "skipped",
            "reason": f"no platform answering ({error}); run `mlops up`, then `mlops rollout start {version}`",
        }
    result["version"] = version
    connect(settings).set_model_version_tag(settings.model_name, version, "mlops.deploy", json.dumps(result))
    return result

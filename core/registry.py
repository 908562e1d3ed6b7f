"""The MLflow adapter: tracking runs, logging the model, registering versions and moving aliases.

Everything that talks to MLflow goes through here, so the target (SQLite file locally, a server with
Postgres and MinIO on kind) is only a tracking URI. Aliases carry the rollout roles: `champion` serves
live traffic, `challenger` is the candidate, `previous` is the champion before the last promotion.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from core.aliases import CHALLENGER, CHAMPION, PREVIOUS  # noqa: F401  (re-exported: the adapter names them)
from core.model import FraudScorer
from core.settings import Settings

MODEL_ARTIFACT = "fraud_model"
REFERENCE_ARTIFACT = "reference"


class FraudPyfunc(mlflow.pyfunc.PythonModel):
    """Makes the registered model usable with plain `mlflow.pyfunc.load_model(...).predict(frame)`."""

    # MLflow's own opt-out (its built-in models use it): no type-hint schema for predict, and none of the
    # warning it otherwise prints, unfilterably, wherever this class is imported.
    _skip_type_hint_validation = True

    def load_context(self, context):  # type: ignore[no-untyped-def]
        self.scorer = FraudScorer.load(context.artifacts[MODEL_ARTIFACT])

    # No type hints here on purpose: MLflow turns predict's hints into a schema and warns on pandas frames.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return self.scorer.score_frame(model_input)


def connect(settings: Settings) -> MlflowClient:
    """Point MLflow at the configured store and make sure the experiment exists."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(settings.tracking_uri)
    if client.get_experiment_by_name(settings.experiment_name) is None:
        # A file store (no server) needs an explicit artifact location, or MLflow writes ./mlruns in the cwd.
        location = None if settings.tracking_uri.startswith("http") else settings.artifact_root.as_uri()
        # Another step may create it at the same moment: that is fine.
        with contextlib.suppress(MlflowException):
            client.create_experiment(settings.experiment_name, artifact_location=location)
    mlflow.set_experiment(settings.experiment_name)
    return client


@dataclass
class LoggedModel:
    run_id: str
    model_uri: str


def log_training_run(
    settings: Settings,
    model_dir: str | Path,
    reference_path: str | Path,
    params: dict[str, Any],
    history: list[dict[str, float]],
    tags: dict[str, str],
) -> LoggedModel:
    """One MLflow run per training: params, per-epoch curves, and the model with its drift reference."""
    connect(settings)
    with mlflow.start_run(run_name=tags.get("mlops.run_name"), tags=tags) as run:
        mlflow.log_params(_flatten(params))
        for entry in history:
            step = int(entry["epoch"])
            mlflow.log_metrics({k: float(v) for k, v in entry.items() if k != "epoch"}, step=step)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=FraudPyfunc(),
            artifacts={MODEL_ARTIFACT: str(model_dir), REFERENCE_ARTIFACT: str(reference_path)},
            # Explicit requirements: inferring them would load the model in a subprocess on every run.
            pip_requirements=["torch==2.13.0", "pandas", "numpy"],
        )
        return LoggedModel(run_id=run.info.run_id, model_uri=info.model_uri)


def log_evaluation(settings: Settings, run_id: str, metrics: dict[str, float], report: dict[str, Any]) -> None:
    connect(settings)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items() if v == v})  # NaN is not loggable
        mlflow.log_dict(report, "evaluation/report.json")


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None  # no registered model, or no such alias yet


def set_alias(client: MlflowClient, name: str, alias: str, version: str | None) -> None:
    """Point `alias` at `version`, or remove it (None). Idempotent: removing an absent alias is not an error."""
    if version is None:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model_alias(name, alias)
        return
    client.set_registered_model_alias(name, alias, version)


def tag_version(client: MlflowClient, name: str, version: str, key: str, value: str) -> None:
    """Set one tag on a model version (MLflow caps tag values at 5,000 characters; we keep 4,000)."""
    client.set_model_version_tag(name, version, key, value[:4000])


def aliases_of(client: MlflowClient, name: str, version: str) -> list[str]:
    return sorted(client.get_model_version(name, version).aliases)


def register_version(settings: Settings, model_uri: str, run_id: str, tags: dict[str, str]) -> tuple[str, list[str]]:
    """Register a new version. The very first becomes `champion` (nothing to compare with); later ones
    become `challenger` and must win a guarded rollout before they serve live traffic."""
    client = connect(settings)
    name = settings.model_name
    first = alias_version(client, name, CHAMPION) is None
    version = mlflow.register_model(model_uri, name, tags=tags).version
    client.set_model_version_tag(name, version, "mlops.training_run_id", run_id)
    client.set_registered_model_alias(name, CHAMPION if first else CHALLENGER, version)
    return str(version), aliases_of(client, name, version)


def download_model(model_uri: str, destination: str | Path) -> tuple[Path, Path]:
    """Fetch a registered model's files: (FraudScorer directory, drift reference Parquet file).

    MLflow stores pyfunc artifacts under their original file names, so the paths are read from the
    MLmodel file rather than assumed.
    """
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(destination)))
    artifacts = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
    return local / artifacts[MODEL_ARTIFACT]["path"], local / artifacts[REFERENCE_ARTIFACT]["path"]


def load_alias(settings: Settings, alias: str, workdir: str | Path) -> tuple[str, FraudScorer, Path] | None:
    """(version, scorer, reference file under `workdir`) of the version holding `alias`, or None."""
    client = connect(settings)
    version = alias_version(client, settings.model_name, alias)
    if version is None:
        return None
    destination = Path(workdir) / f"{alias}-v{version}"
    model_dir, reference = download_model(f"models:/{settings.model_name}/{version}", destination)
    return version, FraudScorer.load(model_dir), reference


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat

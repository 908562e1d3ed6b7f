"""KFP v2 lightweight components: thin wrappers that move artifacts in and out of `components.steps`.

`from __future__ import annotations` must stay out of this file: KFP reads the annotations as types.
KFP ships each function's source to the executor on its own, so every import lives inside the body.
The project itself is installed in the executor's environment (the venv locally, the image on kind),
hence `install_kfp_package=False`: no pip install at step start.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from core.settings import get_settings

IMAGE = get_settings().image


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest_op(run_id: str, data_path: str, rows: int, seed: int, data: Output[Dataset]) -> str:
    """Bring the data into the run (a given Parquet file, or `rows` generated transactions)."""
    from components.steps import ingest
    from core.settings import get_settings

    sha = ingest(get_settings(), run_id, data_path, rows, seed, data.path)
    data.metadata["sha256"] = sha
    return sha


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate_op(
    run_id: str, data: Input[Dataset], min_rows: int, data_docs: Output[HTML], summary: Output[Dataset]
) -> str:
    """Great Expectations gate: fails the run, naming the failed expectations, when the data is bad."""
    import json
    import os

    from components.steps import validate
    from core.settings import get_settings

    os.makedirs(summary.path, exist_ok=True)
    docs_dir = os.path.join(summary.path, "data_docs")
    result = validate(get_settings(), run_id, data.path, docs_dir, data_docs.path, min_rows)
    with open(os.path.join(summary.path, "summary.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    return f"passed {result['evaluated']} of {result['evaluated']} expectations on {result['rows']} rows"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def drift_check_op(run_id: str, data: Input[Dataset], report: Output[HTML], metrics: Output[Metrics]) -> float:
    """Evidently drift against the champion's training reference; -1.0 when there is no champion yet."""
    import tempfile

    from components.steps import drift_check
    from core.settings import get_settings

    with tempfile.TemporaryDirectory() as workdir:
        result = drift_check(get_settings(), data.path, report.path, workdir, run_id)
    share = result["drift_share"]
    if share is None:
        return -1.0
    metrics.log_metric("drift_share", share)
    metrics.log_metric("drifted_columns", len(result["drifted_columns"]))
    return float(share)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_op(
    run_id: str,
    data: Input[Dataset],
    data_sha: str,
    workers: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    inject_failure_at_epoch: int,
    model: Output[Model],
    metrics: Output[Metrics],
) -> NamedTuple("TrainOutputs", [("mlflow_run_id", str), ("model_uri", str), ("checkpoint", str)]):
    """Ray Train DDP training with per-epoch checkpoints; logs the run and the model to MLflow."""
    from collections import namedtuple

    from components.steps import train
    from components.train import TrainParams
    from core.settings import get_settings

    settings = get_settings()
    params = TrainParams(
        workers=workers,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        max_failures=settings.train_max_failures,
        inject_failure_at_epoch=inject_failure_at_epoch or None,
    )
    # MLOPS_TARGET=kind: `train` runs this training as a KubeRay RayJob (components.rayjob.RayJobTraining,
    # checkpoints and the model on MinIO); local: Ray in this process tree. Chosen by `training_backend`.
    result = train(settings, run_id, data.path, data_sha, params, model.path)
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    metrics.log_metric("restarts", result.restarts)
    model.metadata.update({"mlflow_run_id": result.mlflow_run_id, "model_uri": result.model_uri})
    outputs = namedtuple("TrainOutputs", ["mlflow_run_id", "model_uri", "checkpoint"])
    return outputs(result.mlflow_run_id, result.model_uri, result.checkpoint)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_op(
    run_id: str,
    data: Input[Dataset],
    model: Input[Model],
    mlflow_run_id: str,
    min_pr_auc: float,
    max_pr_auc_drop: float,
    max_ece: float,
    metrics: Output[Metrics],
    report: Output[Dataset],
) -> float:
    """Holdout metrics, per-slice gaps, champion comparison; fails the run when the offline gate says no."""
    import json
    import tempfile

    from components.evaluate import GateTolerances
    from components.steps import evaluate
    from core.settings import get_settings

    tolerances = GateTolerances(min_pr_auc=min_pr_auc, max_pr_auc_drop=max_pr_auc_drop, max_ece=max_ece)
    with tempfile.TemporaryDirectory() as workdir:
        result = evaluate(get_settings(), run_id, data.path, model.path, mlflow_run_id, tolerances, workdir)
    for name, value in result.metrics.items():
        if value == value:  # skip NaN
            metrics.log_metric(name, value)
    with open(report.path, "w") as handle:
        json.dump(result.to_dict(), handle, indent=2)
    return float(result.metrics["pr_auc"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register_op(
    run_id: str, model_uri: str, mlflow_run_id: str, data_sha: str, validation: str, checkpoint: str, pr_auc: float
) -> NamedTuple("RegisterOutputs", [("version", str), ("aliases", str)]):
    """New MLflow model version with lineage tags; `champion` if it is the first, else `challenger`."""
    import json
    from collections import namedtuple

    from components.steps import register
    from core.settings import get_settings

    version, aliases = register(get_settings(), run_id, model_uri, mlflow_run_id, data_sha, validation, checkpoint)
    outputs = namedtuple("RegisterOutputs", ["version", "aliases"])
    return outputs(version, json.dumps(aliases))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy_op(run_id: str, version: str, aliases: str, enabled: bool) -> str:
    """Ask the rollout controller to roll the new challenger out (or place a first champion); skips clearly
    when no platform is running. Returns the outcome as JSON."""
    import json

    from components.steps import deploy
    from core.settings import get_settings

    if not enabled:
        return json.dumps({"action": "disabled", "version": version, "reason": "deploy=False"})
    return json.dumps(deploy(get_settings(), run_id, version, json.loads(aliases)))

"""The training pipeline: ingest → validate → (drift check) → train → evaluate → register → deploy.

Gates are failing steps: `validate` and `evaluate` raise when the data or the model is not good
enough, KFP stops the run there, and `register` never runs, so nothing reaches the registry. The
drift check is informational here: it reports, it does not stop the run. `deploy` hands the new
version to the rollout controller (a guarded rollout, not a switch), and skips when no platform runs.
"""

from kfp import dsl

from components.kfp_components import (
    deploy_op,
    drift_check_op,
    evaluate_op,
    ingest_op,
    register_op,
    train_op,
    validate_op,
)

PIPELINE_NAME = "card-fraud-training"


@dsl.pipeline(name=PIPELINE_NAME, description="Validate, train with Ray, evaluate and register a fraud model")
def training_pipeline(
    run_id: str,
    data_path: str = "",
    rows: int = 50_000,
    seed: int = 0,
    min_rows: int = 1_000,
    workers: int = 2,
    epochs: int = 6,
    batch_size: int = 512,
    learning_rate: float = 3e-3,
    inject_failure_at_epoch: int = 0,
    min_pr_auc: float = 0.2,
    max_pr_auc_drop: float = 0.02,
    max_ece: float = 0.05,
    deploy: bool = True,
) -> None:
    ingest = ingest_op(run_id=run_id, data_path=data_path, rows=rows, seed=seed).set_display_name("ingest")
    validate = validate_op(run_id=run_id, data=ingest.outputs["data"], min_rows=min_rows).set_display_name("validate")
    # Drift runs before training so its reference is the champion as it was when this run started.
    drift = drift_check_op(run_id=run_id, data=ingest.outputs["data"]).after(validate).set_display_name("drift-check")
    train = (
        train_op(
            run_id=run_id,
            data=ingest.outputs["data"],
            data_sha=ingest.outputs["Output"],
            workers=workers,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            inject_failure_at_epoch=inject_failure_at_epoch,
        )
        .after(drift)
        .set_display_name("train")
    )
    evaluate = evaluate_op(
        run_id=run_id,
        data=ingest.outputs["data"],
        model=train.outputs["model"],
        mlflow_run_id=train.outputs["mlflow_run_id"],
        min_pr_auc=min_pr_auc,
        max_pr_auc_drop=max_pr_auc_drop,
        max_ece=max_ece,
    ).set_display_name("evaluate")
    register = register_op(
        run_id=run_id,
        model_uri=train.outputs["model_uri"],
        mlflow_run_id=train.outputs["mlflow_run_id"],
        data_sha=ingest.outputs["Output"],
        validation=validate.outputs["Output"],
        checkpoint=train.outputs["checkpoint"],
        pr_auc=evaluate.outputs["Output"],
    ).set_display_name("register")
    deploy_op(
        run_id=run_id,
        version=register.outputs["version"],
        aliases=register.outputs["aliases"],
        enabled=deploy,
    ).set_display_name("deploy")

"""The training pipeline on the cluster target: compile for KFP on kind, submit, follow, read the outcome.

The pipeline is the same `training_pipeline` as on the embedded default; compiling it for the cluster only
adds what a pod needs there, task by task:

- the project image (`settings.image`) as every step's container image;
- the platform's addresses as full cluster DNS names (KFP runs its pods in the `kubeflow` namespace, the
  platform lives in `settings.namespace`), `MLOPS_TARGET=kind` (the train step then runs Ray as a RayJob,
  see `components.rayjob`), and the settings the steps read;
- the MinIO credentials and the control-plane token from the platform Secret (`kfp.kubernetes`
  `use_secret_as_env`). A Secret can only be read in its own namespace, so a copy of the platform's Secret
  must exist in KFP's namespace under the same name (`PLATFORM_SECRET`).

A run's outcome is read back the way the local runner reads it (`pipelines.runner.outcome`): the model
version tagged with our `run_id` in MLflow; a failed run names the failed task from the KFP run's details.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kfp import compiler, dsl

from core.settings import Settings
from pipelines.runner import STEPS, RunResult, default_params, new_run_id, outcome
from pipelines.training import PIPELINE_NAME, training_pipeline

EXPERIMENT = "card-fraud"
PLATFORM_SECRET = "mlops-platform-secrets"
# platform Secret key -> environment variable of every step
SECRET_ENV = {
    "minio-root-user": "AWS_ACCESS_KEY_ID",
    "minio-root-password": "AWS_SECRET_ACCESS_KEY",
    "control-plane-token": "MLOPS_CONTROL_PLANE_TOKEN",
    "labels-token": "MLOPS_LABELS_TOKEN",
}
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELED", "SKIPPED")
DEFAULT_TIMEOUT_S = 3 * 3600.0
MAX_POLL_ERRORS = 5


class ClusterRunError(RuntimeError):
    """A run that cannot be submitted as asked (e.g. a host file as its data)."""


def service_domain(settings: Settings) -> str:
    """`settings.cluster_service_domain`, else `<settings.namespace>.svc.cluster.local`."""
    return settings.service_domain


def cluster_env(settings: Settings) -> dict[str, str]:
    """The plain environment of every pipeline step on the cluster (secrets come from `SECRET_ENV`)."""
    domain = service_domain(settings)
    return {
        "MLOPS_TARGET": "kind",
        "MLOPS_NAMESPACE": settings.namespace,
        "MLOPS_CLUSTER_SERVICE_DOMAIN": domain,
        "MLOPS_IMAGE": settings.image,
        "MLOPS_MLFLOW_TRACKING_URI": f"http://mlflow.{domain}:5000",
        "MLOPS_CONTROL_PLANE_URL": f"http://control-plane.{domain}:8700",
        "MLOPS_CONTROLLER_URL": f"http://controller.{domain}:8730",
        "MLFLOW_S3_ENDPOINT_URL": f"http://minio.{domain}:9000",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLOPS_MODEL_NAME": settings.model_name,
        "MLOPS_EXPERIMENT_NAME": settings.experiment_name,
        "MLOPS_TRAIN_MAX_FAILURES": str(settings.train_max_failures),
        "MLOPS_TRAIN_CLUSTER_RETRIES": str(settings.train_cluster_retries),
        "MLOPS_RECALL_AT_PRECISION": str(settings.recall_at_precision),
        "MLOPS_DECISION_THRESHOLD": str(settings.decision_threshold),
        "HOME": "/tmp",
        "RAY_USAGE_STATS_ENABLED": "0",
        "BENTOML_DO_NOT_TRACK": "true",
    }


def cluster_pipeline(settings: Settings, secret_name: str = PLATFORM_SECRET) -> Any:
    """`training_pipeline` rebuilt with every task set up for the cluster (image, env, secrets).

    The tasks are made by calling the pipeline's own function, then adjusted while still inside the
    pipeline being built; `training_pipeline` itself (what the local runner uses) is left as it is."""
    from kfp import kubernetes
    from kfp.dsl import pipeline_context

    env = cluster_env(settings)
    build = training_pipeline.pipeline_func

    @functools.wraps(build)
    def for_cluster(*args: Any, **kwargs: Any) -> None:
        build(*args, **kwargs)
        for task in pipeline_context.Pipeline.get_default_pipeline().tasks.values():
            task.set_container_image(settings.image)  # (and checks that the task is a container step)
            # One update: `set_env_variable` inspects the call stack each time, ~50 ms a variable.
            task.container_spec.env = {**(task.container_spec.env or {}), **env}
            kubernetes.use_secret_as_env(task, secret_name=secret_name, secret_key_to_env=SECRET_ENV)
            kubernetes.set_image_pull_policy(task, "IfNotPresent")

    return dsl.pipeline(name=PIPELINE_NAME, description=training_pipeline.component_spec.description)(for_cluster)


def compile_for_cluster(path: str | Path, settings: Settings, secret_name: str = PLATFORM_SECRET) -> Path:
    """The KFP IR YAML to submit to KFP on the cluster."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(cluster_pipeline(settings, secret_name), str(path))
    return path


def kfp_client(settings: Settings) -> Any:
    import kfp

    return kfp.Client(host=settings.kfp_host)


def run_arguments(settings: Settings, params: dict[str, Any], run_id: str) -> dict[str, Any]:
    if params.get("data_path"):
        raise ClusterRunError(
            f"--data {params['data_path']}: a file on this machine, which the cluster's pods cannot read; "
            "use --generate N (the ingest step generates the data in the cluster)"
        )
    return {**default_params(settings), **params, "run_id": run_id}


def submit(settings: Settings, params: dict[str, Any], run_id: str, client: Any = None) -> str:
    """Compile for the cluster and create a KFP run (experiment "card-fraud"); returns the KFP run id."""
    arguments = run_arguments(settings, params, run_id)
    with tempfile.TemporaryDirectory(prefix="mlops-kfp-") as scratch:
        package = compile_for_cluster(Path(scratch) / "training_pipeline.yaml", settings)
        try:
            client = client or kfp_client(settings)
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=arguments,
                run_name=f"{PIPELINE_NAME}-{run_id}",
                experiment_name=EXPERIMENT,
                enable_caching=False,  # a run must really run: each one trains on its own data and run id
            )
        except Exception as error:  # the KFP client raises urllib3, HTTP and API errors alike
            raise ClusterRunError(
                f"cannot submit to the KFP API at {settings.kfp_host} ({type(error).__name__}: {error}); "
                "is the cluster up (`make up`) and the API forwarded there (`make run` does it)?"
            ) from error
    return str(result.run_id)


def _state(value: Any) -> str:
    return str(value or "PENDING").split(".")[-1].upper()


def step_of(task_name: str | None) -> str | None:
    """A KFP task name ("train-op", "train", "train-op-driver") -> our step name, or None."""
    name = (task_name or "").strip().lower().removesuffix("-driver").removesuffix("-op")
    return name if name in STEPS else None


def task_states(run: Any) -> dict[str, str]:
    """Step -> state of a KFP run's tasks (the pipeline's steps only, not KFP's own DAG/driver tasks)."""
    details = getattr(getattr(run, "run_details", None), "task_details", None) or []
    states: dict[str, str] = {}
    for task in details:
        step = step_of(getattr(task, "display_name", None))
        if step is not None and not (step in states and states[step] == "FAILED"):
            states[step] = _state(getattr(task, "state", None))
    return dict(sorted(states.items(), key=lambda item: STEPS.index(item[0])))


def follow(
    client: Any,
    run_id: str,
    timeout: float = DEFAULT_TIMEOUT_S,
    on_progress: Callable[[str], None] | None = None,
    poll_seconds: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Poll the KFP run until it ends; returns its final state (SUCCEEDED, FAILED, CANCELED, SKIPPED).

    `on_progress` gets one line per change: the run's state, and each step's (`train: RUNNING`).
    Raises `TimeoutError` past `timeout` seconds (the run goes on in KFP)."""
    deadline = clock() + timeout
    seen: dict[str, str] = {}
    errors = 0
    while True:
        try:
            run = client.get_run(run_id)
            errors = 0
        except Exception:  # a dropped port-forward or a restarting API server: try again a few times
            errors += 1
            if errors > MAX_POLL_ERRORS or clock() >= deadline:
                raise
            sleep(poll_seconds)
            continue
        state = _state(getattr(run, "state", None))
        if on_progress:
            for key, value in {"run": state, **task_states(run)}.items():
                if seen.get(key) != value:
                    on_progress(f"KFP run {run_id}: {state}" if key == "run" else f"  {key}: {value}")
                    seen[key] = value
        if state in TERMINAL_STATES:
            return state
        if clock() >= deadline:
            raise TimeoutError(f"KFP run {run_id} still {state} after {timeout:.0f}s; it goes on in KFP")
        sleep(poll_seconds)


def failed_task(run: Any) -> tuple[str | None, str | None]:
    """(step, reason) of a failed KFP run: the earliest failed step and its error, else the run's error."""
    details = getattr(getattr(run, "run_details", None), "task_details", None) or []
    failed = [
        task
        for task in details
        if _state(getattr(task, "state", None)) == "FAILED" and step_of(getattr(task, "display_name", None))
    ]
    failed.sort(key=lambda task: STEPS.index(step_of(task.display_name) or ""))
    run_error = getattr(getattr(run, "error", None), "message", None)
    if not failed:
        return None, run_error
    task = failed[0]
    step = step_of(task.display_name)
    reason = getattr(getattr(task, "error", None), "message", None) or run_error or f"the {step} step failed"
    pod = getattr(task, "pod_name", None)
    if pod:
        reason += f" (logs: kubectl -n kubeflow logs {pod})"
    return step, reason


def run_on_cluster(
    settings: Settings,
    params: dict[str, Any],
    on_progress: Callable[[str], None] = print,
    run_id: str | None = None,
    client: Any = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    poll_seconds: float = 5.0,
) -> RunResult:
    """Submit the training pipeline to KFP, follow it to the end and say what it did: the same `RunResult`
    as the local runner (the version registered with this run's id in MLflow, or the step that failed)."""
    run_id = run_id or new_run_id()
    started = time.perf_counter()
    client = client or kfp_client(settings)
    kfp_run_id = submit(settings, params, run_id, client)
    on_progress(f"submitted run {run_id} to KFP at {settings.kfp_host}: KFP run {kfp_run_id}")
    try:
        state = follow(client, kfp_run_id, timeout, on_progress, poll_seconds=poll_seconds)
    except TimeoutError as error:
        return RunResult("FAILED", run_id, settings.model_name, reason=str(error), seconds=_since(started))
    if state == "SUCCEEDED":
        return outcome(settings, run_id, None, _since(started))
    step, reason = failed_task(client.get_run(kfp_run_id))
    return RunResult(
        "FAILED",
        run_id,
        settings.model_name,
        failed_step=step,
        reason=reason or f"KFP run {kfp_run_id} ended {state}",
        seconds=_since(started),
    )


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 1)

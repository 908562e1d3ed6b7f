"""The training step on the cluster target: the same training code as a KubeRay `RayJob`.

Three layers, each testable on its own:

- `build_rayjob(...)`: a pure function, the `ray.io/v1` `RayJob` manifest. Its entrypoint runs
  `python -m components.train_entry` (which calls `components.train.train_model`, exactly like the local
  path) with checkpoints on MinIO (`s3://checkpoints`), so a retry of the job resumes from the latest one.
- `RayJobRunner`: a thin adapter over the Kubernetes API (`kubernetes` client, `CustomObjectsApi`):
  create, follow `status.jobDeploymentStatus` / `status.jobStatus` to the end, read the outcome object the
  entry wrote on S3, delete.
- `RayJobTraining`: the kind target's training backend (`components.steps.training_backend`), with the
  same `.train(data_path, run_name, params, model_dir) -> TrainOutcome` as the local one: it uploads the
  step's data to MinIO, runs the RayJob, and downloads the model directory the job uploaded.

Cluster layout: the head runs the driver, Ray Train's controller and one training worker (`num-cpus: 1`);
the worker group has `workers - 1` pods of one training worker each. That is the smallest layout for
`workers` Ray Train workers (one pod fewer than a CPU-less head), which matters in kind's memory budget.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from components.train import TrainOutcome, TrainParams, copy_tree, read_text
from core.settings import Settings

RAYJOB_GROUP, RAYJOB_VERSION, RAYJOB_PLURAL = "ray.io", "v1", "rayjobs"
ENTRY_MODULE = "components.train_entry"
PLATFORM_SECRET = "mlops-platform-secrets"  # the chart's generated Secret (templates/secret.yaml)
SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "minio-root-user", "AWS_SECRET_ACCESS_KEY": "minio-root-password"}
OUTCOME_ANNOTATION = "mlops.io/outcome-uri"
STORAGE_ANNOTATION = "mlops.io/storage-uri"
MAX_NAME_LENGTH = 47  # KubeRay: RayCluster names <= 53 characters, and it appends 6 to the RayJob's
RUN_AS_USER = 10001  # the project image's user (Dockerfile)
OBJECT_STORE_BYTES = 128 * 1024**2  # fits the /dev/shm volume below
SHM_SIZE = "256Mi"

# Requests: what the scheduler counts on kind's one worker (see the CPU budget in infra/README.md); the
# limits let training use whole cores when they are free.
HEAD_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "300m", "memory": "1Gi"},
    "limits": {"cpu": "2", "memory": "2Gi"},
}
WORKER_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "300m", "memory": "512Mi"},
    "limits": {"cpu": "1", "memory": "1536Mi"},
}
SUBMITTER_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "50m", "memory": "256Mi"},
    "limits": {"cpu": "500m", "memory": "1Gi"},
}

# KubeRay puts the entrypoint into the submitter's `bash -c` line, and `ray job submit` joins its words and
# runs them through a shell again: only words that no shell changes are safe.
_SAFE_WORD = re.compile(r"^[A-Za-z0-9_./:=@%+,-]+$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def rayjob_name(run_name: str) -> str:
    """A valid RayJob name for a run: a DNS-1035 label (lower case, starts with a letter) of at most 47."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"train-{name}"
    name = name[:MAX_NAME_LENGTH].rstrip("-")
    if not _DNS_1035.match(name):
        raise ValueError(f"cannot make a RayJob name from {run_name!r}")
    return name


def train_entry_args(
    *, data_uri: str, run_name: str, params: TrainParams, model_uri: str, outcome_uri: str
) -> list[str]:
    """The training entry's arguments, except `--storage` (which `build_rayjob` adds from `storage_uri`)."""
    args = [
        "--data", data_uri,
        "--run-name", run_name,
        "--model-out", model_uri,
        "--outcome", outcome_uri,
    ]  # fmt: skip
    return args + params.entry_args()


def _ray_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:  # pragma: no cover - ray is a project dependency
        return "2.60.0"


def _env(
    namespace: str, secret_name: str, s3_endpoint: str | None, extra: Mapping[str, str] | None
) -> list[dict[str, Any]]:
    endpoint = s3_endpoint or f"http://minio.{namespace}.svc.cluster.local:9000"
    plain = {
        "MLOPS_TARGET": "kind",
        "HOME": "/tmp",  # the root filesystem is read-only
        "PYTHONUNBUFFERED": "1",
        "RAY_TRAIN_V2_ENABLED": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env: list[dict[str, Any]] = [{"name": key, "value": value} for key, value in plain.items()]
    env += [
        {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}
        for variable, key in SECRET_KEYS.items()
    ]
    for key, value in (extra or {}).items():
        env = [item for item in env if item["name"] != key] + [{"name": key, "value": str(value)}]
    return env


def _security(uid: int) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return pod, container


def _pod_template(
    container_name: str,
    image: str,
    env: list[dict[str, Any]],
    resources: Mapping[str, Any],
    uid: int,
    labels: Mapping[str, str],
    *,
    shm: bool = True,
    restart_policy: str | None = None,
) -> dict[str, Any]:
    pod_security, container_security = _security(uid)
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}]
    if shm:  # Ray's object store lives in /dev/shm; a container's default is 64 MiB
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}})
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": pod_security,
        "containers": [
            {
                "name": container_name,
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "env": env,
                "resources": {kind: dict(values) for kind, values in resources.items()},
                "securityContext": container_security,
                "volumeMounts": mounts,
            }
        ],
        "volumes": volumes,
    }
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def build_rayjob(
    name: str,
    image: str,
    namespace: str,
    entrypoint_args: Sequence[str],
    workers: int,
    storage_uri: str,
    env: Mapping[str, str] | None = None,
    *,
    outcome_uri: str | None = None,
    secret_name: str = PLATFORM_SECRET,
    s3_endpoint: str | None = None,
    backoff_limit: int = 2,
    active_deadline_seconds: int = 3600,
    ttl_seconds_after_finished: int = 600,
    run_as_user: int = RUN_AS_USER,
    head_resources: Mapping[str, Any] = HEAD_RESOURCES,
    worker_resources: Mapping[str, Any] = WORKER_RESOURCES,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The KubeRay `RayJob` that trains with `workers` Ray Train workers, checkpointing to `storage_uri`.

    - `entrypoint`: `python -m components.train_entry --storage STORAGE_URI ENTRYPOINT_ARGS...`;
    - `backoffLimit`: retries of the whole job after the driver fails; each retry runs the entrypoint again
      with the same run name and storage, so Ray Train resumes from the latest checkpoint on MinIO. (A dead
      Ray Train *worker* is handled inside one attempt, by `FailureConfig(max_failures)`.);
    - `activeDeadlineSeconds`: the job fails past it; `shutdownAfterJobFinishes` + `ttlSecondsAfterFinished`:
      the Ray cluster is deleted after the job ends (the RayJob object stays, with its status);
    - MinIO credentials from the platform Secret (`secretKeyRef`), the endpoint in `MLFLOW_S3_ENDPOINT_URL`
      and `AWS_ENDPOINT_URL_S3`; non-root, read-only root filesystem, requests and limits everywhere.
    """
    if rayjob_name(name) != name:
        raise ValueError(f"RayJob name {name!r} is not a DNS-1035 label of <= {MAX_NAME_LENGTH} characters")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not storage_uri.startswith("s3://"):
        raise ValueError(f"storage_uri must be s3://... (the Ray pods share no disk), got {storage_uri!r}")
    if backoff_limit < 0 or active_deadline_seconds <= 0 or ttl_seconds_after_finished < 0:
        raise ValueError("backoff_limit and ttl_seconds_after_finished must be >= 0, active_deadline_seconds > 0")
    words = ["python", "-m", ENTRY_MODULE, "--storage", storage_uri, *entrypoint_args]
    unsafe = [word for word in words if not _SAFE_WORD.match(word)]
    if unsafe:
        raise ValueError(f"entrypoint words a shell would change (KubeRay runs it through two): {unsafe}")
    pod_labels = {
        "app.kubernetes.io/part-of": "mlops-platform",
        "app.kubernetes.io/component": "training",
        "mlops.io/rayjob": name,
        **(labels or {}),
    }
    container_env = _env(namespace, secret_name, s3_endpoint, env)
    object_store = str(OBJECT_STORE_BYTES)
    worker_replicas = workers - 1
    annotations = {STORAGE_ANNOTATION: storage_uri}
    if outcome_uri:
        annotations[OUTCOME_ANNOTATION] = outcome_uri
    return {
        "apiVersion": f"{RAYJOB_GROUP}/{RAYJOB_VERSION}",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace, "labels": pod_labels, "annotations": annotations},
        "spec": {
            "entrypoint": shlex.join(words),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": ttl_seconds_after_finished,
            "backoffLimit": backoff_limit,
            "activeDeadlineSeconds": active_deadline_seconds,
            "rayClusterSpec": {
                "rayVersion": _ray_version(),
                "enableInTreeAutoscaling": False,
                "headGroupSpec": {
                    "rayStartParams": {
                        "dashboard-host": "0.0.0.0",
                        "num-cpus": "1",
                        "object-store-memory": object_store,
                    },
                    "template": _pod_template(
                        "ray-head", image, container_env, head_resources, run_as_user, pod_labels
                    ),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "workers",
                        "replicas": worker_replicas,
                        "minReplicas": worker_replicas,
                        "maxReplicas": worker_replicas,
                        "rayStartParams": {"num-cpus": "1", "object-store-memory": object_store},
                        "template": _pod_template(
                            "ray-worker", image, container_env, worker_resources, run_as_user, pod_labels
                        ),
                    }
                ],
            },
            # KubeRay fills in the `ray job submit` command; we give the pod our image and security settings.
            "submitterPodTemplate": _pod_template(
                "ray-job-submitter",
                image,
                [{"name": "HOME", "value": "/tmp"}, {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}],
                SUBMITTER_RESOURCES,
                run_as_user,
                pod_labels,
                shm=False,
                restart_policy="Never",
            ),
        },
    }


# --- following a RayJob ----------------------------------------------------------------------------------


class RayJobFailed(RuntimeError):
    """The RayJob ended without success (or never did); the message says how, with the driver's last lines."""

    def __init__(self, message: str, status: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = dict(status or {})


class RayJobTimeout(RayJobFailed):
    """`wait` gave up before the RayJob ended."""


FAILED_DEPLOYMENTS = ("Failed", "ValidationFailed")


def job_state(status: Mapping[str, Any]) -> str:
    """The state of a RayJob from its status: "succeeded", "failed" or "running".

    `jobStatus` is the Ray job's own (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); `jobDeploymentStatus` is
    KubeRay's (Initializing, Running, Complete, Failed, ValidationFailed, Retrying, ...). A FAILED job status
    is not final while KubeRay may still retry it (backoffLimit): only the deployment status decides that.
    """
    deployment = status.get("jobDeploymentStatus") or ""
    job = status.get("jobStatus") or ""
    if job == "SUCCEEDED":
        return "succeeded"  # the outcome object is written before the driver exits
    if deployment in FAILED_DEPLOYMENTS:
        return "failed"
    if deployment == "Complete":
        return "failed"  # complete, and not SUCCEEDED: FAILED or STOPPED
    return "running"


def _describe(status: Mapping[str, Any]) -> str:
    parts = [f"deployment={status.get('jobDeploymentStatus') or 'New'}", f"job={status.get('jobStatus') or '-'}"]
    if status.get("failed"):
        parts.append(f"failed attempts={status['failed']}")
    if status.get("reason"):
        parts.append(f"reason={status['reason']}")
    return " ".join(parts)


def _read_outcome(uri: str) -> dict[str, Any]:
    return json.loads(read_text(uri))


def load_kube_config(kube_context: str | None = None) -> None:
    """In a pod (a KFP step): the service account; elsewhere: the kubeconfig's `kube_context`."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(context=kube_context or None)  # None: the current context


@dataclass
class RayJobRunner:
    """Create, follow and delete RayJobs in one namespace. `api` is a `CustomObjectsApi` (a fake in tests),
    `core_api` a `CoreV1Api` used only to quote the driver's log on failure."""

    namespace: str
    api: Any = None
    core_api: Any = None
    kube_context: str | None = None
    read_outcome: Callable[[str], dict[str, Any]] = _read_outcome
    poll_seconds: float = 5.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.api is None or self.core_api is None:
            from kubernetes import client

            load_kube_config(self.kube_context)
            self.api = self.api or client.CustomObjectsApi()
            self.core_api = self.core_api or client.CoreV1Api()

    def _args(self) -> dict[str, str]:
        return {"group": RAYJOB_GROUP, "version": RAYJOB_VERSION, "namespace": self.namespace, "plural": RAYJOB_PLURAL}

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(name=name, **self._args())
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def submit(self, manifest: Mapping[str, Any]) -> str:
        """Create the RayJob. One of the same name (a retried pipeline step) is followed if it still runs or
        succeeded ("adopted"), and replaced if it failed ("replaced": same run name, so training resumes
        from its checkpoints). Returns "created", "adopted" or "replaced"."""
        from kubernetes.client.exceptions import ApiException

        name = manifest["metadata"]["name"]
        try:
            self.api.create_namespaced_custom_object(body=dict(manifest), **self._args())
            return "created"
        except ApiException as error:
            if error.status != 409:
                raise RayJobFailed(f"cannot create RayJob {self.namespace}/{name}: {_api_reason(error)}") from None
        existing = self.get(name)
        if existing is not None and job_state(existing.get("status") or {}) != "failed":
            return "adopted"
        self.delete(name)
        deadline = self.clock() + 120
        while self.get(name) is not None:
            if self.clock() > deadline:
                raise RayJobFailed(f"the failed RayJob {self.namespace}/{name} was not deleted within 120 s")
            self.sleep(1.0)
        self.api.create_namespaced_custom_object(body=dict(manifest), **self._args())
        return "replaced"

    def wait(
        self,
        name: str,
        timeout: float,
        on_progress: Callable[[str], None] | None = None,
        outcome_uri: str | None = None,
    ) -> dict[str, Any]:
        """Poll until the RayJob ends; return the outcome JSON the training entry wrote (from `outcome_uri`,
        by default the job's `mlops.io/outcome-uri` annotation). Raises `RayJobFailed` naming the state, the
        reason, KubeRay's message and the driver's last log lines; `RayJobTimeout` past `timeout` seconds."""
        deadline = self.clock() + timeout
        last = None
        while True:
            job = self.get(name)
            if job is None:
                raise RayJobFailed(f"RayJob {self.namespace}/{name} does not exist (deleted while it ran?)")
            status = job.get("status") or {}
            described = _describe(status)
            if on_progress and described != last:
                on_progress(f"rayjob {name}: {described}")
            last = described
            state = job_state(status)
            if state == "succeeded":
                uri = outcome_uri or (job.get("metadata", {}).get("annotations") or {}).get(OUTCOME_ANNOTATION)
                if not uri:
                    raise RayJobFailed(f"RayJob {name} succeeded but names no outcome ({OUTCOME_ANNOTATION})", status)
                try:
                    return self.read_outcome(uri)
                except (OSError, ValueError) as error:
                    raise RayJobFailed(
                        f"RayJob {name} succeeded but its outcome {uri} is unreadable: {error}"
                    ) from None
            if state == "failed":
                raise RayJobFailed(self._failure_message(name, status), status)
            if self.clock() >= deadline:
                raise RayJobTimeout(
                    f"RayJob {self.namespace}/{name} still not done after {timeout:.0f}s ({described})", status
                )
            self.sleep(self.poll_seconds)

    def _failure_message(self, name: str, status: Mapping[str, Any]) -> str:
        message = f"RayJob {self.namespace}/{name} failed ({_describe(status)})"
        if status.get("message"):
            message += f": {status['message']}"
        tail = self.driver_log_tail(name)
        if tail:
            message += "\ndriver log (last lines):\n" + tail
        return message

    def driver_log_tail(self, name: str, lines: int = 20) -> str:
        """The submitter pod's log (`ray job logs --follow`: the driver's output); "" when unavailable."""
        try:
            pods = self.core_api.list_namespaced_pod(self.namespace, label_selector=f"job-name={name}").items
            if not pods:
                return ""
            newest = max(pods, key=lambda pod: str(pod.metadata.creation_timestamp or ""))
            return str(
                self.core_api.read_namespaced_pod_log(newest.metadata.name, self.namespace, tail_lines=lines)
            ).rstrip()
        except Exception:  # best effort: the failure is reported either way
            return ""

    def delete(self, name: str) -> bool:
        """Delete the RayJob (and with it its Ray cluster and submitter); False when there was none."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.delete_namespaced_custom_object(name=name, propagation_policy="Background", **self._args())
            return True
        except ApiException as error:
            if error.status == 404:
                return False
            raise


def _api_reason(error: Any) -> str:
    try:
        return json.loads(error.body).get("message") or str(error.reason)
    except (TypeError, ValueError, AttributeError):
        return f"{error.status} {error.reason}"


# --- the kind target's training backend -------------------------------------------------------------------


@dataclass
class RayJobTraining:
    """`.train(...)` as a RayJob: data up to MinIO, the RayJob run and followed, the model directory back.

    Everything of one run lives under `s3://checkpoints/<run_name>/`: `input/data.parquet`, Ray Train's
    checkpoints, `model/` and `outcome.json`."""

    settings: Settings
    runner: RayJobRunner | None = None
    storage_uri: str = "s3://checkpoints"
    secret_name: str = PLATFORM_SECRET
    backoff_limit: int | None = None  # None: the setting `train_cluster_retries` (MLOPS_TRAIN_CLUSTER_RETRIES)
    active_deadline_seconds: int = 3600
    on_progress: Callable[[str], None] = field(default=lambda line: print(line, flush=True))

    def __post_init__(self) -> None:
        # A new Ray cluster after a lost one: KubeRay's retry of the RayJob is what `train_in_fresh_clusters`
        # does locally, so both follow the one setting.
        if self.backoff_limit is None:
            self.backoff_limit = self.settings.train_cluster_retries

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    def manifest(self, run_name: str, params: TrainParams) -> dict[str, Any]:
        base = f"{self.storage_uri.rstrip('/')}/{run_name}"
        domain = self.settings.service_domain
        outcome_uri = f"{base}/outcome.json"
        args = train_entry_args(
            data_uri=f"{base}/input/data.parquet",
            run_name=run_name,
            params=params,
            model_uri=f"{base}/model",
            outcome_uri=outcome_uri,
        )
        return build_rayjob(
            rayjob_name(run_name),
            self.settings.image,
            self.namespace,
            args,
            params.workers,
            self.storage_uri.rstrip("/"),
            outcome_uri=outcome_uri,
            secret_name=self.secret_name,
            s3_endpoint=f"http://minio.{domain}:9000",
            backoff_limit=int(self.backoff_limit or 0),
            active_deadline_seconds=self.active_deadline_seconds,
        )

    def train(self, data_path: Any, run_name: str, params: TrainParams, model_dir: Any) -> TrainOutcome:
        manifest = self.manifest(run_name, params)
        name = manifest["metadata"]["name"]
        base = f"{self.storage_uri.rstrip('/')}/{run_name}"
        copy_tree(data_path, f"{base}/input/data.parquet")
        runner = self.runner or RayJobRunner(self.namespace, kube_context=self.settings.kube_context or None)
        how = runner.submit(manifest)
        self.on_progress(f"rayjob {self.namespace}/{name} {how}: {params.workers} Ray Train workers, run {run_name}")
        # Long enough for every attempt KubeRay may make, each bounded by activeDeadlineSeconds.
        timeout = self.active_deadline_seconds * (int(self.backoff_limit or 0) + 1) + 600
        outcome = runner.wait(name, timeout, on_progress=self.on_progress)
        copy_tree(outcome["model_dir"], model_dir)
        runner.delete(name)  # success: nothing left to inspect (a failed RayJob is kept for `kubectl describe`)
        return TrainOutcome(**{**outcome, "model_dir": str(model_dir)})

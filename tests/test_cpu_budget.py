"""The CPU budget of the kind path, from the rendered requests: every one of our pods lands on kind's one
worker node, and a Pending Ray worker (requests over the node's CPUs) stalls `make run` until its deadline.

Budget (infra/README.md, "Resources"): the platform chart (drift monitor on: the worst case), a training
RayJob (the default workers), KFP 2.17's standalone pods and the KubeRay operator request at most
`CPU_BUDGET` cores together, so that a Docker with 4 CPUs schedules everything with room to spare, and one
with 3 still does. KFP's and KubeRay's requests are upstream's, summed from their 2.17.0 / 1.7.0 manifests
(constants here: those manifests are not rendered offline).
"""

from __future__ import annotations

from typing import Any

import pytest

from components.rayjob import RayJobTraining
from components.train import TrainParams
from core.settings import Settings
from tests.test_helm_chart import Helm, helm, render  # noqa: F401

CPU_BUDGET = 2.5
# KFP 2.17.0 env/platform-agnostic: ml-pipeline 250m, persistence agent 120m, mysql 100m, SeaweedFS 64m,
# visualization server 30m, UI 10m, Argo's workflow controller ~100m; KubeRay operator 1.7.0: 100m.
KFP_CPU = 0.7
KUBERAY_OPERATOR_CPU = 0.1


def cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_cpu_request(spec: dict[str, Any]) -> float:
    """What the scheduler counts for one pod: the larger of its containers' sum and its largest init container."""
    main = sum(cpu(c.get("resources", {}).get("requests", {}).get("cpu", 0)) for c in spec["containers"])
    init = [cpu(c.get("resources", {}).get("requests", {}).get("cpu", 0)) for c in spec.get("initContainers", [])]
    return max([main, *init])


def chart_cpu_requests(docs: list[dict[str, Any]]) -> dict[str, float]:
    """Long-running workloads at their replica counts (the bucket hook Job ends before training starts)."""
    return {
        f"{doc['kind']}/{doc['metadata']['name']}": pod_cpu_request(doc["spec"]["template"]["spec"])
        * doc["spec"].get("replicas", 1)
        for doc in docs
        if doc["kind"] in ("Deployment", "StatefulSet")
    }


def rayjob_cpu_requests(manifest: dict[str, Any]) -> dict[str, float]:
    cluster = manifest["spec"]["rayClusterSpec"]
    found = {"RayJob/head": pod_cpu_request(cluster["headGroupSpec"]["template"]["spec"])}
    for group in cluster["workerGroupSpecs"]:
        found[f"RayJob/{group['groupName']}"] = pod_cpu_request(group["template"]["spec"]) * group["replicas"]
    found["RayJob/submitter"] = pod_cpu_request(manifest["spec"]["submitterPodTemplate"]["spec"])
    return found


def budget_problems(requests: dict[str, float], budget: float = CPU_BUDGET) -> list[str]:
    total = sum(requests.values()) + KFP_CPU + KUBERAY_OPERATOR_CPU
    if total <= budget + 1e-9:
        return []
    biggest = sorted(requests.items(), key=lambda item: -item[1])[:5]
    return [f"CPU requests {total:.2f} exceed the budget of {budget} CPUs; largest: {biggest}"]


@pytest.fixture(scope="module")
def rayjob_requests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    settings = Settings(target="kind", home=tmp_path_factory.mktemp("home"))
    manifest = RayJobTraining(settings).manifest("train-budget", TrainParams())  # the default workers
    return rayjob_cpu_requests(manifest)


def test_the_chart_and_a_rayjob_fit_the_cpu_budget(helm: Helm, rayjob_requests: dict[str, float]) -> None:  # noqa: F811
    chart = chart_cpu_requests(render(helm, "--set", "driftMonitor.enabled=true"))
    assert len(chart) >= 10 and len(rayjob_requests) == 3
    assert budget_problems(chart | rayjob_requests) == []


def test_the_old_requests_are_over_the_budget(helm: Helm) -> None:  # noqa: F811
    """The defect: the requests before (gateway 250m, slots and MLflow 200m, Ray head and worker 500m, ...)
    came to ~3.5 CPUs with KFP and KubeRay, and the Ray worker stayed Pending on smaller machines."""
    old = render(
        helm,
        "--set", "driftMonitor.enabled=true",
        "--set", "gateway.resources.requests.cpu=250m",
        "--set", "slots.resources.requests.cpu=200m",
        "--set", "mlflow.resources.requests.cpu=200m",
        "--set", "controlPlane.resources.requests.cpu=100m",
        "--set", "prometheus.resources.requests.cpu=100m",
        "--set", "minio.resources.requests.cpu=100m",
    )  # fmt: skip
    old_rayjob = {"RayJob/head": 0.5, "RayJob/workers": 0.5, "RayJob/submitter": 0.1}
    problems = budget_problems(chart_cpu_requests(old) | old_rayjob)
    assert problems and "exceed the budget" in problems[0]


def test_more_training_workers_than_the_budget_allows_are_caught(tmp_path_factory: pytest.TempPathFactory) -> None:
    settings = Settings(target="kind", home=tmp_path_factory.mktemp("home"))
    manifest = RayJobTraining(settings).manifest("train-budget", TrainParams(workers=8))
    assert budget_problems(rayjob_cpu_requests(manifest)) != []


def test_an_init_container_counts_when_it_asks_more_than_the_containers() -> None:
    spec = {
        "containers": [{"resources": {"requests": {"cpu": "100m"}}}, {"resources": {"requests": {"cpu": "50m"}}}],
        "initContainers": [{"resources": {"requests": {"cpu": "1"}}}],
    }
    assert pod_cpu_request(spec) == 1.0
    assert pod_cpu_request({"containers": spec["containers"]}) == pytest.approx(0.15)

"""Every image the platform pulls, checked against infra/images.yaml: pinned, from an allowed registry, not
on the deny list of repositories known to be gone. The images come from where they are really used: the
chart rendered with both value sets (init containers included), the RayJob the kind target submits, the KFP
pipeline compiled for the cluster, and the kind node image. Each rule is shown to catch a planted image."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.rayjob import RayJobTraining
from components.train import TrainParams
from core.settings import Settings
from pipelines.cluster import compile_for_cluster
from tests.test_helm_chart import Helm, containers, helm, render  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def _load_policy_module() -> Any:
    spec = importlib.util.spec_from_file_location("image_policy", REPO / "infra" / "tools" / "image_policy.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["image_policy"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


image_policy = _load_policy_module()
POLICY = image_policy.load_policy()


def chart_images(docs: list[dict[str, Any]]) -> dict[str, str]:
    found = {}
    for doc in docs:
        for name, container in containers(doc):
            found[name] = container["image"]
    return found


def rayjob_images(manifest: dict[str, Any]) -> dict[str, str]:
    cluster = manifest["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"], "submitter": manifest["spec"]["submitterPodTemplate"]}
    pods |= {group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]}
    return {
        f"RayJob/{role}/{container['name']}": container["image"]
        for role, pod in pods.items()
        for container in pod["spec"]["containers"]
    }


@pytest.fixture(scope="module")
def platform_images(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:  # noqa: F811
    root = tmp_path_factory.mktemp("images")
    settings = Settings(target="kind", home=root / "home")  # the defaults `make run` uses
    # The chart as `make up` installs it (ci/nondefault-values.yaml points the project image at a registry of
    # one's own, which is the user's to allow).
    images = chart_images(render(helm))
    params = TrainParams(workers=2, epochs=1, batch_size=64, learning_rate=0.01, seed=1)
    images |= rayjob_images(RayJobTraining(settings).manifest("train-images", params))
    ir = next(yaml.safe_load_all(compile_for_cluster(root / "cluster.yaml", settings).read_text()))
    for name, executor in ir["deploymentSpec"]["executors"].items():
        images[f"pipeline/{name}"] = executor["container"]["image"]
    kind = yaml.safe_load((REPO / "infra" / "kind" / "cluster.yaml").read_text())
    for index, node in enumerate(kind["nodes"]):
        images[f"kind/node{index}"] = node["image"]
    return images


def test_every_platform_image_meets_the_policy(platform_images: dict[str, str]) -> None:
    assert len(platform_images) >= 20  # the chart (init containers too), the RayJob, the 7 pipeline steps, kind
    assert image_policy.image_problems(platform_images, POLICY) == []


def test_the_object_store_image_is_no_longer_minio_from_docker_hub(platform_images: dict[str, str]) -> None:
    store = {where: image for where, image in platform_images.items() if where.startswith("Deployment/minio ")}
    assert store and all(image.startswith("ghcr.io/chrislusf/seaweedfs:") for image in store.values()), store


def test_the_chart_with_the_old_minio_images_is_caught(helm: Helm) -> None:  # noqa: F811
    docs = render(
        helm, "--set", "minio.image.repository=minio/minio", "--set", "minio.image.tag=RELEASE.2025-09-07T16-13-09Z"
    )
    problems = image_policy.image_problems(chart_images(docs), POLICY)
    assert problems and all("docker.io/minio/minio is denied" in line for line in problems), problems


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("minio/minio:RELEASE.2025-09-07T16-13-09Z", "docker.io/minio/minio is denied"),
        ("docker.io/minio/mc:RELEASE.2025-08-13T08-35-41Z", "docker.io/minio/mc is denied"),
        ("bitnami/postgresql:16.4.0", "docker.io/bitnami/postgresql is denied"),
        ("index.docker.io/bitnami/redis:7.2", "docker.io/bitnami/redis is denied"),
        ("evil.example.com/postgres:16", "registry evil.example.com is not on the allow-list"),
        ("localhost:5000/mlops-template:0.1.0", "registry localhost:5000 is not on the allow-list"),
        ("postgres:latest", "not pinned"),
        ("ghcr.io/chrislusf/seaweedfs", "not pinned"),
        ("postgres@sha256:abc", "malformed digest"),
    ],
)
def test_a_planted_bad_image_is_caught(image: str, expected: str) -> None:
    problems = image_policy.image_problems({"planted": image}, POLICY)
    assert any(expected in line for line in problems), problems


@pytest.mark.parametrize(
    "image",
    [
        "postgres:16.10-bookworm",
        "ghcr.io/chrislusf/seaweedfs:4.34",
        "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z",  # allowed registry, not denied: the tag is on you
        "mlops-template:0.1.0",
        "kindest/node:v1.31.14@sha256:" + "0" * 64,
        "registry.k8s.io/pause:3.10",
    ],
)
def test_a_good_image_passes(image: str) -> None:
    assert image_policy.image_problems({"good": image}, POLICY) == []


def test_image_references_are_parsed_like_the_container_runtime_does() -> None:
    parse = image_policy.parse_image
    assert parse("postgres:16").full_repository == "docker.io/library/postgres"
    assert parse("prom/prometheus:v3.5.0").full_repository == "docker.io/prom/prometheus"
    assert parse("ghcr.io/chrislusf/seaweedfs:4.34").registry == "ghcr.io"
    assert parse("localhost:5000/x:1").registry == "localhost:5000"
    ref = parse("kindest/node:v1.31.14@sha256:" + "a" * 64)
    assert (ref.tag, ref.digest) == ("v1.31.14", "sha256:" + "a" * 64)
    assert parse("mlops-template:0.1.0", frozenset({"mlops-template"})).registry == ""

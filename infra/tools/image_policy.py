"""The image policy of infra/images.yaml: pinned, from an allowed registry, not on the deny list.

A plain module (no project imports), loaded by the tests from its path like get_helm.py:

    policy = load_policy()
    problems = image_problems({"Deployment/minio": "minio/minio:RELEASE..."}, policy)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

POLICY_FILE = Path(__file__).resolve().parents[1] / "images.yaml"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class ImageRef:
    registry: str  # "" for a local image (no registry part, and not on Docker Hub's library either)
    repository: str  # without the registry: "library/postgres", "chrislusf/seaweedfs"
    tag: str
    digest: str

    @property
    def full_repository(self) -> str:
        return f"{self.registry}/{self.repository}" if self.registry else self.repository


@dataclass(frozen=True)
class Policy:
    allowed_registries: frozenset[str]
    local_images: frozenset[str]
    denied: tuple[tuple[str, str], ...]  # (pattern, reason)


def load_policy(path: Path = POLICY_FILE) -> Policy:
    data = yaml.safe_load(path.read_text())
    return Policy(
        frozenset(data["allowedRegistries"]),
        frozenset(data.get("localImages", [])),
        tuple((item["repository"], item["reason"]) for item in data.get("denied", [])),
    )


def parse_image(image: str, local_images: frozenset[str] = frozenset()) -> ImageRef:
    """Split an image reference the way the container runtime does (docker.io and library/ implied)."""
    rest, _, digest = image.partition("@")
    name, tag = rest, ""
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = rest.rsplit(":", 1)
    first, _, remainder = name.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, remainder
    elif name in local_images:
        registry, repository = "", name
    else:
        registry, repository = "docker.io", name if remainder else f"library/{name}"
    if registry == "index.docker.io":
        registry = "docker.io"
    return ImageRef(registry, repository, tag, digest)


def image_problems(images: Mapping[str, str], policy: Policy) -> list[str]:
    """One line per image that breaks the policy; `images` maps where it is used to the reference."""
    problems = []
    for where, image in sorted(images.items()):
        ref = parse_image(image, policy.local_images)
        if ref.digest and not _DIGEST.match(ref.digest):
            problems.append(f"{where}: {image}: malformed digest")
        if not ref.digest and (not ref.tag or ref.tag == "latest"):
            problems.append(f"{where}: {image}: not pinned (a version tag or a digest; `latest` and no tag refused)")
        if ref.registry and ref.registry not in policy.allowed_registries:
            problems.append(f"{where}: {image}: registry {ref.registry} is not on the allow-list (infra/images.yaml)")
        for pattern, reason in policy.denied:
            if fnmatch.fnmatchcase(ref.full_repository, pattern):
                problems.append(f"{where}: {image}: {ref.full_repository} is denied: {reason}")
    return problems

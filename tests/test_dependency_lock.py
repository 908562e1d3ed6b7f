"""requirements.lock pins what `make setup`, CI and the image install, so an upstream release cannot turn a
green build red (a prometheus_client release once reordered metric labels under a passing test suite)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def locked_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        assert match, f"requirements.lock: {line!r} is not an exact pin"
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    return [Requirement(text) for text in declared]


def test_every_declared_dependency_is_pinned_within_its_declared_range() -> None:
    pins = locked_pins()
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is declared in pyproject.toml but not pinned (run `make lock`)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{requirement.name}=={pins[name]} in requirements.lock is outside pyproject.toml's {requirement.specifier}"
        )


def test_torch_is_pinned_without_a_local_build_label_so_the_cpu_wheel_and_pypi_both_satisfy_it() -> None:
    assert locked_pins()["torch"] == "2.13.0"


def test_setup_and_the_image_both_install_through_the_lock() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert '-c requirements.lock -e ".[dev,cluster]"' in makefile
    assert re.search(r"^\$\(STAMP\): pyproject\.toml requirements\.lock$", makefile, re.MULTILINE)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"COPY [^\n]*requirements\.lock", dockerfile)
    assert 'pip install -c requirements.lock ".[cluster]"' in dockerfile
    assert "requirements.lock" not in (REPO / ".dockerignore").read_text().split()

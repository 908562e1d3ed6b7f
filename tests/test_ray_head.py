"""Ray as KubeRay runs it: `ray start --head` from the project's venv (the packages of the image, through the
same lock), and the two HTTP endpoints KubeRay 1.7 waits on for Ray >= 2.53:

- the dashboard agent's `/api/healthz` on its listen port (52365 in a pod): the readiness and liveness
  probes KubeRay injects into every Ray container;
- the dashboard's `/api/gcs_healthz` on the dashboard port (8265): what the K8sJobMode submitter waits on.

Both exist only with `ray[default]` (aiohttp_cors, opencensus, py-spy, colorful, smart_open, virtualenv, ...):
without it the agent runs in minimal mode with no HTTP server and the RayJob never leaves Initializing.

Every port is a free one, the temp dir is the test's own, and the Ray processes are stopped by the PID of the
`ray start --block` process (and the mark every child inherits), never by `ray stop`.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from core.processes import ManagedProcess, free_port, port_is_free, start_process, stop_process

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


# --- the packages ------------------------------------------------------------------------------------------


def ray_default_requirements() -> list[Requirement]:
    """What `ray[default]` adds, from the installed ray's own metadata, for this Python."""
    found: list[Requirement] = []
    for text in requires("ray") or []:
        requirement = Requirement(text)
        marker = requirement.marker
        # only with the extra, and for this Python
        if marker and marker.evaluate({"extra": "default"}) and not marker.evaluate({"extra": ""}):
            found.append(requirement)
    return found


def missing_ray_default_packages(pins: dict[str, str]) -> list[str]:
    """The `ray[default]` packages that `pins` (name -> version: a lock, or what is installed) lacks or pins
    outside ray's range. Empty when the dashboard and its agent can run."""
    problems = []
    for requirement in ray_default_requirements():
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement.name} (missing)")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement.name}=={pins[name]} (ray wants {requirement.specifier})")
    return problems


def lock_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def installed_pins(names: list[str]) -> dict[str, str]:
    pins = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            pins[canonicalize_name(name)] = version(name)
    return pins


def test_ray_default_adds_the_dashboard_packages_kuberay_needs() -> None:
    names = {canonicalize_name(r.name) for r in ray_default_requirements()}
    assert {"aiohttp-cors", "opencensus", "py-spy", "colorful", "smart-open", "virtualenv"} <= names


def test_pyproject_asks_for_ray_with_the_default_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray,) = [Requirement(text) for text in project["dependencies"] if Requirement(text).name == "ray"]
    assert "default" in ray.extras, f"pyproject.toml: {ray} (without `default` KubeRay's probes never pass)"


def test_the_lock_and_the_venv_have_every_ray_default_package() -> None:
    assert missing_ray_default_packages(lock_pins((REPO / "requirements.lock").read_text())) == []
    names = [r.name for r in ray_default_requirements()]
    assert missing_ray_default_packages(installed_pins(names)) == []


def test_a_lock_resolved_for_ray_train_alone_is_caught() -> None:
    """The defect: the lock `ray[train]` gave, without the default extra's packages."""
    gone = {"aiohttp-cors", "opencensus", "opencensus-context", "py-spy", "colorful", "smart-open", "virtualenv"}
    lock = (REPO / "requirements.lock").read_text().splitlines()
    planted = "\n".join(line for line in lock if canonicalize_name(line.split("==")[0]) not in gone)
    missing = missing_ray_default_packages(lock_pins(planted))
    assert {m.split()[0] for m in missing} >= {"aiohttp_cors", "opencensus", "py-spy", "colorful", "smart_open"}


# --- a head node -----------------------------------------------------------------------------------------


@dataclass
class Head:
    process: ManagedProcess
    dashboard_port: int
    agent_port: int
    gcs_port: int


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@contextlib.contextmanager
def ray_head(blocked_modules: tuple[str, ...] = ()) -> Iterator[Head]:
    """`ray start --head --block` on free ports in a temp dir of its own; stopped by PID at the end.
    `blocked_modules`: modules made unimportable (a package on PYTHONPATH that raises ImportError), to show
    what a venv without them gives."""
    root = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's unix sockets live under it
    gcs, dashboard, agent, agent_grpc, metrics, node_manager, object_manager, runtime_env, client = _free_ports(9)
    env = {
        "PATH": f"{RAY.parent}:/usr/bin:/bin",
        "HOME": str(root),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    }
    if blocked_modules:
        shadow = root / "shadow"
        for module in blocked_modules:
            (shadow / module).mkdir(parents=True)
            (shadow / module / "__init__.py").write_text(f"raise ImportError('{module} is not installed (test)')\n")
        env["PYTHONPATH"] = str(shadow)
    args = [
        str(RAY), "start", "--head", "--block", "--disable-usage-stats",
        f"--temp-dir={root / 'tmp'}",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--ray-client-server-port={client}",
        "--num-cpus=1",
        "--object-store-memory=100000000",
    ]  # fmt: skip
    process = start_process("ray-head", args, env, root / "logs")
    try:
        yield Head(process, dashboard, agent, gcs)
    finally:
        stop_process(process, timeout=15)
        shutil.rmtree(root, ignore_errors=True)


def status_of(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2.0).status_code
    except httpx.HTTPError:
        return None


def wait_for_gcs(head: Head, timeout: float = 120) -> float:
    """Seconds until the GCS port accepts connections (the head node is up)."""
    started = time.monotonic()
    while port_is_free(head.gcs_port):
        assert head.process.alive(), f"ray start exited:\n{head.process.log_tail()}"
        assert time.monotonic() - started < timeout, f"no GCS after {timeout}s:\n{head.process.log_tail()}"
        time.sleep(0.2)
    return time.monotonic() - started


def health(head: Head) -> dict[str, int | None]:
    return {
        "agent /api/healthz": status_of(f"http://127.0.0.1:{head.agent_port}/api/healthz"),
        "dashboard /api/gcs_healthz": status_of(f"http://127.0.0.1:{head.dashboard_port}/api/gcs_healthz"),
    }


@pytest.mark.slow
def test_ray_head_answers_the_health_checks_kuberay_probes() -> None:
    with ray_head() as head:
        wait_for_gcs(head)
        deadline = time.monotonic() + 120
        seen = health(head)
        while set(seen.values()) != {200} and time.monotonic() < deadline:
            assert head.process.alive(), f"ray start exited:\n{head.process.log_tail()}"
            time.sleep(0.5)
            seen = health(head)
        assert seen == {"agent /api/healthz": 200, "dashboard /api/gcs_healthz": 200}, head.process.log_tail()


@pytest.mark.slow
def test_without_the_default_extra_neither_health_check_ever_answers() -> None:
    """The defect: `ray[train]` alone. With the dashboard's packages unimportable, the head still starts
    (its GCS answers), but the agent has no HTTP server and there is no dashboard: KubeRay's probes fail."""
    with ray_head(blocked_modules=("aiohttp_cors", "opencensus")) as head:
        wait_for_gcs(head)
        deadline = time.monotonic() + 30  # the good head answers within a few seconds of its GCS
        while time.monotonic() < deadline:
            assert head.process.alive(), f"ray start exited:\n{head.process.log_tail()}"
            assert set(health(head).values()) == {None}, health(head)
            time.sleep(1)

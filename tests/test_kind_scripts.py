"""The kind path, checked without Docker or a cluster: the bring-up scripts (bash -n, DRY_RUN=1), the
make targets, the kind config, the Dockerfile and the e2e workflow.

Tests that need docker/kind/kubectl/helm to be present use fakes, and say so in their names
(`..._with_faked_prerequisites`): each fake logs its arguments and exits 0, so a test can also prove
that DRY_RUN=1 ran nothing but read-only checks.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KIND_DIR = REPO / "infra" / "kind"
SCRIPTS = ["up.sh", "down.sh", "status.sh", "run.sh", "scenario.sh", "lib.sh"]
RESERVED_TARGETS = {"setup", "test", "lint", "demo", "compile", "bench", "clean", "help"}

FAKE_TOOL = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
case "$(basename "$0") $*" in
  "kind get clusters") [ -n "$FAKE_CLUSTERS" ] && echo "$FAKE_CLUSTERS" ;;
  "docker info") [ -z "$FAKE_DOCKER_DOWN" ] || exit 1 ;;
  "kind version") echo "kind ${{FAKE_KIND_VERSION:-v0.31.0}} go1.25.5 linux/amd64" ;;
esac
exit 0
"""


@pytest.fixture
def fake_tools(tmp_path: Path) -> dict[str, str]:
    """An environment whose docker, kind, kubectl and helm are logging fakes (first on PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    log.touch()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLOPS_", "KIND_", "DRY_RUN")) and not k.endswith("_BIN")
    }
    for tool in ("docker", "kind", "kubectl", "helm"):
        path = bin_dir / tool
        path.write_text(FAKE_TOOL.format(log=log))
        path.chmod(0o755)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        FAKE_LOG=str(log),
        MIN_MEMORY_GIB="1",  # faked too: this machine's free memory is not the point of these tests
        DRY_RUN="1",
    )
    return env


def run_script(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(KIND_DIR / script), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def commands(output: str) -> list[str]:
    """The `+ command` lines a dry run printed."""
    return [line[2:] for line in output.splitlines() if line.startswith("+ ")]


def index_of(lines: list[str], fragment: str) -> int:
    for i, line in enumerate(lines):
        if fragment in line:
            return i
    raise AssertionError(f"no command contains {fragment!r}:\n" + "\n".join(lines))


def fake_calls(env: dict[str, str]) -> list[str]:
    return Path(env["FAKE_LOG"]).read_text().splitlines()


# --- syntax and structure ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_passes_bash_syntax_check(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(KIND_DIR / script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "lib.sh"])
def test_script_is_strict_and_executable(script: str) -> None:
    path = KIND_DIR / script
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert 'source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"' in text
    assert os.access(path, os.X_OK), f"{script} is not executable"


# --- up.sh ---------------------------------------------------------------------------------------------


def test_up_script_dry_run_with_faked_prerequisites(fake_tools: dict[str, str]) -> None:
    result = run_script("up.sh", fake_tools)
    assert result.returncode == 0, result.stderr
    lines = commands(result.stdout)
    create = index_of(lines, "kind create cluster --name mlops --config infra/kind/cluster.yaml")
    build = index_of(lines, "docker build --provenance=false --sbom=false -t mlops-template:0.1.0 .")
    load = index_of(lines, "kind load docker-image mlops-template:0.1.0 --name mlops")
    kuberay = index_of(
        lines,
        "upgrade --install kuberay-operator kuberay-operator --repo https://ray-project.github.io/kuberay-helm/"
        " --version 1.7.0",
    )
    kfp_cluster = index_of(
        lines, "apply -k 'github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=2.17.0'"
    )
    crds = index_of(lines, "wait --for condition=established --timeout=120s crd/applications.app.k8s.io")
    kfp = index_of(
        lines, "apply -k 'github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=2.17.0'"
    )
    chart = index_of(lines, "upgrade --install mlops infra/helm/mlops-platform --namespace mlops --create-namespace")
    rollouts = index_of(lines, "-n mlops wait --for=condition=Available deployment --all")
    secret = index_of(lines, "-n kubeflow apply -f -")  # the platform secret copied for the pipeline pods
    assert create < build < load < kuberay < kfp_cluster < crds < kfp < chart < rollouts < secret
    # kubectl and helm always name the kind context, never the user's current one
    for line in lines:
        if line.startswith("kubectl "):
            assert line.startswith("kubectl --context kind-mlops "), line
        if line.startswith("helm "):
            assert line.startswith("helm --kube-context kind-mlops "), line
    assert "nodePort: 30888" in result.stdout  # the KFP UI NodePort
    assert "platform.rolloutSpec=fast" in lines[chart]  # a laptop cluster decides in seconds (ROLLOUT_SPEC)
    # Under DRY_RUN only read-only checks reached the (fake) tools.
    assert set(fake_calls(fake_tools)) == {"docker info", "kind version", "kind get clusters"}


def test_up_script_dry_run_reuses_an_existing_cluster_with_faked_prerequisites(fake_tools: dict[str, str]) -> None:
    env = {**fake_tools, "FAKE_CLUSTERS": "mlops", "MIN_MEMORY_GIB": "100000"}  # memory is checked only to create
    result = run_script("up.sh", env)
    assert result.returncode == 0, result.stderr
    assert "exists: reusing it" in result.stderr
    lines = commands(result.stdout)
    assert not any("kind create cluster" in line for line in lines)
    index_of(lines, "upgrade --install mlops infra/helm/mlops-platform")


def test_up_script_honours_overrides_with_faked_prerequisites(fake_tools: dict[str, str]) -> None:
    env = {**fake_tools, "KIND_CLUSTER_NAME": "dev", "IMAGE": "mlops-template:dev", "PLATFORM_NAMESPACE": "fraud"}
    result = run_script("up.sh", env)
    assert result.returncode == 0, result.stderr
    lines = commands(result.stdout)
    index_of(lines, "kind create cluster --name dev --config infra/kind/cluster.yaml")
    index_of(lines, "kind load docker-image mlops-template:dev --name dev")
    index_of(lines, "helm --kube-context kind-dev upgrade --install mlops infra/helm/mlops-platform --namespace fraud")
    index_of(lines, "--set-string image.tag=dev")


def test_up_script_fails_clearly_without_docker(fake_tools: dict[str, str]) -> None:
    env = {**fake_tools, "DOCKER_BIN": "/nonexistent/docker"}
    result = run_script("up.sh", env)
    assert result.returncode != 0
    assert "docker not found" in result.stderr
    assert "https://docs.docker.com/get-docker/" in result.stderr
    assert commands(result.stdout) == []


@pytest.mark.parametrize("tool", ["kind", "kubectl", "helm"])
def test_up_script_names_each_missing_tool(fake_tools: dict[str, str], tool: str) -> None:
    env = {**fake_tools, f"{tool.upper()}_BIN": f"/nonexistent/{tool}"}
    result = run_script("up.sh", env)
    assert result.returncode != 0
    assert f"{tool} not found" in result.stderr


def test_up_script_fails_clearly_when_the_docker_daemon_is_down_with_faked_prerequisites(
    fake_tools: dict[str, str],
) -> None:
    result = run_script("up.sh", {**fake_tools, "FAKE_DOCKER_DOWN": "1"})
    assert result.returncode != 0
    assert "Docker daemon is not reachable" in result.stderr


def test_up_script_refuses_too_little_memory_with_faked_prerequisites(fake_tools: dict[str, str]) -> None:
    result = run_script("up.sh", {**fake_tools, "MIN_MEMORY_GIB": "100000"})
    assert result.returncode != 0
    assert "the kind platform needs at least 100000 GiB" in result.stderr
    assert not any("kind create cluster" in line for line in commands(result.stdout))


def test_up_script_builds_without_attestations_so_kind_load_works_with_faked_prerequisites(
    fake_tools: dict[str, str],
) -> None:
    """Docker 29's containerd store: a provenance attestation is missing from `docker save`, and `kind load
    docker-image` fails (kind#3795). Every `docker build` must turn attestations off."""
    result = run_script("up.sh", fake_tools)
    builds = [line for line in commands(result.stdout) if " build " in f" {line} " and line.startswith("docker")]
    assert builds and all("--provenance=false" in b and "--sbom=false" in b for b in builds), builds


@pytest.mark.parametrize("version", ["v0.26.0", "v0.20.1", "v0.9.0"])
def test_up_script_refuses_a_too_old_kind_with_faked_prerequisites(fake_tools: dict[str, str], version: str) -> None:
    result = run_script("up.sh", {**fake_tools, "FAKE_KIND_VERSION": version})
    assert result.returncode != 0
    assert f"kind {version} is too old: v0.27.0 or newer is needed" in result.stderr
    assert commands(result.stdout) == [], "nothing may be done with a too old kind"


@pytest.mark.parametrize("version", ["v0.27.0", "v0.31.0", "v1.0.0-alpha"])
def test_up_script_accepts_kind_0_27_and_newer_with_faked_prerequisites(
    fake_tools: dict[str, str], version: str
) -> None:
    result = run_script("up.sh", {**fake_tools, "FAKE_KIND_VERSION": version})
    assert result.returncode == 0, result.stderr


def test_up_script_names_a_missing_git(fake_tools: dict[str, str]) -> None:
    """kubectl apply -k github.com/... clones with git: without it KFP's manifests cannot be fetched."""
    result = run_script("up.sh", {**fake_tools, "GIT_BIN": "/nonexistent/git"})
    assert result.returncode != 0
    assert "git not found" in result.stderr and "KFP manifests" in result.stderr
    assert commands(result.stdout) == []


def _low_inotify(root: Path) -> Path:
    sysctl = root / "sysctl"
    (sysctl / "fs" / "inotify").mkdir(parents=True)
    (sysctl / "fs" / "inotify" / "max_user_watches").write_text("8192\n")
    (sysctl / "fs" / "inotify" / "max_user_instances").write_text("128\n")
    return sysctl


def test_up_script_as_root_raises_low_inotify_limits_with_faked_prerequisites(
    fake_tools: dict[str, str], tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the root path: runs as root (CI does)")
    result = run_script("up.sh", {**fake_tools, "INOTIFY_SYSCTL_DIR": str(_low_inotify(tmp_path))})
    assert result.returncode == 0, result.stderr
    lines = commands(result.stdout)
    sysctl = index_of(lines, "sysctl -w fs.inotify.max_user_watches=524288")
    assert index_of(lines, "sysctl -w fs.inotify.max_user_instances=512") < index_of(lines, "kind create cluster")
    assert sysctl < index_of(lines, "kind create cluster")


@pytest.fixture
def reachable_fake_tools(fake_tools: dict[str, str]) -> Iterator[dict[str, str]]:
    """The fakes copied to a temp dir another uid can reach (pytest's tmp_path is root's, mode 0700)."""
    root = Path(tempfile.mkdtemp(prefix="mlops-test-kind-"))
    root.chmod(0o755)
    try:
        shutil.copytree(Path(fake_tools["FAKE_LOG"]).parent / "bin", root / "bin")
        log = root / "calls.log"
        log.touch()
        log.chmod(0o666)
        for tool in (root / "bin").iterdir():
            tool.write_text(tool.read_text().replace(fake_tools["FAKE_LOG"], str(log)))
        env = {**fake_tools, "FAKE_LOG": str(log), "INOTIFY_SYSCTL_DIR": str(_low_inotify(root))}
        env["PATH"] = env["PATH"].replace(str(Path(fake_tools["FAKE_LOG"]).parent / "bin"), str(root / "bin"))
        env["HOME"] = str(root)
        yield env
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_up_script_as_a_user_stops_before_the_cluster_with_the_exact_sysctl_command(
    reachable_fake_tools: dict[str, str],
) -> None:
    """Non-root with low inotify limits: stop (no cluster is created) and say exactly what to run. Run as
    `nobody` through setpriv (real uid change, faked docker/kind/kubectl/helm)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the script as another user")
    nobody = pwd.getpwnam("nobody")
    result = subprocess.run(
        ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
         "bash", str(KIND_DIR / "up.sh")],
        env={**reachable_fake_tools, "DRY_RUN": "0"}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "sudo sysctl -w fs.inotify.max_user_watches=524288 fs.inotify.max_user_instances=512" in result.stderr
    assert "/etc/sysctl.d/" in result.stderr
    calls = fake_calls(reachable_fake_tools)
    assert not any(call.startswith(("kind create", "docker build", "helm ", "kubectl ")) for call in calls), calls


# --- the other scripts ---------------------------------------------------------------------------------


def test_down_script_dry_run_with_faked_prerequisites(fake_tools: dict[str, str]) -> None:
    result = run_script("down.sh", {**fake_tools, "FAKE_CLUSTERS": "mlops"})
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout) == ["kind delete cluster --name mlops"]
    assert "kind delete cluster --name mlops" not in fake_calls(fake_tools)


def test_status_script_dry_run_with_faked_prerequisites(fake_tools: dict[str, str]) -> None:
    result = run_script("status.sh", fake_tools)
    assert result.returncode == 0, result.stderr
    lines = commands(result.stdout)
    index_of(lines, "kubectl --context kind-mlops get nodes")
    index_of(lines, "-n mlops get pods,services,persistentvolumeclaims,networkpolicies")
    index_of(lines, "-n kubeflow get pods")
    for url in ("http://localhost:8710/healthz", "http://localhost:8750/health", "http://localhost:3000/api/health"):
        index_of(lines, url)
    assert fake_calls(fake_tools) == []


def test_run_script_dry_run_with_faked_prerequisites(fake_tools: dict[str, str]) -> None:
    result = run_script("run.sh", fake_tools, "--generate", "5000")
    assert result.returncode == 0, result.stderr
    lines = commands(result.stdout)
    forward = index_of(lines, "kubectl --context kind-mlops -n kubeflow port-forward svc/ml-pipeline 18888:8888")
    submit = index_of(lines, "run --target kind --generate 5000")
    assert forward < submit
    assert re.search(r"(^|/)mlops run --target kind", lines[submit])


def test_scenario_script_dry_run_with_faked_prerequisites(fake_tools: dict[str, str]) -> None:
    result = run_script("scenario.sh", fake_tools, "worse-quality")
    assert result.returncode == 0, result.stderr
    lines = commands(result.stdout)
    index_of(lines, "-n mlops port-forward svc/control-plane 18700:8700")
    index_of(lines, "-n mlops port-forward svc/controller 18730:8730")
    index_of(lines, "-n kubeflow port-forward svc/ml-pipeline 18888:8888")
    assert re.search(r"(^|/)mlops scenario worse-quality --target kind$", lines[-1])
    assert "get secret mlops-platform-secrets" in result.stderr  # the token, from the generated secret


def test_scenario_script_requires_a_name(fake_tools: dict[str, str]) -> None:
    result = run_script("scenario.sh", fake_tools)
    assert result.returncode == 2
    assert "usage:" in result.stderr and "worse-quality" in result.stderr


def test_cluster_env_points_the_cli_at_the_kind_platform() -> None:
    """What run.sh and scenario.sh export for the CLI (the NodePorts and port-forwards above)."""
    script = 'source infra/kind/lib.sh; export_cluster_env; env | grep -E "^MLOPS_" | sort'
    result = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    env = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert env["MLOPS_TARGET"] == "kind"
    assert env["MLOPS_KFP_HOST"] == "http://localhost:18888"
    assert env["MLOPS_MLFLOW_TRACKING_URI"] == "http://localhost:8750"
    assert env["MLOPS_GATEWAY_URL"] == "http://localhost:8710"
    assert env["MLOPS_CONTROL_PLANE_URL"] == "http://localhost:18700"
    assert env["MLOPS_CONTROLLER_URL"] == "http://localhost:18730"


# --- make ----------------------------------------------------------------------------------------------


def run_make(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-f", "infra/cluster.mk", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_make_cluster_dry_run_with_faked_prerequisites(fake_tools: dict[str, str]) -> None:
    env = {k: v for k, v in fake_tools.items() if k != "DRY_RUN"}  # the target sets it itself
    result = run_make(env, "cluster-dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    for script in ("up.sh", "run.sh", "status.sh", "down.sh", "scenario.sh worse-quality"):
        assert f"### DRY_RUN=1 infra/kind/{script}" in result.stdout
    lines = commands(result.stdout)
    index_of(lines, "kind create cluster --name mlops --config infra/kind/cluster.yaml")
    index_of(lines, "helm --kube-context kind-mlops upgrade --install mlops infra/helm/mlops-platform")
    index_of(lines, "mlops scenario worse-quality --target kind")
    assert set(fake_calls(fake_tools)) <= {"docker info", "kind version", "kind get clusters"}


def test_make_scenario_requires_name() -> None:
    result = run_make(dict(os.environ), "scenario")
    assert result.returncode != 0
    assert "usage: make scenario NAME=<scenario>" in result.stderr


def test_cluster_mk_targets() -> None:
    text = (REPO / "infra" / "cluster.mk").read_text()
    (phony,) = re.findall(r"^\.PHONY:(.*)$", text, re.MULTILINE)
    targets = set(phony.split())
    assert targets == {"up", "down", "run", "scenario", "status", "cluster-dry-run"}
    defined = set(re.findall(r"^([a-z][a-z-]*):", text, re.MULTILINE))
    assert defined == targets
    assert not (defined & RESERVED_TARGETS), "cluster.mk must not redefine the Makefile's targets"


# --- kind config, versions, Dockerfile, workflow --------------------------------------------------------


def test_kind_cluster_config() -> None:
    config = yaml.safe_load((KIND_DIR / "cluster.yaml").read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert [node["role"] for node in config["nodes"]] == ["control-plane", "worker"]
    for node in config["nodes"]:
        assert re.fullmatch(r"kindest/node:v1\.31\.\d+@sha256:[0-9a-f]{64}", node["image"]), node["image"]
    mappings = {m["containerPort"]: m for node in config["nodes"] for m in node.get("extraPortMappings", [])}
    assert {port: m["hostPort"] for port, m in mappings.items()} == {30710: 8710, 30750: 8750, 30888: 8888, 30300: 3000}
    assert all(m["listenAddress"] == "127.0.0.1" for m in mappings.values())


def test_upstream_pins_agree() -> None:
    lib = (KIND_DIR / "lib.sh").read_text()
    kfp = re.search(r'^KFP_VERSION="([^"]+)"', lib, re.MULTILINE)
    kuberay = re.search(r'^KUBERAY_CHART_VERSION="([^"]+)"', lib, re.MULTILINE)
    assert kfp and kuberay
    assert kfp.group(1) == "2.17.0"
    assert re.fullmatch(r"1\.7\.\d+", kuberay.group(1))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "kfp>=2.17,<2.18" in pyproject["project"]["dependencies"], "the SDK and the backend must share a minor"


def test_pyproject_cluster_extra() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cluster = " ".join(extras["cluster"])
    for package in ("psycopg[binary]", "boto3", "kubernetes"):
        assert package in cluster
    assert any(dep.startswith("kubernetes-validate") for dep in extras["dev"])


def dockerfile_stages(text: str) -> list[list[str]]:
    stages: list[list[str]] = []
    for raw in re.sub(r"\\\n", " ", text).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_structure() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = dockerfile_stages(text)
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    assert re.search(r"\bAS builder\b", stages[0][0])
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base.group(1)), "pinned python:3.11 slim tag"
    builder = "\n".join(stages[0])
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in builder
    assert re.search(r'--index-url "\$\{TORCH_INDEX\}" "torch==2\.13\.0"', builder)
    assert builder.index("torch==2.13.0") < builder.index('.[cluster]"'), "torch first, then the project"
    runtime = stages[-1]
    users = [line for line in runtime if line.upper().startswith("USER ")]
    assert users, "the runtime stage must switch to a non-root user"
    assert users[-1].split()[1].split(":")[0] not in ("0", "root")
    assert "USER 10001:10001" in runtime
    assert 'ENTRYPOINT ["mlops"]' in runtime
    assert "WORKDIR /app" in runtime
    assert any("MLOPS_HOME=/data" in line for line in runtime)
    assert any(line.startswith("COPY --from=builder /opt/venv /opt/venv") for line in runtime)
    assert ":latest" not in text


def test_dockerignore_keeps_local_state_out() -> None:
    entries = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".mlops", ".git", "build", "**/__pycache__", ".pytest_cache"} <= entries


def test_e2e_workflow() -> None:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "e2e-kind.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the `on` key as a boolean
    assert "workflow_dispatch" in triggers and triggers["push"]["branches"] == ["main"]
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    steps = job["steps"]
    uses = [s["uses"] for s in steps if "uses" in s]
    for action in uses:
        assert re.search(r"@v\d+(\.\d+)*$", action), f"{action}: pin a released version"
    assert any(a.startswith("helm/kind-action@") for a in uses)
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert python["with"]["python-version"] == "3.11"
    runs = [s.get("run", "") for s in steps]
    order = [runs.index(cmd) for cmd in ("make up", "make run", "make scenario NAME=worse-quality")]
    assert order == sorted(order)
    diagnostics = next(s for s in steps if "kubectl" in s.get("run", "") and "logs" in s.get("run", ""))
    assert diagnostics["if"] == "failure() || cancelled()"
    assert "get pods -A" in diagnostics["run"] and "describe pods" in diagnostics["run"]
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "failure() || cancelled()"
    down = steps[-1]
    assert down["run"] == "make down" and down["if"] == "always()"


# --- port-forwards are re-opened -------------------------------------------------------------------------

FAKE_PORT_FORWARD = """#!{python}
# A fake `kubectl port-forward`: listens on the local port and answers "forward N" (N: which start this is),
# until the test asks it to end (the file `restart`), as a real one ends when the pod behind it restarts.
import os, socket, sys
from pathlib import Path
state = Path({state!r})
local_port = int([a for a in sys.argv if ":" in a and a.split(":")[0].isdigit()][0].split(":")[0])
starts = state / "starts"
count = len(starts.read_text().split()) + 1 if starts.exists() else 1
with starts.open("a") as out:
    out.write(f"{{os.getpid()}}\\n")
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", local_port))
server.listen()
server.settimeout(0.1)
while not (state / "restart").exists():
    try:
        conn, _ = server.accept()
    except socket.timeout:
        continue
    with conn:
        conn.sendall(f"forward {{count}}\\n".encode())
(state / "restart").unlink()
"""


def _read_from(port: int) -> str:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        return conn.recv(64).decode().strip()


def test_a_port_forward_that_drops_is_reopened_and_stopped_at_exit_with_a_faked_kubectl(tmp_path: Path) -> None:
    """`make run`'s KFP API port-forward: kubectl exits when the ml-pipeline pod restarts; the supervisor in
    lib.sh starts it again, and on exit stops both itself and its kubectl (faked: no cluster here)."""
    import signal
    import sys
    import time

    from core.processes import free_port, pid_running

    state = tmp_path / "state"
    state.mkdir()
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_PORT_FORWARD.format(python=sys.executable, state=str(state)))
    kubectl.chmod(0o755)
    port = free_port()
    script = f"""
source {KIND_DIR / "lib.sh"}
trap stop_port_forwards EXIT
port_forward kubeflow svc/ml-pipeline {port} 8888
echo READY
read -r _
"""
    env = {**os.environ, "KUBECTL_BIN": str(kubectl), "DRY_RUN": "0", "PORT_FORWARD_RETRY_S": "0.2"}
    process = subprocess.Popen(
        ["bash", "-c", script], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "READY"
        assert _read_from(port) == "forward 1"
        (state / "restart").touch()  # the pod restarts: this kubectl port-forward ends
        deadline = time.monotonic() + 15
        answer = ""
        while answer != "forward 2" and time.monotonic() < deadline:
            try:
                answer = _read_from(port)
            except OSError:
                time.sleep(0.1)
        assert answer == "forward 2", "the port-forward was not re-opened"
        assert process.stdin is not None
        process.stdin.write("\n")
        process.stdin.close()
        assert process.wait(timeout=15) == 0
        assert "re-opening" in process.stderr.read() if process.stderr else False
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    pids = [int(pid) for pid in (state / "starts").read_text().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 5
    while any(pid_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_running(pid) for pid in pids), "a kubectl port-forward outlived the script"


def test_every_e2e_step_has_a_timeout_and_the_job_outlasts_them() -> None:
    """A hung `make run` (a RayJob stuck in Initializing) must be cut by its step's timeout, leaving time for the
    diagnostics, their upload and `make down`, which run on failure and on cancel too."""
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "e2e-kind.yml").read_text())
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    missing = [step.get("name", step.get("uses")) for step in steps if "timeout-minutes" not in step]
    assert missing == [], f"steps without timeout-minutes: {missing}"
    assert sum(step["timeout-minutes"] for step in steps) < job["timeout-minutes"]
    after_failure = [step for step in steps if "diagnostics" in step.get("name", "").lower()]
    assert len(after_failure) == 2 and all(step["if"] == "failure() || cancelled()" for step in after_failure)
    assert steps[-1]["if"] == "always()"

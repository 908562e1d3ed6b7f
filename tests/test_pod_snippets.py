"""Shell snippets run as their pods run them: the chart's rendered init-container commands, executed here.

Offline checks (schemas, lint, policies) cannot tell that `pg_isready` fails before it connects when the
pod's uid has no passwd entry: only running it does. So each snippet the chart renders that can run on this
machine is executed by `sh -c` under `setpriv --reuid/--regid` to a uid with no passwd entry (as in the
pod: the postgres and SeaweedFS images know nothing of uid 10001), with the service host name mapped to a
loopback port through the variables the snippet reads (PGHOST/PGPORT, S3_CONFIG_DIR).

- wait-for-postgres: against a real PostgreSQL from Debian's packages (`postgresql`), started by the test
  as a non-root user in a temp dir, on a free port, and stopped by its PID;
- the object store's S3 identity file (SeaweedFS's s3.json), from the platform Secret's credentials.

`setpriv` needs root (CAP_SETUID): CI runs as root; elsewhere these tests are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.processes import free_port, pid_running
from tests.test_helm_chart import Helm, find, helm, render  # noqa: F401  (helm: the session fixture)

POD_UID = 10001  # the chart's podSecurity.runAsUser


def _bindir() -> Path | None:
    """The PostgreSQL server binaries: `pg_config --bindir`, else Debian's /usr/lib/postgresql/N/bin."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(out) / "initdb").exists():
            return Path(out)
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


def _uid_without_passwd_entry(preferred: int = POD_UID) -> int:
    for uid in [preferred, *range(preferred + 1, preferred + 100)]:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise AssertionError("no uid without a passwd entry near 10001")


def _require_setpriv() -> None:
    if os.geteuid() != 0:
        pytest.skip("setpriv --reuid needs root (CI runs as root)")
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is missing")


def as_pod_user(script: str, uid: int, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`sh -c SCRIPT` under uid:gid `uid` with no supplementary groups and a minimal environment, like the
    container's. A TimeoutExpired (a snippet looping forever) is returned as exit code 124."""
    command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sh", "-c", script]
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp"}
    process = subprocess.Popen(
        command, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(command, process.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # our own session: the sh and its pg_isready/sleep
        out, err = process.communicate()
        return subprocess.CompletedProcess(command, 124, out, err)


def init_command(docs: list[dict[str, Any]], kind: str, name: str, container: str) -> list[str]:
    spec = find(docs, kind, name)["spec"]["template"]["spec"]
    for item in spec.get("initContainers", []):
        if item["name"] == container:
            return list(item["command"])
    raise AssertionError(f"{kind}/{name} has no init container {container}")


def shell_script(command: list[str]) -> str:
    """The script of a rendered `sh -c SCRIPT` / `/bin/sh -ec SCRIPT` command."""
    assert Path(command[0]).name == "sh" and command[1].startswith("-") and "c" in command[1], command
    flags = command[1].lstrip("-").replace("c", "")
    return (f"set -{flags}\n" if flags else "") + command[2]


# --- a real PostgreSQL --------------------------------------------------------------------------------------


@dataclass
class Postgres:
    port: int
    pid: int
    data: Path


def _server_user() -> tuple[int, int]:
    """initdb refuses root, and needs a passwd entry: Debian's `postgres` user, else `nobody`."""
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    raise AssertionError("no postgres or nobody user to run the server as")


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster of its own (UTF8, as the postgres image initialises it): initdb in a temp dir, on a
    free loopback port, as a non-root user; stopped by its postmaster PID (never by name). Not under pytest's
    tmp_path: that is root's, mode 0700, so the server's user could not reach it."""
    _require_setpriv()
    bindir = _bindir()
    if bindir is None:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")
    uid, gid = _server_user()
    root = Path(tempfile.mkdtemp(prefix="mlops-test-postgres-"))
    root.chmod(0o755)
    try:
        yield from _run_postgres(bindir, root, uid, gid)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_postgres(bindir: Path, root: Path, uid: int, gid: int) -> Iterator[Postgres]:
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    os.chown(root, uid, gid)
    os.chown(sockets, uid, gid)
    as_server = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups"]
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(root), "LC_ALL": "C"}
    initdb = subprocess.run(
        [*as_server, str(bindir / "initdb"), "-D", str(data), "-U", "mlops", "--auth=trust", "--no-sync",
         "--encoding=UTF8", "--locale=C"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert initdb.returncode == 0, f"initdb failed: {initdb.stderr}"
    port = free_port()
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    started = subprocess.run(
        [*as_server, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "-t", "60",
         "start"],
        env=env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    pid_file = data / "postmaster.pid"
    pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else 0
    try:
        assert started.returncode == 0, f"pg_ctl start failed: {started.stderr}\n{(root / 'log').read_text()}"
        yield Postgres(port, pid, data)
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)  # "fast" shutdown of our own postmaster
            deadline = time.monotonic() + 30
            while pid_running(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def default_render(helm: Helm) -> list[dict[str, Any]]:  # noqa: F811
    return render(helm)


@pytest.mark.parametrize("deployment", ["mlflow", "control-plane", "controller"])
def test_wait_for_postgres_succeeds_under_a_uid_with_no_passwd_entry(
    default_render: list[dict[str, Any]], postgres: Postgres, deployment: str
) -> None:
    script = shell_script(init_command(default_render, "Deployment", deployment, "wait-for-postgres"))
    uid = _uid_without_passwd_entry()
    result = as_pod_user(script, uid, {"PGHOST": "127.0.0.1", "PGPORT": str(postgres.port)}, timeout=20)
    assert result.returncode == 0, f"{deployment}'s wait-for-postgres did not finish: {result.stdout}{result.stderr}"


def test_wait_for_postgres_loops_until_postgres_answers(default_render: list[dict[str, Any]]) -> None:
    """The loop really waits: against a port nobody listens on it has not finished after 5 s."""
    _require_setpriv()
    script = shell_script(init_command(default_render, "Deployment", "mlflow", "wait-for-postgres"))
    result = as_pod_user(script, _uid_without_passwd_entry(), {"PGHOST": "127.0.0.1", "PGPORT": str(free_port())}, 5)
    assert result.returncode == 124
    assert "waiting for postgres" in result.stdout


UNFIXED_SNIPPET = 'until pg_isready -h {host} -p {port} -q; do echo "waiting for postgres"; sleep 2; done'


def test_the_unfixed_snippet_without_u_never_finishes_under_a_uid_with_no_passwd_entry(postgres: Postgres) -> None:
    """The defect this file exists for: the old line (no -U, no PGUSER) loops forever though Postgres is up,
    because libpq cannot name the local user before connecting."""
    uid = _uid_without_passwd_entry()
    looped = as_pod_user(UNFIXED_SNIPPET.format(host="127.0.0.1", port=postgres.port), uid, {}, timeout=6)
    assert looped.returncode == 124, looped
    once = as_pod_user(f"pg_isready -h 127.0.0.1 -p {postgres.port}", uid, {}, timeout=10)
    assert once.returncode == 3, once
    assert "no attempt" in once.stdout  # libpq gave up before connecting (exit 3)


# --- the object store's S3 identity file ------------------------------------------------------------------


@pytest.fixture
def reachable_tmp() -> Iterator[Path]:
    """A temp dir other uids can reach (pytest's tmp_path lies under root's 0700 directory); removed after."""
    root = Path(tempfile.mkdtemp(prefix="mlops-test-snippet-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _config_dir(parent: Path, uid: int) -> Path:
    target = parent / "config"
    target.mkdir()
    os.chown(target, uid, uid)
    return target


def test_s3_identity_file_is_written_as_the_pod_user_and_names_the_secret_credentials(
    default_render: list[dict[str, Any]], reachable_tmp: Path
) -> None:
    _require_setpriv()
    script = shell_script(init_command(default_render, "Deployment", "minio", "s3-config"))
    uid = _uid_without_passwd_entry()
    target = _config_dir(reachable_tmp, uid)
    env = {"S3_ACCESS_KEY": "mlops-abc123", "S3_SECRET_KEY": "S3cr3tKey0123456789", "S3_CONFIG_DIR": str(target)}
    result = as_pod_user(script, uid, env)
    assert result.returncode == 0, result.stderr
    written = target / "s3.json"
    assert written.stat().st_uid == uid and (written.stat().st_mode & 0o077) == 0  # umask 077: owner only
    identity = json.loads(written.read_text())["identities"][0]
    assert identity["credentials"] == [{"accessKey": "mlops-abc123", "secretKey": "S3cr3tKey0123456789"}]
    assert "Admin" in identity["actions"]  # the bucket Job creates buckets with these credentials


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"S3_ACCESS_KEY": 'bad"key', "S3_SECRET_KEY": "x"}, "URL-safe"),  # would break the JSON
        ({"S3_SECRET_KEY": "x"}, "S3_ACCESS_KEY is not set"),
    ],
)
def test_s3_identity_snippet_refuses_credentials_it_cannot_write(
    default_render: list[dict[str, Any]], reachable_tmp: Path, env: dict[str, str], message: str
) -> None:
    _require_setpriv()
    script = shell_script(init_command(default_render, "Deployment", "minio", "s3-config"))
    uid = _uid_without_passwd_entry()
    target = _config_dir(reachable_tmp, uid)
    result = as_pod_user(script, uid, {**env, "S3_CONFIG_DIR": str(target)})
    assert result.returncode != 0 and message in result.stderr
    assert not (target / "s3.json").exists()


# --- the bucket Job, against an S3 API ------------------------------------------------------------------
# SeaweedFS is neither a Python nor a Debian package, so it cannot run here: moto's S3 server stands in for
# it (the only fake; the names of these tests say so), in a process of its own on a free port.


@pytest.fixture
def moto_s3(tmp_path: Path) -> Iterator[str]:
    from core.processes import start_process, stop_process, wait_until_ready

    port = free_port()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    server = start_process("moto-s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                           env, tmp_path / "logs")  # fmt: skip
    try:
        wait_until_ready(server, f"http://127.0.0.1:{port}/moto-api/", timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(server, timeout=10)


def bucket_job(default_render: list[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    container = find(default_render, "Job", "minio-buckets")["spec"]["template"]["spec"]["containers"][0]
    command = list(container["command"])
    assert command[0] == "python"
    return [sys.executable, *command[1:]], {e["name"]: e.get("value", "") for e in container["env"] if "value" in e}


def run_bucket_job(
    default_render: list[dict[str, Any]], endpoint: str, home: Path, wait: str = "60"
) -> subprocess.CompletedProcess[str]:
    command, rendered_env = bucket_job(default_render)
    env = {**rendered_env, "S3_ENDPOINT_URL": endpoint, "HOME": str(home), "PATH": os.environ["PATH"]}
    env |= {"AWS_ACCESS_KEY_ID": "mlops-test", "AWS_SECRET_ACCESS_KEY": "secret-test", "S3_WAIT_SECONDS": wait}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_the_bucket_job_creates_every_bucket_and_is_idempotent_against_moto_s3_standing_in_for_seaweedfs(
    default_render: list[dict[str, Any]], moto_s3: str, tmp_path: Path
) -> None:
    import boto3

    first = run_bucket_job(default_render, moto_s3, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "created bucket mlflow" in first.stdout
    again = run_bucket_job(default_render, moto_s3, tmp_path)  # post-upgrade: the buckets exist already
    assert again.returncode == 0 and "created bucket" not in again.stdout, again.stderr
    s3 = boto3.client("s3", endpoint_url=moto_s3, aws_access_key_id="x", aws_secret_access_key="y",
                      region_name="us-east-1")  # fmt: skip
    assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == {"mlflow", "checkpoints", "prediction-log"}


def test_the_bucket_job_fails_with_a_message_when_no_s3_answers(
    default_render: list[dict[str, Any]], tmp_path: Path
) -> None:
    result = run_bucket_job(default_render, f"http://127.0.0.1:{free_port()}", tmp_path, wait="3")
    assert result.returncode != 0
    assert "did not answer in time" in result.stderr and "waiting for the S3 API" in result.stdout

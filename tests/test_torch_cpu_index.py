"""torch from the CPU wheel index, in `make setup` and in the image, with a quiet fall-back to PyPI.

PyPI's Linux torch wheel depends on CUDA (several GB of nvidia packages); the CPU index's does not. The
Makefile's torch step (`make torch`, the same recipe `make setup` runs) is run here with a fake pip (the
only fake: it records its arguments and plays a reachable or an unreachable CPU index), so both paths are
exercised without downloading anything. The Dockerfile's step is checked as text (no Docker here).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

FAKE_PIP = """#!/bin/sh
echo "$*" >> "{log}"
case "$*" in
  *--index-url*) [ -z "$CPU_INDEX_DOWN" ] || {{ echo "ERROR: connection refused" >&2; exit 1; }} ;;
esac
exit 0
"""


def run_torch_step(tmp_path: Path, index_down: bool) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "pip.log"
    log.touch()
    pip = bin_dir / "pip"
    pip.write_text(FAKE_PIP.format(log=log))
    pip.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "CPU_INDEX_DOWN": "1" if index_down else ""}
    result = subprocess.run(
        ["make", "-s", "--no-print-directory", "torch", f"BIN={bin_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return result, log.read_text().splitlines()


def test_make_setup_installs_torch_from_the_cpu_index_when_it_answers(tmp_path: Path) -> None:
    result, calls = run_torch_step(tmp_path, index_down=False)
    assert result.returncode == 0, result.stderr
    assert len(calls) == 1, calls
    assert f"--index-url {CPU_INDEX} torch==2.13.0" in calls[0]
    assert result.stdout == result.stderr == ""


def test_make_setup_falls_back_to_pypi_quietly_when_the_cpu_index_is_unreachable(tmp_path: Path) -> None:
    result, calls = run_torch_step(tmp_path, index_down=True)
    assert result.returncode == 0, result.stderr
    assert len(calls) == 2 and "--index-url" in calls[0] and "--index-url" not in calls[1], calls
    assert calls[1].endswith("torch==2.13.0")
    assert result.stderr == ""  # pip's error stays out of sight
    assert result.stdout.strip() == f"torch: {CPU_INDEX} not reachable, torch==2.13.0 from the default index"


def test_make_setup_runs_the_torch_step_before_the_project() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile[makefile.index("$(STAMP): pyproject.toml requirements.lock") :]
    assert recipe.index("$(install_torch)") < recipe.index('-c requirements.lock -e ".[dev,cluster]"')


def test_a_torch_step_without_the_cpu_index_is_caught(tmp_path: Path) -> None:
    """The defect: `pip install torch==2.13.0` from PyPI alone. The same check over a planted Makefile."""
    planted = tmp_path / "Makefile"
    planted.write_text('torch:\n\t$(BIN)/pip install --quiet "torch==2.13.0"\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text(FAKE_PIP.format(log=tmp_path / "pip.log"))
    (bin_dir / "pip").chmod(0o755)
    subprocess.run(["make", "-s", "-f", str(planted), "torch", f"BIN={bin_dir}"], check=True, timeout=60)
    calls = (tmp_path / "pip.log").read_text().splitlines()
    assert not any(f"--index-url {CPU_INDEX}" in call for call in calls)


def dockerfile_run_steps() -> list[str]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]


def test_the_image_installs_torch_from_the_cpu_index_first_with_a_fallback() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert f"ARG TORCH_INDEX={CPU_INDEX}" in text
    steps = [step for step in dockerfile_run_steps() if "pip install" in step]
    torch_steps = [step for step in steps if "torch==2.13.0" in step]
    assert len(torch_steps) == 1
    (torch_step,) = torch_steps
    assert re.search(r'--index-url "\$\{TORCH_INDEX\}" "torch==2\.13\.0"\s+\|\|', torch_step), torch_step
    assert steps.index(torch_step) < next(i for i, s in enumerate(steps) if '".[cluster]"' in s)
    # every other pip step installs through the lock, so it keeps the CPU torch already there
    for step in steps:
        if step is not torch_step and step != "pip install --upgrade pip":
            assert "-c requirements.lock" in step, step


@pytest.mark.parametrize("module", ["aiohttp_cors", "opencensus", "smart_open", "ray.dashboard.optional_deps"])
def test_the_image_build_fails_without_the_ray_dashboard_packages(module: str) -> None:
    assert any(module in step for step in dockerfile_run_steps())

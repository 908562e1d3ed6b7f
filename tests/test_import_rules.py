"""The layering rules of ARCHITECTURE.md, read from the source with `ast`, so an import in the wrong direction fails.

Every import is checked, including the lazy ones inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("core", "control_plane", "components", "pipelines", "serving", "monitoring", "mlops")
CHECKED_ROOTS = (*PROJECT_PACKAGES, "benchmarks")

# package -> the project packages it must never import
FORBIDDEN: dict[str, set[str]] = {
    "core": set(PROJECT_PACKAGES) - {"core"},
    "control_plane": set(PROJECT_PACKAGES) - {"core", "control_plane"},
    "serving": {"components", "pipelines", "monitoring", "mlops"},
    "monitoring": {"serving", "components", "pipelines", "mlops"},
    "components": {"serving", "monitoring", "mlops"},
    "pipelines": {"serving", "monitoring", "mlops"},
}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every absolute import in a module."""
    found: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def violations(root: Path) -> list[Violation]:
    """Every import under `root` that breaks a layering rule."""
    problems: list[Violation] = []
    for top in CHECKED_ROOTS:
        for path in sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []:
            module = _module_name(root, path)
            package = module.split(".")[0]
            own_package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            rel = str(path.relative_to(root))
            for line, imported, names in _imports(ast.parse(path.read_text(), filename=rel)):
                target = imported.split(".")[0]
                if target not in PROJECT_PACKAGES:
                    continue
                if target in FORBIDDEN.get(package, set()):
                    problems.append(Violation(rel, line, f"{package}/ must not import {target}/ ({imported})"))
                if target == "mlops" and package not in ("mlops", "benchmarks"):
                    problems.append(Violation(rel, line, f"only tests/ and benchmarks/ may import mlops/ ({imported})"))
                imported_package = imported.rpartition(".")[0] if names else imported
                if imported_package != own_package and not imported.startswith(own_package + "."):
                    for name in names:
                        if name.startswith("_") and not name.startswith("__"):
                            problems.append(Violation(rel, line, f"private name {name} imported from {imported}"))
    return problems


def test_the_project_keeps_its_import_rules() -> None:
    problems = violations(REPO)
    assert not problems, "imports against ARCHITECTURE.md's layering:\n" + "\n".join(map(str, problems))


def _plant(root: Path, relpath: str, source: str) -> None:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)


def test_an_upward_import_from_core_is_caught(tmp_path: Path) -> None:
    _plant(tmp_path, "core/settings.py", "from serving.gateway import Gateway\n")
    assert [str(v) for v in violations(tmp_path)] == [
        "core/settings.py:1: core/ must not import serving/ (serving.gateway)"
    ]


def test_a_lazy_import_of_mlops_from_serving_is_caught(tmp_path: Path) -> None:
    _plant(tmp_path, "serving/slot.py", "def load():\n    import mlops.local_stack\n")
    messages = [v.message for v in violations(tmp_path)]
    assert "serving/ must not import mlops/ (mlops.local_stack)" in messages
    assert "only tests/ and benchmarks/ may import mlops/ (mlops.local_stack)" in messages


def test_monitoring_importing_serving_or_components_is_caught(tmp_path: Path) -> None:
    _plant(tmp_path, "monitoring/rollout/effects.py", "from serving.slot import x\nfrom components.steps import y\n")
    assert len(violations(tmp_path)) == 2


def test_components_importing_monitoring_is_caught(tmp_path: Path) -> None:
    _plant(tmp_path, "components/steps.py", "from monitoring.rollout.client import RolloutClient\n")
    assert [v.line for v in violations(tmp_path)] == [1]


def test_a_private_name_from_another_package_is_caught_but_not_from_its_own(tmp_path: Path) -> None:
    _plant(tmp_path, "monitoring/rollout/store.py", "from control_plane.store import _make_engine\n")
    _plant(tmp_path, "monitoring/rollout/driver.py", "from monitoring.rollout.store import _helper\n")
    assert [str(v) for v in violations(tmp_path)] == [
        "monitoring/rollout/store.py:1: private name _make_engine imported from control_plane.store"
    ]


def test_benchmarks_may_import_mlops_but_not_private_names(tmp_path: Path) -> None:
    _plant(tmp_path, "benchmarks/rollout.py", "from mlops.local_stack import stack_up\nfrom monitoring.x import _s\n")
    assert [v.line for v in violations(tmp_path)] == [2]


def test_importing_the_service_launcher_builds_no_app() -> None:
    # `mlops serve slot` imports serving.services before it execs BentoML: building a Gateway there (as it once
    # did) starts a prediction log and a policy poller in a process that only wants to exec.
    import subprocess
    import sys

    code = (
        "import sys, serving.services\n"
        "loaded = [m for m in ('serving.gateway', 'serving.slot', 'bentoml') if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""

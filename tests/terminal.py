"""A real terminal for the tests: a private tmux server running one command in a pane of a fixed size, and a
way to run `mlops ARGS` there as a person would, capturing the pane while it runs (Debian's tmux; .ci/run
installs it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.processes import free_port
from tests.conftest import CliResult

REPO = Path(__file__).resolve().parents[1]
EXPORTED = ("MLOPS_", "PATH", "RAY_", "PYTHON")  # what the pane's shell is given of the test's environment


class Tmux:
    """A private tmux server (its own socket) running one command in a pane of a fixed size. The command's
    exit status lands in `<root>/<name>.exit` as `<NAME>_EXIT=<code>`; its stdout, if `stdout` is given,
    in that file (the pane then shows what a person sees of the command: its stderr)."""

    def __init__(self, root: Path, name: str = "watch", width: int = 150, height: int = 24) -> None:
        assert shutil.which("tmux"), "tmux is needed (Debian package tmux; .ci/run installs it)"
        self.socket = f"mlops-test-{os.getpid()}-{free_port()}"
        self.root, self.name, self.width, self.height = root, name, width, height
        self.exit_file = root / f"{name}.exit"

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True).stdout

    def start(self, env: dict[str, str], command: list[str], stdout: Path | None = None) -> None:
        script = self.root / f"{self.name}.sh"
        exports = "".join(f"export {k}={json.dumps(v)}\n" for k, v in env.items() if k.startswith(EXPORTED))
        quoted = " ".join(json.dumps(part) for part in command)
        redirect = f" > {json.dumps(str(stdout))}" if stdout is not None else ""
        script.write_text(
            f"cd {json.dumps(str(REPO))}\n{exports}export TERM=xterm-256color COLUMNS={self.width}\n"
            f'{quoted}{redirect}\necho "{self.name.upper()}_EXIT=$?" > {json.dumps(str(self.exit_file))}\nsleep 600\n'
        )
        self.run("new-session", "-d", "-x", str(self.width), "-y", str(self.height), "bash", str(script))

    def capture(self, ansi: bool = False, history: bool = False) -> str:
        return self.run("capture-pane", "-p", *(["-e"] if ansi else []), *(["-S", "-"] if history else []))

    def exit_code(self) -> int | None:
        if not self.exit_file.exists() or "=" not in (text := self.exit_file.read_text().strip()):
            return None
        return int(text.split("=", 1)[1])

    def stop(self) -> None:
        found = subprocess.run(["tmux", "-L", self.socket, "display", "-p", "#{socket_path}"], capture_output=True)
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        if found.returncode == 0 and found.stdout.strip():
            Path(found.stdout.decode().strip()).unlink(missing_ok=True)  # leave no socket behind


@dataclass
class PaneRun(CliResult):
    """A CLI result whose `stderr` is what a person saw (the pane's whole history at the end), with the pane
    as captured every `interval_s` while the command ran (`frames`: seconds since start, text)."""

    frames: list[tuple[float, str]] = field(default_factory=list)

    @property
    def final(self) -> str:
        return self.stderr


def run_in_tmux(
    args: list[str], env: dict[str, str], root: Path, name: str, timeout: float = 600, interval_s: float = 1.0
) -> PaneRun:
    """Run `mlops ARGS` in a real terminal pane and capture what a person sees while it runs."""
    root.mkdir(parents=True, exist_ok=True)
    tmux = Tmux(root, name, width=120, height=40)
    out = root / f"{name}.stdout"
    frames: list[tuple[float, str]] = []
    started = time.monotonic()
    try:
        tmux.start(env, [sys.executable, "-m", "mlops.cli", *args], stdout=out)
        while (code := tmux.exit_code()) is None:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"`mlops {' '.join(args)}` still running after {timeout:.0f}s:\n{tmux.capture()}")
            frames.append((time.monotonic() - started, tmux.capture()))
            time.sleep(interval_s)
        final = tmux.capture(history=True)
    finally:
        tmux.stop()
    return PaneRun(code, out.read_text() if out.exists() else "", final, frames)

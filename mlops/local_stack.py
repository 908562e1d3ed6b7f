"""The serving stack as local processes: control plane, two model slots, gateway.

Started the way a user starts them (`mlops serve ...`), each in its own process group with its log
under the stack's log folder, health-checked before the next one starts. Used by the tests and the
benchmarks; `mlops up` builds on it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from mlops.processes import ManagedProcess, free_port, mlops_command, start_process, stop_process, wait_until_ready

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("control-plane", "slot-a", "slot-b", "gateway")


@dataclass
class LocalStack:
    home: Path
    token: str = "local-stack-token"
    extra_env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, ManagedProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SERVICES:
            self.ports.setdefault(name, free_port())

    @property
    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")}
        return {
            **base,
            "MLOPS_HOME": str(self.home),
            "MLOPS_CONTROL_PLANE_URL": self.url("control-plane"),
            "MLOPS_CONTROL_PLANE_TOKEN": self.token,
            "MLOPS_SLOT_A_PORT": str(self.ports["slot-a"]),
            "MLOPS_SLOT_B_PORT": str(self.ports["slot-b"]),
            "MLOPS_GATEWAY_PORT": str(self.ports["gateway"]),
            "RAY_USAGE_STATS_ENABLED": "0",
            **self.extra_env,
        }

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def command(self, name: str) -> list[str]:
        if name == "control-plane":
            return mlops_command("serve", "control-plane")
        if name.startswith("slot-"):
            return mlops_command("serve", "slot", "--slot", name[-1])
        return mlops_command("serve", "gateway")

    def start(self, *names: str, timeout: float = 120.0) -> None:
        for name in names or SERVICES:
            managed = start_process(name, self.command(name), self.env, self.home / "logs", cwd=REPO)
            self.processes[name] = managed
            health = "/readyz" if name == "control-plane" else "/healthz"
            wait_until_ready(managed, self.url(name) + health, timeout=timeout)

    def stop(self, *names: str) -> dict[str, int | None]:
        codes = {}
        for name in reversed(names or tuple(self.processes)):
            managed = self.processes.pop(name, None)
            if managed is not None:
                codes[name] = stop_process(managed)
        return codes

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(mlops_command(*args), env=self.env, cwd=REPO, capture_output=True, text=True, check=True)

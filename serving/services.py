"""Launching the BentoML services: a model slot and the gateway, each a Starlette app mounted into BentoML.

BentoML manages the process (supervisor, socket, graceful SIGTERM, /livez, /readyz, /metrics), while
the request path is our Starlette route. Measured here (see README, benchmarks/serving.py): a default
`@bentoml.api` endpoint costs ~10x a bare Starlette app, mostly in per-request tracing spans, access
logging, metrics, and a timeout middleware whose timers live as long as `traffic.timeout`. So the
hot paths are excluded from tracing, BentoML's own access log and request metrics are off (we export
per-variant metrics ourselves through `__metrics__`), the timeout is short, and the heap left by the
imports is frozen at start so full GC passes stay short (they drove p99 above 100 ms).

This module builds no app: `mlops serve slot --slot a` / `mlops serve gateway` import it and exec
`bentoml serve`, which then imports `serving.slot_service` or `serving.gateway_service`; each of those builds
only its own app.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path

from core.settings import Settings

LEAN_SERVICE_CONFIG = {
    "workers": 1,  # one process per slot / gateway; scale with replicas on Kubernetes
    "traffic": {"timeout": 5.0},
    "metrics": {"enabled": False},
    "logging": {"access": {"enabled": False}},
    "tracing": {"excluded_urls": ["/v1/"]},
}
SERVICES = {"slot": "serving.slot_service:ModelSlot", "gateway": "serving.gateway_service:Gateway"}


def log_to_home(settings: Settings, name: str) -> None:
    """Our own loggers go to MLOPS_HOME/logs/<name>.log as well as to stdout."""
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("mlops")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(settings.logs_dir / f"{name}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.addHandler(handler)


def lean_process(torch_threads: bool = True) -> None:
    """One intra-op thread for torch (`torch_threads`: the slots, which score with it; the gateway never imports
    torch, and importing it only to set this took 5 s of a restarted gateway's start on a busy machine), then the
    start-up objects frozen out of the garbage collector's way."""
    if torch_threads:
        import torch

        torch.set_num_threads(1)  # one core per process; intra-op threads only fight over it
    gc.collect()
    gc.freeze()


def serve_service(kind: str, settings: Settings, host: str, port: int, slot: str | None = None) -> None:
    """Replace this process with `bentoml serve`, so SIGTERM reaches BentoML's supervisor directly."""
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "MLOPS_HOME": str(settings.home),
        "BENTOML_DO_NOT_TRACK": "true",
        "BENTOML_HOME": str(settings.home / "bentoml"),
    }
    if slot:
        env["MLOPS_SLOT"] = slot
    bentoml_cli = str(Path(sys.executable).with_name("bentoml"))
    os.execve(
        bentoml_cli,
        [
            bentoml_cli,
            "serve",
            SERVICES[kind],
            "--host",
            host,
            "--port",
            str(port),
            "--working-dir",
            str(repo),
            "--timeout-graceful-shutdown",
            "10",
        ],
        env,
    )

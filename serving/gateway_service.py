"""The gateway as a BentoML service (imported by `bentoml serve` only; see `serving/services.py`)."""

from __future__ import annotations

import bentoml
from prometheus_client import generate_latest

from core.settings import get_settings
from serving.gateway import create_gateway_app
from serving.services import LEAN_SERVICE_CONFIG, lean_process, log_to_home

_SETTINGS = get_settings()
gateway_app = create_gateway_app(_SETTINGS)


@bentoml.asgi_app(gateway_app, path="/")
@bentoml.service(name="gateway", **LEAN_SERVICE_CONFIG)
class Gateway:
    @bentoml.on_startup
    def _startup(self) -> None:
        log_to_home(_SETTINGS, "gateway")
        lean_process(torch_threads=False)  # the gateway scores nothing itself: no torch to import

    def __is_ready__(self) -> bool:
        return bool(gateway_app.state.gateway.policy_loaded)

    async def __metrics__(self, content: str) -> str:
        return content + generate_latest(gateway_app.state.gateway.metrics.registry).decode()

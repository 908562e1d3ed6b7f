"""The model slot as a BentoML service (imported by `bentoml serve` only; see `serving/services.py`)."""

from __future__ import annotations

import os

import bentoml
from prometheus_client import generate_latest

from core.settings import get_settings
from serving.services import LEAN_SERVICE_CONFIG, lean_process, log_to_home
from serving.slot import create_slot_app

_SETTINGS = get_settings()
_SLOT = os.environ.get("MLOPS_SLOT", "a")
slot_app = create_slot_app(_SETTINGS, _SLOT)


@bentoml.asgi_app(slot_app, path="/")
@bentoml.service(name="model-slot", **LEAN_SERVICE_CONFIG)
class ModelSlot:
    @bentoml.on_startup
    def _startup(self) -> None:
        log_to_home(_SETTINGS, f"slot-{_SLOT}")
        lean_process()

    def __is_ready__(self) -> bool:
        return slot_app.state.slot.model is not None

    async def __metrics__(self, content: str) -> str:
        return content + generate_latest(slot_app.state.slot.registry).decode()

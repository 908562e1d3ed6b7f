"""Wiring for `mlops serve controller`: settings → store, effects, spec → the controller app on uvicorn."""

from __future__ import annotations

import logging

import uvicorn
from mlflow import MlflowClient

from control_plane.client import ControlPlaneClient
from control_plane.tokens import resolve_token
from core.settings import Settings
from monitoring.rollout.driver import Controller
from monitoring.rollout.effects import LiveEffects
from monitoring.rollout.service import create_controller_app
from monitoring.rollout.spec import spec_from_setting
from monitoring.rollout.store import RolloutStore


def build_controller(settings: Settings) -> Controller:
    token = resolve_token(settings)
    effects = LiveEffects(
        ControlPlaneClient(settings.control_plane_url, token=token),
        MlflowClient(settings.tracking_uri),
        settings.model_name,
        settings.slot_urls,
    )
    return Controller(
        spec=spec_from_setting(settings.rollout_spec),
        store=RolloutStore(settings.control_plane_db),
        effects=effects,
        log_dir=settings.prediction_log_dir,
        model_name=settings.model_name,
        decision_threshold=settings.decision_threshold,
        hook_secret=settings.hook_secret,
        log_flush_s=settings.log_flush_seconds,
    )


def serve(settings: Settings, host: str, port: int) -> None:
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("mlops")
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.FileHandler(settings.logs_dir / "controller.log"))
    app = create_controller_app(build_controller(settings), resolve_token(settings))
    uvicorn.run(app, host=host, port=port, log_level="warning")

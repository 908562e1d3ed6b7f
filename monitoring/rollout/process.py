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
from monitoring.rollout.prometheus_guardrail import PrometheusClient, source_problems
from monitoring.rollout.service import create_controller_app
from monitoring.rollout.spec import SpecError, spec_from_setting
from monitoring.rollout.store import RolloutStore


def build_controller(settings: Settings) -> Controller:
    spec = spec_from_setting(settings.rollout_spec)
    problems = source_problems(spec, settings.prometheus_url)
    if problems:  # refused before the controller serves: a guardrail that could never judge is a spec error
        raise SpecError(problems, settings.rollout_spec)
    token = resolve_token(settings)
    effects = LiveEffects(
        ControlPlaneClient(settings.control_plane_url, token=token),
        MlflowClient(settings.tracking_uri),
        settings.model_name,
        settings.slot_urls,
    )
    return Controller(
        spec=spec,
        store=RolloutStore(settings.control_plane_db),
        effects=effects,
        log_dir=settings.prediction_log_dir,
        model_name=settings.model_name,
        decision_threshold=settings.decision_threshold,
        hook_secret=settings.hook_secret,
        log_flush_s=settings.log_flush_seconds,
        prometheus=PrometheusClient(settings.prometheus_url) if settings.prometheus_url else None,
        analyses_history_rollouts=settings.analyses_history_rollouts,
    )


def serve(settings: Settings, host: str, port: int) -> None:
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("mlops")
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.FileHandler(settings.logs_dir / "controller.log"))
    app = create_controller_app(build_controller(settings), resolve_token(settings))
    uvicorn.run(app, host=host, port=port, log_level="warning")

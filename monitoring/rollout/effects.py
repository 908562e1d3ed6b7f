"""The controller's real effects: the control-plane API (traffic, slot assignments), the slots'
status endpoints, and MLflow aliases. Monitoring talks to serving only over HTTP."""

from __future__ import annotations

import time
from typing import Any

import httpx
from mlflow import MlflowClient

from control_plane.client import ControlPlaneClient
from core.aliases import CHAMPION, PREVIOUS
from core.registry import alias_version, set_alias, tag_version
from monitoring.rollout.replay import BatchAnswer
from monitoring.rollout.state_machine import SetTraffic


class LiveEffects:
    def __init__(
        self, control: ControlPlaneClient, mlflow: MlflowClient, model_name: str, slot_urls: dict[str, str]
    ) -> None:
        self.control, self.mlflow, self.model_name, self.slot_urls = control, mlflow, model_name, slot_urls

    def set_traffic(self, action: SetTraffic) -> None:
        other = "b" if action.champion_slot == "a" else "a"
        weights = {action.champion_slot: round(1.0 - action.challenger_weight, 9), other: action.challenger_weight}
        self.control.set_policy(weights, action.shadow, action.champion_slot, action.reason[:2000])

    def assign_slot(self, slot: str, version: str) -> None:
        self.control.assign(slot, version)

    def set_alias(self, alias: str, version: str | None) -> None:
        set_alias(self.mlflow, self.model_name, alias, version)

    def mark_rejected(self, version: str, reason: str) -> None:
        tag_version(self.mlflow, self.model_name, version, "mlops.rollout", f"rejected: {reason}")

    def slot_version(self, slot: str) -> str | None:
        try:
            response = httpx.get(f"{self.slot_urls[slot]}/v1/status", timeout=2.0)
        except httpx.HTTPError:
            return None
        return response.json().get("model_version") if response.status_code in (200, 503) else None

    def score_batch(self, slot: str, instances: list[dict[str, Any]]) -> BatchAnswer:
        """One call of the slot's batch API (`POST /v1/predict/batch`); a refusal or no answer is an error."""
        began = time.monotonic()
        try:
            response = httpx.post(
                f"{self.slot_urls[slot]}/v1/predict/batch", json={"instances": instances}, timeout=30.0
            )
            took = (time.monotonic() - began) * 1000
            body = response.json()
        except (httpx.HTTPError, ValueError) as error:
            return BatchAnswer(None, None, f"{type(error).__name__}: {error}"[:300], (time.monotonic() - began) * 1000)
        if response.status_code != 200 or not isinstance(body, dict):
            return BatchAnswer(None, None, f"HTTP {response.status_code}: {str(body)[:200]}", took)
        version = body.get("model_version")
        return BatchAnswer(None if version is None else str(version), list(body.get("scores") or []), None, took)

    def champion(self) -> tuple[str, str, str | None]:
        policy = self.control.get_policy()
        champion = alias_version(self.mlflow, self.model_name, CHAMPION)
        if champion is None:
            raise ValueError(f"model {self.model_name!r} has no champion yet: register one before a rollout")
        return champion, policy.champion_slot, alias_version(self.mlflow, self.model_name, PREVIOUS)

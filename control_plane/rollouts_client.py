"""The one client of the rollout controller's HTTP API (`monitoring/rollout/service.py`).

It lives here, beside the control plane's client, because the pipeline's deploy step (components/) asks the
controller to start a rollout and may not import monitoring/. Every caller (the CLI, the demo, the deploy step,
the scenario runner, the timeline, the benchmarks) goes through it, so URLs and error handling live in one place.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx


class ControllerError(Exception):
    """The controller answered, and refused (4xx/5xx): `status` and the controller's own `error` text."""

    def __init__(self, method: str, path: str, status: int, error: str) -> None:
        super().__init__(f"controller refused {method} {path} ({status}): {error}")
        self.status, self.error = status, error


class ControllerUnavailable(Exception):
    """No answer from the controller (connection refused, timeout, or a body that is not JSON)."""


class RolloutsClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._http = httpx.Client(timeout=timeout)

    def __enter__(self) -> RolloutsClient:
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- reads ---------------------------------------------------------------------------------------

    def rollouts(self) -> list[dict[str, Any]]:
        """Recent rollouts, newest first."""
        return self._call("GET", "/v1/rollouts")["rollouts"]

    def active(self) -> dict[str, Any] | None:
        """The active rollout's view, or None when there is none."""
        try:
            return self._call("GET", "/v1/rollouts/active")
        except ControllerError as error:
            if error.status == 404:
                return None
            raise

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/rollouts/{rollout_id}")

    def decisions(self, rollout_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/rollouts/{rollout_id}/decisions")["decisions"]

    def analyses(self, rollout_id: str, after: int = -1, limit: int | None = None) -> list[dict[str, Any]]:
        """Every recorded analysis of the rollout with ``seq > after``, oldest first (``limit``: the newest N)."""
        query = f"?after={after}" + (f"&limit={limit}" if limit is not None else "")
        return self._call("GET", f"/v1/rollouts/{rollout_id}/analyses{query}")["analyses"]

    def deliveries(self, rollout_id: str) -> list[dict[str, Any]]:
        """Every hook delivery and gate call of the rollout, each with its attempts."""
        return self._call("GET", f"/v1/rollouts/{rollout_id}/deliveries")["deliveries"]

    def latest_analysis(self) -> dict[str, Any] | None:
        """This controller's latest analysis, or None before its first."""
        try:
            return self._call("GET", "/v1/analysis")
        except ControllerError as error:
            if error.status == 404:
                return None
            raise

    # --- writes (bearer token) --------------------------------------------------------------------------

    def start(self, challenger_version: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start a rollout; with `spec` (a rollout spec as a mapping) under that spec instead of the controller's
        (a ControllerError 422 lists its problems, each naming its field)."""
        body: dict[str, Any] = {"challenger_version": challenger_version}
        if spec is not None:
            body["spec"] = spec
        return self._call("POST", "/v1/rollouts", body)

    def promote(self, rollout_id: str, reason: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/rollouts/{rollout_id}/promote", {"reason": reason})

    def abort(self, rollout_id: str, reason: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/rollouts/{rollout_id}/abort", {"reason": reason})

    def pause(self, rollout_id: str, reason: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/rollouts/{rollout_id}/pause", {"reason": reason})

    def resume(self, rollout_id: str, reason: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/rollouts/{rollout_id}/resume", {"reason": reason})

    def approve(self, rollout_id: str, reason: str) -> dict[str, Any]:
        """Open a waiting phase's gate; 409 (ControllerError) when the rollout is not waiting for approval."""
        return self._call("POST", f"/v1/rollouts/{rollout_id}/approve", {"reason": reason})

    # --- one request -----------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._token}"} if method != "GET" and self._token else {}
        try:
            response = self._http.request(method, f"{self.base_url}{path}", json=body, headers=headers)
        except httpx.HTTPError as error:
            raise ControllerUnavailable(f"controller unreachable at {self.base_url}: {error}") from None
        try:
            payload = response.json()
        except ValueError:
            raise ControllerUnavailable(
                f"controller at {self.base_url} answered {method} {path} with {response.status_code} and no JSON"
            ) from None
        if response.status_code >= 400:
            error = payload.get("error") if isinstance(payload, dict) else None
            raise ControllerError(method, path, response.status_code, str(error or payload))
        return payload

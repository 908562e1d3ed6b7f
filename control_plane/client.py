"""Clients for the control-plane API: sync for the rollout controller and CLIs, async for the gateway and slots.

Errors are split by what the caller should do: `ControlPlaneUnavailable` (could not talk to the server at all:
keep serving what you have and retry) versus `ControlPlaneError` (the server answered with an error: fix the
request; `ControlPlaneConflict` for a lost compare-and-set: re-read and decide again).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from control_plane.models import SlotAssignment, TrafficPolicy

# The server caps long-polls at 30 s; asking for more only makes the client's own timeout misleading.
MAX_WAIT_S = 30.0


class ControlPlaneError(Exception):
    """The server answered with an HTTP error; `message` is its error text and `field` the input it blamed."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(f"control plane answered {status}: {message}")
        self.status = status
        self.message = message
        self.field = field


class ControlPlaneConflict(ControlPlaneError):
    """409: the expected generation was stale; `current_generation` is what the server holds now."""

    def __init__(self, status: int, message: str, field: str | None, current_generation: int | None) -> None:
        super().__init__(status, message, field)
        self.current_generation = current_generation


class ControlPlaneUnavailable(ConnectionError):
    """No answer: connection refused, reset, or timed out."""


# ---------------------------------------------------------------------------------------------------------------
# Shared request building and response decoding.


def _auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _wait_params(after: int, wait: float) -> dict[str, str]:
    return {"after": str(after), "wait": str(_clamp_wait(wait))}


def _clamp_wait(wait: float) -> float:
    return min(max(0.0, wait), MAX_WAIT_S)


def _slot_path(slot: str) -> str:
    return f"/v1/slots/{quote(slot, safe='')}"


def _policy_body(
    weights: Mapping[str, float], shadow: bool, champion_slot: str, reason: str, expected_generation: int | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "weights": dict(weights),
        "shadow": shadow,
        "champion_slot": champion_slot,
        "reason": reason,
    }
    if expected_generation is not None:
        body["expected_generation"] = expected_generation
    return body


def _assignment_body(model_version: str | None, expected_generation: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model_version": model_version}
    if expected_generation is not None:
        body["expected_generation"] = expected_generation
    return body


def _error_from(response: httpx.Response) -> ControlPlaneError:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return ControlPlaneError(response.status_code, response.text[:500] or response.reason_phrase)
    message, field = str(data.get("error", response.reason_phrase)), data.get("field")
    if response.status_code == 409:
        return ControlPlaneConflict(409, message, field, data.get("current_generation"))
    return ControlPlaneError(response.status_code, message, field)


def _decode(response: httpx.Response) -> dict[str, Any]:
    if response.is_error:
        raise _error_from(response)
    try:
        data = response.json()
    except ValueError:
        raise ControlPlaneError(response.status_code, "response is not JSON") from None
    if not isinstance(data, dict):
        raise ControlPlaneError(response.status_code, "response is not a JSON object")
    return data


def _policy(data: dict[str, Any]) -> TrafficPolicy:
    try:
        return TrafficPolicy(
            generation=int(data["generation"]),
            weights={str(k): float(v) for k, v in data["weights"].items()},
            shadow=bool(data["shadow"]),
            champion_slot=str(data["champion_slot"]),
            reason=str(data["reason"]),
            updated_at=float(data["updated_at"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ControlPlaneError(200, f"malformed policy in response: {error!r}") from None


def _assignment(data: dict[str, Any]) -> SlotAssignment:
    try:
        version = data["model_version"]
        return SlotAssignment(
            slot=str(data["slot"]),
            model_version=None if version is None else str(version),
            generation=int(data["generation"]),
            updated_at=float(data["updated_at"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ControlPlaneError(200, f"malformed assignment in response: {error!r}") from None


# ---------------------------------------------------------------------------------------------------------------
# Sync client.


class ControlPlaneClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 5.0) -> None:
        self._token = token
        self._timeout = timeout
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        write: bool = False,
        wait: float = 0.0,
    ) -> dict[str, Any]:
        try:
            response = self._http.request(
                method,
                path,
                params=params,
                json=body,
                headers=_auth_headers(self._token) if write else None,
                timeout=self._timeout + wait,
            )
        except httpx.TransportError as error:
            raise ControlPlaneUnavailable(f"{method} {path}: {error!r}") from error
        return _decode(response)

    def get_policy(self) -> TrafficPolicy:
        return _policy(self._request("GET", "/v1/policy"))

    def wait_policy(self, after: int, wait: float) -> TrafficPolicy:
        """The policy once its generation exceeds `after`, or the current one after `wait` seconds."""
        return _policy(self._request("GET", "/v1/policy", params=_wait_params(after, wait), wait=_clamp_wait(wait)))

    def set_policy(
        self,
        weights: Mapping[str, float],
        shadow: bool,
        champion_slot: str,
        reason: str,
        expected_generation: int | None = None,
    ) -> TrafficPolicy:
        body = _policy_body(weights, shadow, champion_slot, reason, expected_generation)
        return _policy(self._request("PUT", "/v1/policy", body=body, write=True))

    def policy_history(self, limit: int = 50) -> list[TrafficPolicy]:
        data = self._request("GET", "/v1/policy/history", params={"limit": str(limit)})
        return [_policy(item) for item in data.get("policies", [])]

    def get_assignment(self, slot: str) -> SlotAssignment:
        return _assignment(self._request("GET", _slot_path(slot)))

    def get_assignments(self) -> dict[str, SlotAssignment]:
        data = self._request("GET", "/v1/slots")
        return {slot: _assignment(item) for slot, item in data.get("slots", {}).items()}

    def wait_assignment(self, slot: str, after: int, wait: float) -> SlotAssignment:
        params = _wait_params(after, wait)
        return _assignment(self._request("GET", _slot_path(slot), params=params, wait=_clamp_wait(wait)))

    def assign(self, slot: str, model_version: str | None, expected_generation: int | None = None) -> SlotAssignment:
        body = _assignment_body(model_version, expected_generation)
        return _assignment(self._request("PUT", _slot_path(slot), body=body, write=True))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# Async client: what the gateway and the slots run inside their event loops.


class AsyncControlPlaneClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 5.0) -> None:
        self._token = token
        self._timeout = timeout
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        write: bool = False,
        wait: float = 0.0,
    ) -> dict[str, Any]:
        try:
            response = await self._http.request(
                method,
                path,
                params=params,
                json=body,
                headers=_auth_headers(self._token) if write else None,
                timeout=self._timeout + wait,
            )
        except httpx.TransportError as error:
            raise ControlPlaneUnavailable(f"{method} {path}: {error!r}") from error
        return _decode(response)

    async def get_policy(self) -> TrafficPolicy:
        return _policy(await self._request("GET", "/v1/policy"))

    async def wait_policy(self, after: int, wait: float) -> TrafficPolicy:
        params = _wait_params(after, wait)
        return _policy(await self._request("GET", "/v1/policy", params=params, wait=_clamp_wait(wait)))

    async def set_policy(
        self,
        weights: Mapping[str, float],
        shadow: bool,
        champion_slot: str,
        reason: str,
        expected_generation: int | None = None,
    ) -> TrafficPolicy:
        body = _policy_body(weights, shadow, champion_slot, reason, expected_generation)
        return _policy(await self._request("PUT", "/v1/policy", body=body, write=True))

    async def get_assignment(self, slot: str) -> SlotAssignment:
        return _assignment(await self._request("GET", _slot_path(slot)))

    async def wait_assignment(self, slot: str, after: int, wait: float) -> SlotAssignment:
        params = _wait_params(after, wait)
        return _assignment(await self._request("GET", _slot_path(slot), params=params, wait=_clamp_wait(wait)))

    async def assign(
        self, slot: str, model_version: str | None, expected_generation: int | None = None
    ) -> SlotAssignment:
        body = _assignment_body(model_version, expected_generation)
        return _assignment(await self._request("PUT", _slot_path(slot), body=body, write=True))

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

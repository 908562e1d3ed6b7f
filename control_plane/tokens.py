"""The bearer token for control-plane writes, shared by every local process through one private file, and the
one check of a bearer token that every service (control plane, controller, slot, gateway) uses."""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

TOKEN_FILE_NAME = "control-plane.token"


@dataclass(frozen=True)
class TokenRejected:
    """Why a request's credential was refused: 401 (none, or not a bearer token: the client should
    authenticate, hence the challenge header) or 403 (a bearer token, but not the right one)."""

    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


def check_bearer(authorization: str | None, expected: str) -> TokenRejected | None:
    """None when `authorization` is `Bearer <expected>`; else what to answer. Constant-time comparison."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if not authorization or not authorization.strip():
        return TokenRejected(401, "missing Authorization: Bearer <token>", challenge)
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return TokenRejected(401, "Authorization must be 'Bearer <token>'", challenge)
    if not hmac.compare_digest(credentials.encode("utf-8"), expected.encode("utf-8")):
        return TokenRejected(403, "token not accepted")
    return None


class _TokenSettings(Protocol):
    control_plane_token: str
    home: Path


def token_path(settings: _TokenSettings) -> Path:
    return settings.home / TOKEN_FILE_NAME


def resolve_token(settings: _TokenSettings) -> str:
    """`MLOPS_CONTROL_PLANE_TOKEN` when set, else the token in `home/control-plane.token`, created on first use."""
    return configured_or_file_token(settings.control_plane_token, token_path(settings))


def configured_or_file_token(configured: str, path: Path) -> str:
    """The configured token when there is one, else the one in `path` (mode 0600), created on first use: every
    local process that resolves it gets the same token."""
    if configured:
        return configured
    return _read_token(path) or _create_token(path)


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def _create_token(path: Path) -> str:
    """Write to a private temp file, then hard-link it into place: the token file appears complete or not at
    all, and when two processes race, both end up with the winner's token."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
        try:
            os.link(temp, path)
        except FileExistsError:
            return _wait_for_token(path)
        return token
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _wait_for_token(path: Path, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        existing = _read_token(path)
        if existing:
            return existing
        time.sleep(0.05)
    raise RuntimeError(f"{path} exists but holds no token; delete it to generate a new one")

"""One JSON answer for the routing errors Starlette raises itself (404 no such path, 405 wrong method), shared by
every service (the control plane, the gateway, the slots, the controller), so that a client's every 4xx is a JSON
object whose `error` says what was wrong: which method and path, and for a 405 which methods the path takes."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = f"{exc.detail}: {request.method} {request.url.path}"
    allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
    if exc.status_code == 405 and allowed:
        error += f" (this path takes {allowed})"
    return JSONResponse({"error": error, "field": None}, exc.status_code, headers=exc.headers)


EXCEPTION_HANDLERS = {HTTPException: http_error}

"""A real local HTTP receiver for rollout hooks: records every request (path, headers, body, whether its
signature verifies) and answers with the status its script says, for the scenarios and the tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from core.processes import free_port
from monitoring.rollout.hooks import EVENT_HEADER, SIGNATURE_HEADER, verify_signature


@dataclass
class Received:
    at: float
    path: str
    event: str | None
    signature: str | None
    signature_ok: bool
    body: dict[str, Any]


@dataclass
class HookReceiver:
    """`answer(path, event, call_number) -> status` decides each reply (default 200); `delay_s` makes it slow."""

    secret: str
    answer: Callable[[str, str | None, int], int] = lambda _path, _event, _n: 200
    delay_s: float = 0.0
    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                event = self.headers.get(EVENT_HEADER)
                signature = self.headers.get(SIGNATURE_HEADER)
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"_raw": raw.decode(errors="replace")}
                with receiver._lock:
                    calls = sum(1 for r in receiver.received if r.path == self.path and r.event == event) + 1
                    receiver.received.append(
                        Received(time.time(), self.path, event, signature,
                                 verify_signature(receiver.secret, raw, signature), body)
                    )  # fmt: skip
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                status = receiver.answer(self.path, event, calls)
                payload = json.dumps({"status": status}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: Any) -> None:
                return

        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hook-receiver", daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> HookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def events(self, path: str | None = None) -> list[str | None]:
        with self._lock:
            return [r.event for r in self.received if path is None or r.path == path]

"""The gateway's call to a slot survives a keep-alive connection the slot closes as it is reused.

The slot's server (uvicorn) closes idle connections after 5 s; a pooled connection reused at that moment dies
before any answer ("Server disconnected"). Before this fix such a request was an error, and for a champion (no
fallback) a 503 to the client: the intermittent failures of `post-promotion-regression`. A real TCP server
here closes the first connection without answering and answers on the next one.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from types import SimpleNamespace

import aiohttp
import pytest

from serving.gateway import SLOT_KEEPALIVE_S, Gateway, SlotFailure

ANSWER = b'{"score": 0.1, "model_version": "1"}'


class DroppingServer:
    """Closes the first `drops` connections as soon as a request arrives; answers 200 on the others."""

    def __init__(self, drops: int) -> None:
        self.drops, self.connections = drops, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.connections += 1
                conn.recv(65536)
                if self.connections <= self.drops:
                    continue  # closed without a byte of answer
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(ANSWER)}\r\n"
                conn.sendall(head.encode() + b"Connection: close\r\n\r\n" + ANSWER)

    def close(self) -> None:
        self.sock.close()


async def _post_once(port: int) -> bytes:
    async with aiohttp.ClientSession() as session:
        gateway = SimpleNamespace(session=session, slot_urls={"a": f"http://127.0.0.1:{port}"})
        return await Gateway._post(gateway, "a", "/v1/predict", b"{}", 5.0)  # type: ignore[arg-type]


def test_a_connection_closed_before_any_answer_is_retried_once_on_a_new_one() -> None:
    server = DroppingServer(drops=1)
    try:
        assert asyncio.run(_post_once(server.port)) == ANSWER
        assert server.connections == 2
    finally:
        server.close()


def test_a_slot_that_keeps_dropping_is_a_slot_failure_after_one_retry() -> None:
    server = DroppingServer(drops=5)
    try:
        with pytest.raises(SlotFailure, match="ServerDisconnectedError"):
            asyncio.run(_post_once(server.port))
        assert server.connections == 2
    finally:
        server.close()


def test_pooled_connections_are_dropped_before_the_slots_server_closes_them() -> None:
    uvicorn_keep_alive_s = 5  # uvicorn's default timeout_keep_alive, which BentoML's server keeps
    assert uvicorn_keep_alive_s > SLOT_KEEPALIVE_S

"""The coalescing httptools protocol: whole responses in one socket write, nothing reordered."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import uvicorn

from freshrec.devstack import free_port
from service.http import CoalescingHttpToolsProtocol, _CoalescingTransport


class _RecordingTransport:
    """A stand-in socket transport that records write calls (pure logic under test)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_writes_of_one_loop_turn_leave_in_one_call_and_close_flushes_first() -> None:
    async def scenario() -> _RecordingTransport:
        raw = _RecordingTransport()
        t = _CoalescingTransport(raw, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"body")
        assert raw.writes == []  # nothing until the loop turns
        await asyncio.sleep(0)
        assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        t.write(b"last")
        t.close()  # written before close: still sent, before the close
        assert raw.writes[-1] == b"last" and raw.closed
        assert t.get_extra_info("peername") == "info:peername"  # everything else delegates
        await asyncio.sleep(0)  # the scheduled flush finds nothing left
        return raw

    raw = asyncio.run(scenario())
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"last"]


async def _app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stream":  # a streamed (chunked) answer in several parts
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"a" * 70_000, b"b", b"c"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    payload = b"echo:" + body
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture
def server_url():
    port = free_port()
    config = uvicorn.Config(_app, host="127.0.0.1", port=port, http=CoalescingHttpToolsProtocol,
                            log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        threading.Event().wait(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_keep_alive_requests_get_their_own_complete_answers(server_url: str) -> None:
    with httpx.Client(base_url=server_url) as client:
        for i in range(50):
            body = f"request-{i}".encode() * (1 + i * 50)
            r = client.post("/echo", content=body)
            assert r.status_code == 200 and r.content == b"echo:" + body
        r = client.get("/stream")
        assert r.content == b"a" * 70_000 + b"bc"

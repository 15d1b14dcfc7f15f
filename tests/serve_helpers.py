"""Helpers shared by the guard's tests: plain HTTP calls, SSE parsing, a relay that makes vLLM slow or down."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.error
import urllib.request

TINY_MODEL_NAME = "tiny"  # the name the session's vLLM server (conftest.tiny_vllm) answers to


# -- helpers ------------------------------------------------------------------------------------------------------
def http(url, body=None, *, key=None, method=None, timeout=60, raw=None, headers=None):
    """(status, headers, parsed JSON or text) of one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json", **(headers or {})}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, text = resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, text = e.code, dict(e.headers), e.read().decode()
    try:
        return status, hdrs, json.loads(text)
    except json.JSONDecodeError:
        return status, hdrs, text


def sse_events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        block = block.strip()
        if block.startswith("data:"):
            payload = block[5:].strip()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """A TCP relay in front of vLLM on a fixed port, to make vLLM slow (``delay``) or down (``stop()``)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.delay = 0.0
        self._loop = asyncio.new_event_loop()
        self._server = None
        self._writers: set = set()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()

    async def _pipe(self, reader, writer, delayed: bool) -> None:
        try:
            while data := await reader.read(65536):
                if delayed and self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True))

    def start(self) -> None:
        async def go():
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        asyncio.run_coroutine_threadsafe(go(), self._loop).result(10)

    def stop(self) -> None:
        async def go():  # refuse new connections and break the open ones, as a dead server would
            self._server.close()
            for w in self._writers:
                w.close()
            self._writers.clear()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(go(), self._loop).result(10)

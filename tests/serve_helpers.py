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


class FakeOpenAI:
    """An in-process stand-in for vLLM's OpenAI server: answers ``/v1/completions`` and ``/v1/chat/completions``
    (streamed as server-sent events, or whole) with ``self.chunks`` joined, ``/v1/models`` with ``model`` and
    ``/health``. Switches: ``status`` (answer every generation with that status and an OpenAI error body),
    ``malformed_after`` (send a malformed event after that many chunks), ``cut_after`` (close the connection after
    that many chunks). ``requests`` keeps the bodies it received."""

    def __init__(self, chunks: list[str], model: str = "m") -> None:
        from aiohttp import web

        self.chunks, self.model = list(chunks), model
        self.status = 200
        self.malformed_after: int | None = None
        self.cut_after: int | None = None
        self.requests: list[dict] = []
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", lambda request: web.Response())
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self._runner = web.AppRunner(app, access_log=None)

        async def start():
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            return self._runner.addresses[0][1]

        self.url = f"http://127.0.0.1:{asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)}"

    def close(self) -> None:
        if self._runner is not None:  # a test may close it (vLLM gone) before its fixture does
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._runner = None

    async def _models(self, request):
        from aiohttp import web

        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    def _choice(self, text: str, chat: bool, stream: bool, finish: str | None) -> dict:
        if chat:
            key = "delta" if stream else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}
        return {"index": 0, "text": text, "finish_reason": finish}

    async def _generate(self, request):
        from aiohttp import web

        body = await request.json()
        self.requests.append(body)
        chat = request.path.endswith("/chat/completions")
        if self.status != 200:
            error = {"error": {"message": "refused", "type": "BadRequestError", "code": self.status}}
            return web.json_response(error, status=self.status)
        base = {"id": "cmpl-1", "created": 1, "model": self.model}
        if not body.get("stream"):
            kind = "chat.completion" if chat else "text_completion"
            choice = self._choice("".join(self.chunks), chat, False, "stop")
            return web.json_response({**base, "object": kind, "choices": [choice]})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"
        for i, text in enumerate(self.chunks):
            if i == self.malformed_after:
                await out.write(b"data: {not json\n\n")
            if i == self.cut_after:
                request.transport.close()
                return out
            event = {**base, "object": kind, "choices": [self._choice(text, chat, True, None)]}
            await out.write(f"data: {json.dumps(event)}\n\n".encode())
        last = {**base, "object": kind, "choices": [self._choice("", chat, True, "stop")]}
        await out.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        return out

"""The floor of any proxy hop: a pass-through HTTP proxy on the guard's own stack (aiohttp on asyncio's event loop),
doing nothing a guard does. ``benchmarks/serving.py --policies relay`` puts it where the guard goes, so that the
run shows how much of guarded/bare is the hop itself (reading each upstream event and writing it again, on the
same cores as vLLM) and how much is the guard's own work.

What it does per request: reads the client's body, sends it unchanged to the upstream, and copies the answer's
bytes back as they arrive (streamed answers chunk by chunk, as the guard's ``monitor`` relays events). No parsing,
no scoring, no audit.

    python benchmarks/relay_floor.py --upstream http://127.0.0.1:8001 --port 18081
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
# Hop-by-hop and length headers are the proxy's own to set; every other header passes unchanged.
_DROPPED = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


async def forward(request: web.Request) -> web.StreamResponse:
    """Send the request upstream unchanged and copy the answer back as its bytes arrive."""
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED}
    session = request.app[SESSION]
    async with session.request(request.method, request.app[UPSTREAM] + request.rel_url.raw_path_qs,
                               data=body, headers=headers) as up:  # fmt: skip
        out = web.StreamResponse(status=up.status)
        for k, v in up.headers.items():
            if k.lower() not in _DROPPED:
                out.headers[k] = v
        await out.prepare(request)
        async for chunk in up.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


def build_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application):
        # As the guard's upstream session: no connection limit, idle connections dropped before vLLM closes them.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="base URL of the server to relay to")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    print(f"relay: http://{args.host}:{args.port} -> {args.upstream}", flush=True)
    web.run_app(build_app(args.upstream), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()

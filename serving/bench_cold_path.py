"""What an HTTP layer costs per call when its code runs cold, as the gateway's does between vLLM answers.

    python -m adaptloop.serving.bench_cold_path                      # 600 calls each, JSON on stdout
    python -m adaptloop.serving.bench_cold_path --calls 600 --idle-ms 75 --json bench-cold-path.json

Every gateway call arrives after tens of milliseconds idle (vLLM is working), so the gateway's code
runs from cold caches on a CPU that may have halted. This measures one round trip to four servers,
each alone on the last CPU, from an aiohttp caller (the gateway's upstream client) on the others at
real-time priority where permitted, back to back and with ``--idle-ms`` idle before each call:

- ``socket``: a bare uvloop socket server (no HTTP framework): the baseline of every ratio;
- ``asgi``: a pure ASGI app on uvicorn (httptools, uvloop);
- ``lean``: the gateway's completion path: ASGI, a Starlette ``Request`` and ``JSONResponse``;
- ``fastapi``: the same handler as a FastAPI route (the gateway's completion path before d762c85).

And the two clients the gateway bench could call with, against ``socket`` with the same idle gap:
``http.client`` (standard library) and aiohttp. Prints one line per server and client with its ratio
to the baseline; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import httpx
import uvloop
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from adaptloop.processes import ManagedProcess, pin_to_cpus
from adaptloop.serving.bench_gateway import realtime_priority, summary
from adaptloop.ops.stack import free_port

SERVERS = ("socket", "asgi", "lean", "fastapi")
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 1}).encode()
ANSWER = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                          "content": "Yes"}}]}


class _SocketServer(asyncio.Protocol):
    """HTTP/1.1 keep-alive by hand: a request ends after its headers and ``content-length`` bytes."""

    answer = b"".join((b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ",
                       str(len(json.dumps(ANSWER))).encode(), b"\r\n\r\n", json.dumps(ANSWER).encode()))

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.transport.write(self.answer)


async def _asgi(scope: dict[str, Any], receive: Callable, send: Callable) -> None:
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    json.loads(body)
    out = json.dumps(ANSWER).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


def _app(kind: str) -> Any:
    async def handle(request: Request) -> JSONResponse:
        await request.json()
        return JSONResponse(ANSWER, headers={"x-adaptloop-role": "base"})

    if kind == "asgi":
        return _asgi
    api = FastAPI()
    if kind == "fastapi":
        api.post("/v1/chat/completions")(handle)
        return api

    async def lean(scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
            response = await handle(Request(scope, receive))
            await response(scope, receive, send)
        else:
            await api(scope, receive, send)
    return lean


def serve(kind: str, port: int, cpu: int) -> None:
    pin_to_cpus(str(cpu))
    if kind == "socket":
        async def run() -> None:
            server = await asyncio.get_running_loop().create_server(_SocketServer, "127.0.0.1", port)
            await server.serve_forever()
        uvloop.run(run())
        return
    import uvicorn

    uvicorn.run(_app(kind), host="127.0.0.1", port=port, log_level="warning", access_log=False, loop="uvloop")


async def _round_trips(call: Callable[[], Awaitable[None]], calls: int, idle_s: float) -> list[float]:
    times = []
    for i in range(calls + 20):
        if idle_s:
            time.sleep(idle_s)  # the caller idles too, as the gateway bench's caller does during direct calls
        t0 = time.perf_counter()
        await call()
        if i >= 20:  # warm-up: connection, first-call paths
            times.append((time.perf_counter() - t0) * 1000)
    return times


async def _with_aiohttp(url: str, calls: int, idle_s: float) -> list[float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False) as client:
        async def call() -> None:
            async with client.post(url, data=BODY, headers={"content-type": "application/json"}) as response:
                await response.read()
                response.raise_for_status()
        return await _round_trips(call, calls, idle_s)


async def _with_http_client(url: str, calls: int, idle_s: float) -> list[float]:
    host_port = url.split("/")[2]
    connection = http.client.HTTPConnection(host_port, timeout=30)

    async def call() -> None:
        connection.request("POST", "/v1/chat/completions", BODY, {"content-type": "application/json"})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status}")
    try:
        return await _round_trips(call, calls, idle_s)
    finally:
        connection.close()


def _ready(url: str) -> bool:
    try:
        httpx.post(url, content=BODY, headers={"content-type": "application/json"}, timeout=2)
    except httpx.HTTPError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptloop.serving.bench_cold_path",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=600, help="timed calls per server and gap (default 600)")
    parser.add_argument("--idle-ms", type=float, default=75.0, help="idle before each cold call (default 75, "
                        "about one vLLM answer here)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.cpu)
        return 0

    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, caller_cpus = cpus[-1], set(cpus[:-1]) or {cpus[-1]}
    logs = Path(tempfile.mkdtemp(prefix="adaptloop-bench-cold-"))
    result: dict[str, Any] = {"calls": args.calls, "idle_ms": args.idle_ms, "server_cpu": server_cpu,
                              "caller_cpus": sorted(caller_cpus), "servers": {}, "clients": {}}
    idle_s = args.idle_ms / 1000
    os.sched_setaffinity(0, caller_cpus)
    for kind in SERVERS:
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        server = ManagedProcess(kind, [sys.executable, "-m", "adaptloop.serving.bench_cold_path", "--serve", kind,
                                       "--port", str(port), "--cpu", str(server_cpu)], logs / f"{kind}.log")
        try:
            server.start().wait_ready(lambda: _ready(url), timeout_s=60, poll_s=0.2)
            with realtime_priority() as priority:
                timed = {"back_to_back": uvloop.run(_with_aiohttp(url, args.calls, 0)),
                         "after_idle": uvloop.run(_with_aiohttp(url, args.calls, idle_s))}
                if kind == "socket":
                    result["clients"] = {"http.client": summary(uvloop.run(_with_http_client(url, args.calls, idle_s))),
                                         "aiohttp": summary(timed["after_idle"])}
            result["caller_priority"] = priority
        finally:
            server.stop()
        result["servers"][kind] = {gap: summary(times) for gap, times in timed.items()}

    baseline = result["servers"]["socket"]
    for kind, gaps in result["servers"].items():
        for gap, figures in gaps.items():
            figures["ratio_to_socket_p50"] = round(figures["p50_ms"] / baseline[gap]["p50_ms"], 2)
        print(f"{kind:>8}: back to back p50 {gaps['back_to_back']['p50_ms']:.3f} / p99 {gaps['back_to_back']['p99_ms']:.3f} ms "
              f"(x{gaps['back_to_back']['ratio_to_socket_p50']}); after {args.idle_ms:.0f} ms idle p50 "
              f"{gaps['after_idle']['p50_ms']:.3f} / p99 {gaps['after_idle']['p99_ms']:.3f} ms "
              f"(x{gaps['after_idle']['ratio_to_socket_p50']})")
    clients = result["clients"]
    for name, figures in clients.items():
        print(f"{name:>12} to socket after idle: p50 {figures['p50_ms']:.3f} / p99 {figures['p99_ms']:.3f} ms "
              f"(x{figures['p50_ms'] / clients['http.client']['p50_ms']:.2f} of http.client)")
    print(f"caller {result['caller_priority']} on CPUs {result['caller_cpus']}, servers on CPU {server_cpu}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An open-loop HTTP/1.1 load generator that stays cheap at thousands of requests per second: Poisson
arrivals fired by one scheduling coroutine (no task per request), persistent (keep-alive)
connections opened ahead and taken from an idle pool, responses parsed by Content-Length, and each
latency measured from the request's *scheduled* time, so queueing anywhere — in this client too — is
not hidden (no coordinated omission). Runs on uvloop when it is installed."""

import asyncio
import gc
import random
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    status: int  # 0: the connection failed
    latency_s: float  # from the scheduled send time to the end of the response
    scheduled: float = 0.0  # the scheduled send time, time.monotonic()


class _Conn(asyncio.Protocol):
    def __init__(self, pool: "_Pool") -> None:
        self.pool = pool
        self.buf = b""
        self.scheduled: float | None = None  # the request in flight on this connection
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, scheduled: float) -> None:
        self.scheduled = scheduled
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.scheduled is not None and b"\r\n\r\n" in self.buf:
            head, rest = self.buf.split(b"\r\n\r\n", 1)
            lines = head.lower().split(b"\r\n")
            length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")), 0)
            if len(rest) < length:
                return
            self.buf = rest[length:]
            self.pool.results.append(Result(int(head.split(b" ", 2)[1]), time.monotonic() - self.scheduled, self.scheduled))
            self.scheduled = None
            if b"connection: close" in lines and self.transport is not None:
                self.transport.close()
            else:
                self.pool.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        if self.scheduled is not None:
            self.pool.results.append(Result(0, time.monotonic() - self.scheduled, self.scheduled))
            self.scheduled = None


@dataclass
class _Pool:
    host: str
    port: int
    idle: list[_Conn] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)

    async def open(self) -> _Conn:
        _, conn = await asyncio.get_running_loop().create_connection(lambda: _Conn(self), self.host, self.port)
        return conn


async def run(host: str, port: int, request: bytes, rate: float, seconds: float, seed: int = 0, connections: int = 512) -> list[Result]:
    """Sends `request` (complete HTTP/1.1 bytes, keep-alive) at Poisson arrivals of `rate` per second
    for `seconds`; returns one Result per request."""
    pool = _Pool(host, port)
    pool.idle = list(await asyncio.gather(*(pool.open() for _ in range(connections))))
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while t < seconds:
        t += rng.expovariate(rate)
        arrivals.append(t)
    gc.collect()
    gc.freeze()
    start = time.monotonic() + 0.05
    opening: set[asyncio.Task[None]] = set()

    async def later(scheduled: float) -> None:  # no idle connection: open one for this request
        try:
            conn = await pool.open()
        except OSError:
            pool.results.append(Result(0, time.monotonic() - scheduled, scheduled))
            return
        conn.send(request, scheduled)

    for at in arrivals:
        scheduled = start + at
        wait = scheduled - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if pool.idle:
            pool.idle.pop().send(request, scheduled)
        else:
            task = asyncio.ensure_future(later(scheduled))
            opening.add(task)
            task.add_done_callback(opening.discard)
    deadline = time.monotonic() + 60
    while len(pool.results) < len(arrivals) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for c in pool.idle:
        if c.transport is not None:
            c.transport.close()
    gc.unfreeze()
    return pool.results


def post(host: str, path: str, body: bytes, ctype: str = "image/png") -> bytes:
    """A keep-alive POST request's bytes."""
    return f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def loop_run(coro):  # type: ignore[no-untyped-def]
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)

"""A cap on the requests one client address has in flight (docs/security.md#connections): a client
that opens many connections and holds them (slow bodies, slow reads) cannot take every worker slot
from the others. Over the cap: 429 `too_many_connections` with Retry-After, before anything else is
done for the request. The paths open without a key (probes, metrics, the page) are not counted.
Behind a proxy every request comes from the proxy's address unless uvicorn is told to trust its
forwarding headers (`--forwarded-allow-ips`)."""

from collections import Counter

from starlette.types import ASGIApp, Receive, Scope, Send

from service.serve.admission import discard_body, refuse
from service.serve.errors import ServiceError
from service.serve.metrics import Metrics
from service.serve.settings import Settings


class ClientConcurrency:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        assert settings.per_address_concurrency is not None  # installed only when set
        self.cap: int = settings.per_address_concurrency
        self.inflight: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.settings.public(scope["path"]):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("", 0))[0]
        if self.inflight[address] >= self.cap:
            self.metrics.errors.labels("too_many_connections").inc()
            e = ServiceError(
                429,
                "too_many_connections",
                f"this address has {self.inflight[address]} requests in flight, the cap is {self.cap}",
                retry_after=1,
            )
            await refuse(send, e, scope["path"])
            await discard_body(receive)
            return
        self.inflight[address] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight[address] -= 1
            if not self.inflight[address]:
                del self.inflight[address]

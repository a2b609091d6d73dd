"""Per-client quotas (docs/security.md#quotas): requests and images per window for each API key, or
for each client address when the server has no keys, counted by `limits`' sliding-window counters —
in this process's memory by default, or in any `limits` storage (`redis://…`) so that every replica
counts against the same budget. Over a quota: 429 `rate_limited` with `Retry-After`, before the body
is read for the request quota and before any image is decoded for the image quota."""

import hashlib
import math
import time

from limits import RateLimitItem, parse, storage, strategies

from service.serve.errors import ServiceError
from service.serve.metrics import Metrics
from service.serve.settings import Settings


def client_id(key: str | None, address: str) -> str:
    """Whom a quota counts: a key by a short digest of it (never the key), else the client address."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12] if key is not None else "addr:" + address


def metric_label(client: str) -> str:
    """Key digests are bounded by the configured keys; addresses are not, so they share one label."""
    return client if client.startswith("key:") else "anonymous"


class Quotas:
    def __init__(self, requests: RateLimitItem | None, images: RateLimitItem | None, storage_uri: str, metrics: Metrics) -> None:
        self.requests, self.images, self.metrics = requests, images, metrics
        self.limiter = strategies.SlidingWindowCounterRateLimiter(storage.storage_from_string(storage_uri))

    @classmethod
    def configured(cls, settings: Settings, metrics: Metrics) -> "Quotas | None":
        """The settings' quotas, or None when none is set (no counters, no storage)."""
        requests, images = _parse(settings.request_quota, "request_quota"), _parse(settings.image_quota, "image_quota")
        return cls(requests, images, settings.quota_storage, metrics) if requests or images else None

    def charge_request(self, client: str) -> None:
        self._charge(self.requests, "requests", client, 1)

    def charge_images(self, client: str, n: int) -> None:
        self._charge(self.images, "images", client, n)

    def _charge(self, item: RateLimitItem | None, what: str, client: str, cost: int) -> None:
        if item is None or cost <= 0 or self.limiter.hit(item, what, client, cost=cost):
            return
        self.metrics.rate_limited.labels(metric_label(client), what).inc()
        stats = self.limiter.get_window_stats(item, what, client)
        wait = max(1, math.ceil(stats.reset_time - time.time()))
        raise ServiceError(429, "rate_limited", f"over the {what} quota of {item} for this client ({cost} asked)", retry_after=wait)


def _parse(spec: str | None, name: str) -> RateLimitItem | None:
    if not spec:
        return None
    try:
        return parse(spec)
    except ValueError:
        raise ValueError(f"{name} {spec!r} is not a rate such as '100/second' or '5000 per hour'") from None

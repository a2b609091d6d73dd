"""Query-pattern monitoring (docs/security.md#query-patterns): the signature of a decision-based
attack (Chen, Carlini & Wagner, "Stateful Detection of Black-Box Adversarial Attacks", 2019) is many
queries, from one client, of images that are near-duplicates of each other while the attack walks
along the decision boundary. Per client, each scored image's grey 16×16 thumbnail is compared with
the client's recent ones (a sliding window); near-duplicates and flagged images are counted as
metrics, on which an alert rule fires.

The distance is the root-mean-square difference of the thumbnails (values in [0, 1]); NEAR was
chosen on part A of the calibration halves of MNIST and CIFAR-10 (docs/security.md#query-patterns):
no clean image of 2,000 was within it of one of the 256 before it, while HopSkipJump's queries are.
"""

import time
from collections import OrderedDict

import numpy as np

from service.serve.metrics import Metrics
from service.serve.quotas import metric_label

WINDOW_S = 600.0  # how long a client's thumbnails are remembered
PER_CLIENT = 256  # thumbnails kept per client, the most recent
CLIENTS = 1024  # clients tracked, the most recently seen: at most CLIENTS × PER_CLIENT × 256 bytes (64 MiB)
SIDE = 16  # thumbnail side
NEAR = 0.03  # RMS thumbnail distance at or under which two images are near-duplicates


def thumbnail(x: np.ndarray) -> np.ndarray:
    """x (C, H, W) in [0, 1] -> (SIDE², ) uint8: the grey image averaged over a grid of at most
    SIDE × SIDE blocks (fewer for an image smaller than SIDE), zero-padded to SIDE². Numpy only: it
    runs on the event loop."""
    grey = np.asarray(x, dtype=np.float32).mean(0)  # (H, W)
    rows, cols = (np.linspace(0, n, min(SIDE, n) + 1).astype(int)[:-1] for n in grey.shape)
    sums = np.add.reduceat(np.add.reduceat(grey, rows, axis=0), cols, axis=1)  # block sums
    means = sums / np.outer(np.diff([*rows, grey.shape[0]]), np.diff([*cols, grey.shape[1]]))
    out = np.zeros(SIDE * SIDE, np.uint8)
    out[: means.size] = np.round(means.reshape(-1) * 255).clip(0, 255)
    return out


def rms_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS difference in [0, 1] units between each thumbnail of a (n, SIDE²) and b (SIDE²,) -> (n,)."""
    d = a.astype(np.float32) - b.astype(np.float32)
    return np.sqrt((d * d).mean(1)) / 255


class Recent:
    """One client's last PER_CLIENT thumbnails and when each was seen, a ring."""

    def __init__(self) -> None:
        self.thumbs = np.zeros((PER_CLIENT, SIDE * SIDE), np.uint8)
        self.times = np.full(PER_CLIENT, -np.inf)
        self.next = 0

    def near(self, t: np.ndarray, now: float) -> bool:
        live = self.times >= now - WINDOW_S
        return bool(live.any()) and bool((rms_distance(self.thumbs[live], t) <= NEAR).any())

    def add(self, t: np.ndarray, now: float) -> None:
        self.thumbs[self.next], self.times[self.next] = t, now
        self.next = (self.next + 1) % PER_CLIENT


class QueryMonitor:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.seen: OrderedDict[str, Recent] = OrderedDict()
        metrics.near_duplicates.labels("anonymous")  # a series from the start, for rules and dashboards
        metrics.client_flagged.labels("anonymous")

    def observe(self, client: str, x: np.ndarray, flagged: bool) -> bool:
        """Counts one scored image of `client`; True when it is a near-duplicate of a recent one."""
        now, t = time.monotonic(), thumbnail(x)
        recent = self.seen.pop(client, None) or Recent()
        near = recent.near(t, now)
        recent.add(t, now)
        self.seen[client] = recent  # the most recently seen client last
        if len(self.seen) > CLIENTS:
            self.seen.popitem(last=False)
        label = metric_label(client)
        if near:
            self.metrics.near_duplicates.labels(label).inc()
        if flagged:
            self.metrics.client_flagged.labels(label).inc()
        return near

"""Query-pattern monitoring (docs/security.md#query-patterns): the signature of a decision-based
attack (Chen, Carlini & Wagner, "Stateful Detection of Black-Box Adversarial Attacks", 2019) is many
queries, from one client, of images that are near-duplicates of each other while the attack walks
along the decision boundary. Per client, each scored image's 64-bit average hash is compared with
the client's recent ones (a sliding window); near-duplicates and flagged images are counted as
metrics, on which an alert rule fires.
"""

import time
from collections import OrderedDict, deque

import numpy as np

from service.serve.metrics import Metrics
from service.serve.quotas import metric_label

WINDOW_S = 600.0  # how long a client's hashes are remembered
PER_CLIENT = 512  # hashes kept per client, the most recent
CLIENTS = 4096  # clients tracked, the most recently seen
NEAR = 6  # Hamming distance (of 64 bits) at or under which two images are near-duplicates


def average_hash(x: np.ndarray) -> int:
    """x (C, H, W) in [0, 1], H, W >= 8 -> 64 bits: the grey image averaged over an 8×8 grid of blocks,
    each block above the mean a 1. Numpy only: it runs on the event loop."""
    grey = np.asarray(x, dtype=np.float32).mean(0)  # (H, W)
    rows, cols = (np.linspace(0, n, 9).astype(int)[:-1] for n in grey.shape)
    sums = np.add.reduceat(np.add.reduceat(grey, rows, axis=0), cols, axis=1)  # (8, 8) block sums
    cells = (sums / np.outer(np.diff([*rows, grey.shape[0]]), np.diff([*cols, grey.shape[1]]))).reshape(-1)
    return int(np.packbits(cells > cells.mean(), bitorder="little").view("<u8")[0])


def hamming(a: np.ndarray, b: int) -> np.ndarray:
    """Bit distances between each of the uint64 hashes a (n,) and b."""
    x = np.bitwise_xor(a, np.uint64(b))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1)


class QueryMonitor:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.seen: OrderedDict[str, deque[tuple[float, int]]] = OrderedDict()
        metrics.near_duplicates.labels("anonymous")  # a series from the start, for rules and dashboards
        metrics.client_flagged.labels("anonymous")

    def observe(self, client: str, x: np.ndarray, flagged: bool) -> bool:
        """Counts one scored image of `client`; True when it is a near-duplicate of a recent one."""
        now, h = time.monotonic(), average_hash(x)
        recent = self.seen.pop(client, None) or deque(maxlen=PER_CLIENT)
        while recent and recent[0][0] < now - WINDOW_S:
            recent.popleft()
        near = bool(recent) and bool((hamming(np.fromiter((v for _, v in recent), np.uint64), h) <= NEAR).any())
        recent.append((now, h))
        self.seen[client] = recent  # the most recently seen client last
        if len(self.seen) > CLIENTS:
            self.seen.popitem(last=False)
        label = metric_label(client)
        if near:
            self.metrics.near_duplicates.labels(label).inc()
        if flagged:
            self.metrics.client_flagged.labels(label).inc()
        return near

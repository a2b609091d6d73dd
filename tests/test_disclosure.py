"""bench/disclosure.py's query-only attacker: the oracle's query cap ends an attack, it does not crash the run."""

import numpy as np
import pytest
import torch

from bench import disclosure
from service.core.bundle import Bundle
from service.serve.metrics import Metrics
from service.serve.monitor import QueryMonitor


def test_hop_skip_jump_stops_at_the_query_cap_and_keeps_its_best(
    mnist: Bundle, digits: tuple[torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a cap far below what HopSkipJump asks for, the attack returns the nearest image the service
    passed (the oracle's best, else its start) instead of raising out of ART."""
    monkeypatch.setattr(disclosure, "CAP", 60)
    x, y = digits
    oracle = disclosure.Oracle(mnist, x[0].numpy(), int(y[0]), 0.3, "linf", True, QueryMonitor(Metrics()), "key:test")
    init = disclosure.start(oracle, x[1:].numpy(), y[1:].numpy())
    assert init is not None
    final = disclosure.hop_skip_jump(oracle, init, iters=25)
    assert oracle.queries >= 60
    assert final.shape == oracle.x0.shape
    best = oracle.best if oracle.best is not None else init
    assert np.array_equal(final, best)
    cls, flags = disclosure.verdicts(mnist, torch.from_numpy(final[None]), True)
    assert cls[0] != int(y[0]) and not flags[0]  # what the attacker keeps still passes the service

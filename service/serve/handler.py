"""The detect handler (docs/api.md#detect): what a request asks for, its images through the batcher,
and each image's verdict from `service.core.decision`. The routes parse and shape; this decides."""

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import Request

from service.core import decision
from service.core.scores import DEFAULT, thresholded_all
from service.fisher import HEATMAPS
from service.serve.batcher import Job, Reservation
from service.serve.detector import ImageResult, Outcome
from service.serve.errors import ServiceError, bad_request
from service.serve.state import Served, State


@dataclass(frozen=True)
class Ask:
    """What one detect request asks for, validated."""

    scores: tuple[str, ...]  # shown in the response; the decision's scores are always computed
    heatmaps: tuple[str, ...]
    alpha: float
    deadline: float  # time.monotonic()
    full: bool = True  # disclosure: everything, or only the predicted class and the flag


@dataclass(frozen=True)
class Judged:
    """One image's verdict: the outcome, its shown scores and their p-values, the decision p-value and flag."""

    result: ImageResult
    scores: dict[str, float]
    p_values: dict[str, float]
    p_value: float
    flagged: bool
    statistic: float  # what the decision ranks (Calibration.decision_statistic)


def names(raw: str | None, known: dict[str, Any] | tuple[str, ...], what: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma list (or `all`) of known names; 400 naming the unknown ones."""
    if raw is None or raw == "":
        return default
    if raw == "all":
        return tuple(known)
    picked = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    bad = [n for n in picked if n not in known]
    if bad:
        raise bad_request(f"unknown {what} {bad}; known: {sorted(known)}")
    return picked


def shows_details(request: Request, state: State) -> bool:
    """Whether this client may see continuous quantities (docs/security.md#disclosure): the server's
    level, lowered to `verdict` for a verdict-only key."""
    return state.settings.level() == "full" and getattr(request.state, "disclosure", "full") == "full"


def ask(
    state: State,
    served: Served,
    scores: str | None,
    heatmaps: str | None,
    alpha: float | None,
    timeout_ms: float | None,
    t0: float,
    full: bool = True,
) -> Ask:
    """Validates a request's query against the model's bundle, the settings, the calibration and what
    the client may see (`full`)."""
    bundle, s = served.bundle, state.settings
    assert bundle is not None and bundle.calibration is not None
    shown = tuple(dict.fromkeys((*names(scores, bundle.scores, "scores", DEFAULT), *bundle.calibration.decision_scores)))
    maps = names(heatmaps, HEATMAPS, "heatmaps", ())
    if maps and not full:
        raise ServiceError(403, "forbidden", "this client gets the verdict only: no heatmaps (disclosure level verdict)")
    a = alpha if alpha is not None else (s.alpha or bundle.calibration.alpha)
    if not s.min_alpha <= a <= s.max_alpha:
        raise ServiceError(422, "validation_error", f"alpha {a} is outside [{s.min_alpha}, {s.max_alpha}]")
    deadline = t0 + min(timeout_ms or float("inf"), s.request_timeout_ms) / 1000
    return Ask(shown, maps, a, deadline, full)


def admitted(request: Request, state: State, name: str | None) -> tuple[Served, Reservation]:
    """The model version the admission reserved room on for this request, and that room
    (serve/admission.py); 404 for a model that is not served."""
    served = getattr(request.state, "served", None) or state.model(name)
    return served, request.state.reservation


def charge_images(request: Request, state: State, n: int) -> None:
    """The client's image quota, charged for n images before any is decoded (429 when over it)."""
    if state.quotas is not None:
        state.quotas.charge_images(getattr(request.state, "client", "addr:"), n)


def watch(request: Request, state: State, x: torch.Tensor, flagged: bool) -> None:
    """One scored image into the client's query-pattern counts (serve/monitor.py)."""
    if state.monitor is not None:
        state.monitor.observe(getattr(request.state, "client", "addr:"), x.numpy(), flagged)


async def run(
    served: Served, request: Request, images: list[torch.Tensor | ServiceError], spec: Ask, held: Reservation
) -> tuple[list[Outcome], list[Job]]:
    """Queues the decoded images into the room held for them on the model's batcher, waits for them, and
    returns one outcome per slot."""
    good = [x for x in images if isinstance(x, torch.Tensor)]
    jobs = served.batcher.submit(good, frozenset(spec.scores), frozenset(spec.heatmaps), spec.deadline, held)
    await _await_jobs(request, jobs, spec.deadline)
    done = iter(j.future.result() for j in jobs)
    return [next(done) if isinstance(x, torch.Tensor) else x for x in images], jobs


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _await_jobs(request: Request, jobs: list[Job], deadline: float) -> None:
    """Waits for the images; a disconnect or the deadline cancels them (queued work is then dropped)."""
    pending: set[asyncio.Future[Any]] = {j.future for j in jobs}
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        while pending:
            finished, _ = await asyncio.wait(
                pending | {gone}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if not finished or gone in finished:
                for j in jobs:
                    j.future.cancel()
                if gone in finished:
                    raise ServiceError(499, "client_closed_request", "the client disconnected")
                raise ServiceError(503, "queue_timeout", "the request's deadline passed before its images were scored", retry_after=1)
            pending -= finished
    finally:
        gone.cancel()


def judge(state: State, served: Served, result: ImageResult, spec: Ask) -> Judged:
    """The decision for one scored image, counted in the model's metrics; details withheld when configured."""
    assert served.bundle.calibration is not None
    cal = served.bundle.calibration
    t = thresholded_all(result.scores)
    verdict = decision.decide(cal, {k: t[k].reshape(1) for k in cal.decision_scores}, spec.alpha, np.array([result.predicted]))
    p, flagged, statistic = float(verdict.p_value[0]), bool(verdict.flagged[0]), float(verdict.statistic[0])
    served.metrics.p_value.observe(p)
    if flagged:
        served.metrics.flagged.inc()
    shown = {k: result.scores[k] for k in spec.scores}
    pv = {k: float(np.asarray(v)) for k, v in decision.score_p_values(cal, {k: t[k] for k in spec.scores}).items()}
    if not spec.full:  # gradient information helps an adaptive attacker
        shown, pv = {}, {}
    return Judged(result, shown, pv, p, flagged, statistic)

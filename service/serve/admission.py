"""Admission (docs/architecture.md#admission): refuse before reading. A pure ASGI middleware that,
for the routes that queue images, answers 503 from the queue's state before the body is read —
no parsing, no decoding, nothing allocated per pixel — and otherwise holds room for the request's
first image on the named model's batcher until its images are queued or the request ends. The
request then stays with that model version, even when a reload swaps in another meanwhile."""

import asyncio
import json
import re
from collections.abc import Callable
from types import SimpleNamespace

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.serve.errors import ServiceError, error_body
from service.serve.state import State

DETECT = re.compile(r"^/v1/(?:models/(?P<model>[^/]+)/)?detect$")  # POST routes whose images go through a batcher
INFER = re.compile(r"^/v2/models/(?P<model>[^/]+)(?P<versions>/versions/[^/]+)?/infer$")


def queued_model(scope: Scope) -> tuple[bool, str | None]:
    """Whether the request queues images, and the model it names (None: the default)."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return False, None
    m = DETECT.match(scope["path"]) or INFER.match(scope["path"])
    return (m is not None), (m.group("model") if m else None)


def route_template(path: str) -> str:
    """The route label of a refused request: the template, never the client's model name (bounded labels)."""
    if m := INFER.match(path):
        return "/v2/models/{model_name}/versions/{model_version}/infer" if m.group("versions") else "/v2/models/{model_name}/infer"
    if (m := DETECT.match(path)) and m.group("model"):
        return "/v1/models/{model_name}/detect"
    return path


class Admission:
    def __init__(self, app: ASGIApp, state: Callable[[], State]) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        queues, name = queued_model(scope)
        state = self.state()
        if not queues or (name is not None and name not in state.models):  # the route answers 404 for a model not served
            await self.app(scope, receive, send)
            return
        held = None
        try:
            state.check_ready()
            if state.quotas is not None:
                state.quotas.charge_request(scope.get("state", {}).get("client", "addr:"))
            served = state.model(name)
            b = served.batcher
            held = b.reserve(1)
            if held is None:
                raise ServiceError(
                    503, "overloaded", f"queue of {name or 'the default model'} holds {b.occupied} of {b.max_queue} images", retry_after=1
                )
        except ServiceError as e:
            state.metrics.errors.labels(e.code).inc()
            scope["route"] = SimpleNamespace(path=route_template(scope["path"]))  # the route label of the request metrics
            await refuse(send, e, scope["path"])
            await discard_body(receive)
            return
        scope.setdefault("state", {}).update(reservation=held, served=served)  # the version that scores it, even across a reload
        state.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.inflight -= 1
            held.release()


async def refuse(send: Send, e: ServiceError, path: str) -> None:
    """The error as the route's JSON error body, with Retry-After, sent before the request body is read."""
    body = json.dumps(error_body(e, path)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if e.retry_after is not None:
        headers.append((b"retry-after", str(e.retry_after).encode()))
    start: Message = {"type": "http.response.start", "status": e.status, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body})


async def discard_body(receive: Receive, within_s: float = 1.0) -> None:
    """Reads and drops what the client is still sending (no parsing, nothing kept) for a moment, so that
    closing the connection does not reset it before the client has read the refusal."""
    try:
        async with asyncio.timeout(within_s):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
    except TimeoutError:
        return

"""Request ids, API-key authentication, security headers and JSON access logs, as one pure ASGI
middleware. Logs carry no bodies and no keys."""

import hashlib
import hmac
import json
import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.serve.errors import ServiceError, error_body
from service.serve.quotas import client_id
from service.serve.settings import Settings
from service.serve.tracing import trace_id

log = logging.getLogger("fisherguard.access")
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; connect-src 'self' data:; style-src 'self'; "
    "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def digests(keys: list[str]) -> dict[str, bytes]:
    """Each configured key's SHA-256 digest, computed once."""
    return {k: hashlib.sha256(k.encode()).digest() for k in keys}


def matched_key(header: str | None, keys: dict[str, bytes]) -> str | None:
    """The configured key that `Bearer <key>` names, compared in constant time: SHA-256 digests
    (equal lengths, so not even the key's length leaks), every key compared (no early exit)."""
    if not header or not header.startswith("Bearer "):
        return None
    given = hashlib.sha256(header[len("Bearer ") :].encode()).digest()
    hits = [k for k, digest in keys.items() if hmac.compare_digest(given, digest)]
    return hits[0] if hits else None


def _error(status: int, code: str, message: str, request_id: str, path: str) -> tuple[Message, Message]:
    body = json.dumps(error_body(ServiceError(status, code, message), path)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"x-request-id", request_id.encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="fisherguard"'))
    return {"type": "http.response.start", "status": status, "headers": headers}, {"type": "http.response.body", "body": body}


class AccessControl:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings, self.keys, self.verdict_keys = app, settings, digests(settings.keys()), set(settings.verdict_keys())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path, t0, status = scope["path"], time.perf_counter(), 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                h = MutableHeaders(scope=message)
                h["x-request-id"] = request_id
                h["x-content-type-options"] = "nosniff"
                if path == "/":
                    h["content-security-policy"] = PAGE_CSP
                    h["x-frame-options"] = "DENY"
                    h["referrer-policy"] = "no-referrer"
            await send(message)

        try:
            key = matched_key(headers.get(b"authorization", b"").decode("latin-1"), self.keys) if self.keys else None
            if self.keys and not self.settings.public(path) and key is None:
                start, body = _error(
                    401, "unauthorized", "this server needs an API key: send `Authorization: Bearer <key>`", request_id, path
                )
                await send_wrapper(start)
                await send(body)
                return
            scope["state"]["client"] = client_id(key, (scope.get("client") or ("", 0))[0])  # whom quotas count
            if key is not None and key in self.verdict_keys:
                scope["state"]["disclosure"] = "verdict"  # what this client may see (docs/security.md#disclosure)
            await self.app(scope, receive, send_wrapper)
        finally:
            log.info(
                "request",
                extra={
                    "fields": {
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": path,
                        "status": status,
                        "duration_ms": round(1000 * (time.perf_counter() - t0), 2),
                        "client": (scope.get("client") or ("", 0))[0],
                    }
                    | ({"trace_id": tid} if (tid := trace_id()) else {})
                },
            )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `fields` passed in `extra`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if settings.log_format == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())

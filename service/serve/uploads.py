"""Reading a detect request's images: the body within its limit, a raw image or multipart fields
named `file`, and decoding them to the card's input in the threadpool (docs/api.md#detect)."""

import asyncio

import torch
from fastapi import Request
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from service.core.bundle import Bundle
from service.core.images import ImageError, open_image, pixels, to_tensor
from service.serve.errors import ServiceError, bad_request, from_image_error
from service.serve.settings import Settings

Upload = tuple[str | None, bytes]  # (filename, bytes)


async def read_body(request: Request, limit: int, timeout_ms: float) -> bytes:
    """The body, refused as soon as it passes the limit (declared or streamed), or 408 (closing the
    connection) when it has not all arrived within timeout_ms: a client trickling its body cannot
    hold a queue slot and a connection for long."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, "payload_too_large", f"body is {declared} bytes, the limit is {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ServiceError(413, "payload_too_large", f"body passed {limit} bytes, the limit")
                chunks.append(chunk)
    except ClientDisconnect:
        raise ServiceError(499, "client_closed_request", "the client disconnected while sending the body") from None
    except TimeoutError:
        raise ServiceError(
            408, "request_timeout", f"the body did not arrive within {timeout_ms:g} ms ({size} bytes came)", close=True
        ) from None
    return b"".join(chunks)


async def uploads(request: Request, settings: Settings) -> list[Upload]:
    """(filename, bytes) for each image: a raw image body or multipart fields named `file`."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (ctype.startswith("image/") or ctype in ("application/octet-stream", "multipart/form-data")):
        raise ServiceError(
            415, "unsupported_media_type", f"content-type {ctype or '(none)'!r}: send an image/* body or multipart/form-data"
        )
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_ms)
    if ctype != "multipart/form-data":
        files: list[Upload] = [(None, body)]
    else:
        files = await _multipart(request, body, settings)
    check_count(len(files), settings)
    return files


def check_count(n: int, settings: Settings) -> None:
    """413 for a request of more images than `max_images_per_request`."""
    if n > settings.max_images_per_request:
        raise ServiceError(413, "payload_too_large", f"{n} images, the limit is {settings.max_images_per_request} per request")


async def _multipart(request: Request, body: bytes, settings: Settings) -> list[Upload]:
    request._body = body  # the form parser reads the body we already hold
    try:
        form = await request.form(max_files=settings.max_images_per_request + 1, max_fields=settings.max_images_per_request + 16)
    except Exception as e:  # noqa: BLE001 - python-multipart raises several types on malformed input
        raise bad_request(f"malformed multipart body: {e}") from None
    files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
    if not files:
        raise bad_request("multipart body has no file fields named 'file'")
    return [(f.filename, await f.read()) for f in files]


async def decode_all(files: list[Upload], bundle: Bundle, settings: Settings) -> list[torch.Tensor | ServiceError]:
    """Each image decoded to the card's (C, H, W), or the error of its own slot. Every header is read
    first: a request whose images claim more pixels together than `max_request_pixels` is refused
    (413) before any pixel is decoded."""
    return await run_in_threadpool(_decode_all, files, bundle, settings)


def _decode_all(files: list[Upload], bundle: Bundle, settings: Settings) -> list[torch.Tensor | ServiceError]:
    opened = [_open(data, settings) for _, data in files]
    total = sum(pixels(img) for img in opened if isinstance(img, Image.Image))
    if total > settings.max_request_pixels:
        raise ServiceError(
            413, "payload_too_large", f"the request's images claim {total} pixels together, the limit is {settings.max_request_pixels}"
        )
    spec = bundle.input
    out: list[torch.Tensor | ServiceError] = []
    for img in opened:
        try:
            out.append(to_tensor(img, spec) if isinstance(img, Image.Image) else img)
        except ImageError as e:
            out.append(from_image_error(e))
    return out


def _open(data: bytes, settings: Settings) -> Image.Image | ServiceError:
    """The image's header, or the error of its slot (too many bytes or pixels, not an image)."""
    if len(data) > settings.max_image_bytes:
        return ServiceError(413, "payload_too_large", f"image is {len(data)} bytes, the limit is {settings.max_image_bytes}")
    try:
        return open_image(data, settings.max_image_pixels)
    except ImageError as e:
        return from_image_error(e)

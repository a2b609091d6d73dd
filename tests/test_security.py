"""Hostile input, limits, authentication, headers and logs: every bad input gets a fast 4xx."""

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.bundle import Bundle
from service.serve.app import create_app
from service.serve.settings import Settings
from tests.conftest import png

PNG = {"content-type": "image/png"}


def _client(mnist: Bundle, **kw) -> TestClient:  # type: ignore[no-untyped-def]
    return TestClient(create_app(Settings(device="cpu", **kw), bundle=mnist))


def _code(r) -> str:  # type: ignore[no-untyped-def]
    assert r.headers["content-type"].startswith("application/json"), r.text
    return str(r.json()["error"]["code"])


def encode(img: Image.Image, fmt: str, **kw) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def digit(digits) -> Image.Image:  # type: ignore[no-untyped-def]
    x, _ = digits
    return Image.fromarray((x[3, 0] * 255).round().byte().numpy(), "L")


@pytest.fixture(scope="module")
def label(digits) -> int:  # type: ignore[no-untyped-def]
    return int(digits[1][3])


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("PNG", "L"),
        ("PNG", "LA"),
        ("PNG", "RGB"),
        ("PNG", "RGBA"),
        ("PNG", "P"),
        ("PNG", "I;16"),
        ("JPEG", "L"),
        ("JPEG", "RGB"),
        ("JPEG", "CMYK"),
        ("WEBP", "RGB"),
        ("WEBP", "RGBA"),
        ("BMP", "RGB"),
        ("TIFF", "RGB"),
        ("TIFF", "CMYK"),
        ("GIF", "P"),
    ],
)
def test_formats_and_modes(client: TestClient, digit: Image.Image, label: int, fmt: str, mode: str) -> None:
    img = (
        digit.convert(mode)
        if mode != "I;16"
        else Image.fromarray((torch.from_numpy(__import__("numpy").asarray(digit)).int() * 257).numpy().astype("uint16"))
    )
    kw = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    r = client.post("/v1/detect", content=encode(img, fmt, **kw), headers={"content-type": f"image/{fmt.lower()}"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["predicted_class"] == label


def test_gif_uses_its_first_frame(client: TestClient, digit: Image.Image, label: int) -> None:
    other = Image.new("L", digit.size, 255)
    buf = io.BytesIO()
    digit.convert("P").save(buf, "GIF", save_all=True, append_images=[other.convert("P")])
    r = client.post("/v1/detect", content=buf.getvalue(), headers={"content-type": "image/gif"})
    assert r.json()["results"][0]["predicted_class"] == label


def test_exif_orientation_is_applied(client: TestClient, digit: Image.Image, label: int) -> None:
    rotated = digit.transpose(Image.Transpose.ROTATE_90)  # stored sideways, EXIF says "rotate 270 to view"
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(rotated.convert("RGB"), "JPEG", quality=95, exif=exif.tobytes())
    r = client.post("/v1/detect", content=data, headers={"content-type": "image/jpeg"})
    assert r.json()["results"][0]["predicted_class"] == label


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code"),
    [
        (b"", "image/png", 400, "bad_image"),
        (b"hello world", "image/png", 400, "bad_image"),
        (b"<html><body>hi</body></html>", "image/png", 400, "bad_image"),
        (b'{"image": "abc"}', "image/png", 400, "bad_image"),
        (b'{"image": "abc"}', "application/json", 415, "unsupported_media_type"),
        (b"<html></html>", "text/html", 415, "unsupported_media_type"),
        (b"x", "", 415, "unsupported_media_type"),
        (b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nx\r\n', "multipart/form-data; boundary=zzz", 400, "bad_request"),
    ],
)
def test_bad_bodies_get_a_4xx(client: TestClient, body: bytes, ctype: str, status: int, code: str) -> None:
    r = client.post("/v1/detect", content=body, headers={"content-type": ctype} if ctype else {})
    assert r.status_code == status and _code(r) == code


def test_truncated_and_foreign_images(client: TestClient, digit: Image.Image) -> None:
    data, jpeg = encode(digit, "PNG"), encode(digit, "JPEG", quality=95)
    for bad in (data[: len(data) // 2], data[:40], jpeg[: int(len(jpeg) * 0.6)]):
        r = client.post("/v1/detect", content=bad, headers=PNG)
        assert r.status_code == 400 and _code(r) == "bad_image", r.text
    ico = encode(digit.convert("RGB"), "ICO")
    r = client.post("/v1/detect", content=ico, headers=PNG)
    assert r.status_code == 415 and "'ICO'" in r.json()["error"]["message"]


def test_a_wrong_content_type_header_still_decodes_an_image(client: TestClient, digit: Image.Image, label: int) -> None:
    r = client.post("/v1/detect", content=encode(digit, "PNG"), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["results"][0]["predicted_class"] == label


def test_per_image_byte_limit(mnist: Bundle, digit: Image.Image) -> None:
    with _client(mnist, max_image_bytes=100) as c:
        r = c.post("/v1/detect", content=encode(digit, "BMP"), headers={"content-type": "image/bmp"})
        assert r.status_code == 413 and "limit is 100" in r.json()["error"]["message"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_images_never_cause_a_5xx(client: TestClient, digit: Image.Image, data: st.DataObject) -> None:
    fmt = data.draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]))
    raw = bytearray(encode(digit.convert("RGB") if fmt == "JPEG" else digit, fmt))
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[at : at + data.draw(st.integers(1, 64))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    r = client.post("/v1/detect", content=bytes(raw), headers=PNG)
    assert r.status_code in (200, 400, 413, 415), r.text
    assert r.status_code == 200 or _code(r) in ("bad_image", "payload_too_large", "unsupported_media_type")


def _bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def test_bombs_in_a_multipart_request_fail_their_own_slot(client: TestClient, digit: Image.Image) -> None:
    files = [("file", ("ok.png", encode(digit, "PNG"), "image/png")), ("file", ("bomb.png", _bomb(50_000, 50_000), "image/png"))]
    res = client.post("/v1/detect", files=files).json()["results"]
    assert res[0]["status"] == "ok" and res[1]["error"]["code"] == "payload_too_large"


def test_api_keys(mnist: Bundle, tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    keyfile = tmp_path / "keys"
    keyfile.write_text("# team keys\nfile-key-1\n\n")
    with _client(mnist, api_keys="env-key-1, env-key-2", api_keys_file=keyfile) as c:
        r = c.post("/v1/detect", content=png(x[0]), headers=PNG)
        assert r.status_code == 401 and _code(r) == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/v1/model", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/model", headers={"authorization": "env-key-1"}).status_code == 401  # no scheme
        for key in ("env-key-1", "env-key-2", "file-key-1"):
            assert c.post("/v1/detect", content=png(x[0]), headers=PNG | {"authorization": f"Bearer {key}"}).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics", "/", "/static/app.js"):
            assert c.get(open_path).status_code == 200, open_path
        assert "fisherguard_requests_total" in c.get("/metrics").text
    with _client(mnist, api_keys="k", public_paths="/healthz") as c:
        assert c.get("/metrics").status_code == 401 and c.get("/readyz").status_code == 401
        assert c.get("/healthz").status_code == 200


def test_request_ids_and_security_headers(client: TestClient) -> None:
    r = client.get("/healthz", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and r.headers["x-content-type-options"] == "nosniff"
    r = client.get("/healthz", headers={"x-request-id": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces" and len(r.headers["x-request-id"]) == 32
    page = client.get("/")
    assert "default-src 'self'" in page.headers["content-security-policy"] and page.headers["x-frame-options"] == "DENY"
    assert "access-control-allow-origin" not in client.get("/healthz", headers={"origin": "https://evil.example"}).headers


def test_cors_when_configured(mnist: Bundle) -> None:
    with _client(mnist, cors_origins="https://app.example") as c:
        r = c.options("/v1/detect", headers={"origin": "https://app.example", "access-control-request-method": "POST"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.options("/v1/detect", headers={"origin": "https://evil.example", "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in r.headers


def test_details_can_be_withheld_from_untrusted_clients(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    with _client(mnist, expose_details=False) as c:
        body = c.post("/v1/detect?scores=all", content=png(x[0]), headers=PNG).json()
        res = body["results"][0]
        assert set(res) == {"index", "filename", "status", "predicted_class", "label", "decision"} and "timing_ms" not in body
        assert set(res["decision"]) == {"statistic", "tail", "alpha", "flagged"}  # expose_details=false is disclosure=verdict
        r = c.post("/v1/detect?heatmaps=fis", content=png(x[0]), headers=PNG)
        assert r.status_code == 403 and _code(r) == "forbidden"


def test_access_logs_are_json_with_the_request_id_and_no_secrets(mnist: Bundle, digits, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    from service.serve.access import JsonFormatter

    x, _ = digits
    with caplog.at_level(logging.INFO, logger="fisherguard.access"), _client(mnist, api_keys="sekrit-key") as c:
        c.post("/v1/detect", content=png(x[0]), headers=PNG | {"authorization": "Bearer sekrit-key", "x-request-id": "req-42"})
    lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "fisherguard.access"]
    entry = next(json.loads(line) for line in lines if '"req-42"' in line)
    assert entry["path"] == "/v1/detect" and entry["status"] == 200 and entry["method"] == "POST" and entry["duration_ms"] > 0
    assert not any("sekrit" in line or "PNG" in line for line in lines)


def test_a_server_with_keys_declares_them_in_its_openapi_document(mnist: Bundle) -> None:
    with TestClient(create_app(Settings(device="cpu", api_keys="k1"), bundle=mnist)) as c:
        doc = c.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "one of the server's API keys",
    }
    assert doc["paths"]["/v1/detect"]["post"]["security"] == [{"bearer": []}]
    assert doc["paths"]["/v2/models/{model_name}/infer"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"] and "security" not in doc["paths"]["/v2/health/ready"]["get"]
    with TestClient(create_app(Settings(device="cpu"), bundle=mnist)) as c:
        assert "securitySchemes" not in c.get("/openapi.json").json().get("components", {})


def test_keys_are_compared_as_digests() -> None:
    from service.serve.access import digests, matched_key

    keys = digests(["k0", "k1"])
    assert matched_key("Bearer k1", keys) == "k1" and matched_key("Bearer k", keys) is None and matched_key("Bearer k1x", keys) is None
    assert matched_key("k1", keys) is None and matched_key(None, keys) is None and matched_key("Bearer ", keys) is None


def test_a_client_trickling_its_body_is_cut_off_and_holds_nothing(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    """A slow-body client (slowloris): one byte a second is answered 408 at the body timeout, its
    connection closed and its queue room given back."""
    import select
    import socket
    import time

    import httpx

    from tests.conftest import serving

    x, _ = digits
    app = create_app(Settings(device="cpu", body_timeout_ms=600), bundle=mnist)
    with serving(app) as base:
        host, port = base.removeprefix("http://").split(":")
        s = socket.create_connection((host, int(port)))
        s.settimeout(5)
        s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n")
        t0, data = time.monotonic(), b""
        for _ in range(15):  # a byte every 0.2 s until the server answers
            if select.select([s], [], [], 0.2)[0]:
                break
            s.sendall(b"\x89")
        try:
            while chunk := s.recv(65536):  # the server answers, then closes: recv returns b""
                data += chunk
        except ConnectionResetError:
            pass
        elapsed = time.monotonic() - t0
        s.close()
        assert data.startswith(b"HTTP/1.1 408") and b"request_timeout" in data and b"connection: close" in data.lower(), data[:300]
        assert 0.5 < elapsed < 3
        assert app.state.fg.batcher.occupied == 0  # the room it held is free again
        r = httpx.post(base + "/v1/detect", content=png(x[0]), headers={"content-type": "image/png"}, timeout=30)
        assert r.status_code == 200


FORBIDDEN = {"confidence", "scores", "p_values", "p_value", "heatmaps", "timing_ms", "instance_score"}


def _numbers(doc: object, at: str = "") -> dict[str, object]:
    """Every numeric leaf of a JSON document by its path (list positions as [])."""
    if isinstance(doc, dict):
        return {k: v for key, value in doc.items() for k, v in _numbers(value, f"{at}.{key}").items()}
    if isinstance(doc, list):
        return {k: v for value in doc for k, v in _numbers(value, f"{at}[]").items()}
    return {at: doc} if isinstance(doc, int | float) and not isinstance(doc, bool) else {}


def test_a_verdict_key_gets_nothing_continuous_from_any_route(mnist: Bundle) -> None:
    """Every route of the OpenAPI document, called with a verdict-only key about two different images:
    no field that carries a continuous quantity, and every number in the image routes' answers is an
    index, a class, α or a shape — the same for both images but the class. The full key, on the same
    routes, does get the continuous quantities (so the check can fail)."""
    import base64

    import httpx

    from service.serve.gallery import GALLERY
    from tests.conftest import serving

    images = [(GALLERY / "mnist" / name).read_bytes() for name in ("00-clean.png", "01-pgd.png")]
    app = create_app(Settings(device="cpu", api_keys="full1", verdict_api_keys="public1"), bundle=mnist)
    fill = {"model_name": "mnist", "model_version": "1.0.0", "score": "learned"}
    with serving(app) as base:

        def call(key: str, method: str, path: str, image: bytes) -> httpx.Response:
            url, auth = base + path.format(**fill), {"authorization": f"Bearer {key}"}
            if path.endswith("/infer"):
                b64 = base64.b64encode(image).decode()
                return httpx.post(
                    url, json={"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [b64]}]}, headers=auth, timeout=30
                )
            if method == "post":
                return httpx.post(url, content=image, headers=auth | {"content-type": "image/png"}, timeout=30)
            return httpx.get(url, headers=auth, timeout=30)

        seen: dict[str, list[object]] = {}
        for path, ops in app.openapi()["paths"].items():
            for method in ops:
                if path.endswith("/reload"):
                    r = call("public1", method, path, images[0])
                    assert r.status_code == 403, path  # an admin call needs a full key
                    continue
                for image in images:
                    r = call("public1", method, path, image)
                    assert r.status_code in (200, 403), (path, r.status_code, r.text[:200])
                    if path.endswith("/calibration/{score}"):
                        assert r.status_code == 403, path  # the clean calibration values: withheld
                    if r.status_code == 403 or "json" not in r.headers.get("content-type", ""):
                        continue
                    doc = r.json()
                    assert not isinstance(doc, dict) or doc.get("calibration") is None, path  # /v1/model's summary: withheld
                    if path.endswith(("/detect", "/infer")):
                        text = json.dumps(doc)
                        assert not any(f'"{k}"' in text for k in FORBIDDEN), (path, text[:300])
                        names = {o["name"] for o in doc.get("outputs", [])}
                        assert names <= {"predicted_class", "is_adversarial"}, names
                        numbers = _numbers(doc)
                        assert set(numbers) <= {
                            ".results[].index",
                            ".results[].predicted_class",
                            ".results[].decision.alpha",
                            ".outputs[].shape[]",
                            ".outputs[].data[]",
                            ".parameters.alpha",
                        }, (path, numbers)
                        seen.setdefault(f"{method} {path}", []).append(numbers)
                full = call("full1", method, path, images[0])
                if path.endswith("/detect") and full.status_code == 200:
                    assert "p_value" in full.json()["results"][0]["decision"]
        assert len(seen) == 4  # /v1/detect, /v1/models/{name}/detect and both infer routes were walked
        assert call("public1", "get", "/metrics", images[0]).status_code == 200  # public: see docs/security.md#disclosure

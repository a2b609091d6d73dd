"""The Open Inference Protocol (docs/oip.md) spoken by a client nobody here wrote: tritonclient's HTTP
client against a real `fisherguard serve` of both bundles on loopback, both input forms, with
the same verdicts as /v1/detect; the wire format's edge cases; the protocol's response schemas."""

import base64
import io
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from service.serve.app import create_app
from service.serve.settings import Settings
from tests.conftest import FIXTURES, free_port, png, serving, wait_ready
from tests.test_batching import Probe, probe_bundle

tritonclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


# The protocol's response objects (KServe v2 REST), strict: what a conforming client may rely on.
class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class MetadataTensor(_Strict):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(_Strict):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(_Strict):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ResponseOutput(_Strict):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(_Strict):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class ErrorResponse(_Strict):
    error: str


def _images(model: str, n: int = 6) -> torch.Tensor:
    """n real test images of the bundle's data, (n, C, H, W) in [0, 1] at 8 bits (what their PNGs decode to)."""
    if model == "mnist":
        return torch.from_numpy(np.load(FIXTURES / "mnist_eval16.npz")["x"][:n]).float().div(255)[:, None]
    with np.load(FIXTURES / "cifar10_eval256.npz") as d:
        jpeg, at = d["test_jpeg"], d["test_offsets"]
        rgb = [np.asarray(Image.open(io.BytesIO(jpeg[at[i] : at[i + 1]].tobytes())).convert("RGB")) for i in range(n)]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float().div(255)


def _png(x: torch.Tensor) -> bytes:
    return png(x, "L" if x.shape[0] == 1 else "RGB")


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """One `fisherguard serve --model mnist --model cifar10`: both bundles behind one address."""
    env = {**os.environ, "FISHERGUARD_LOG_LEVEL": "warning"}
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", "mnist", "--model", "cifar10", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 180)
        yield {"mnist": f"127.0.0.1:{port}", "cifar10": f"127.0.0.1:{port}"}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _v1(base: str, model: str, pngs: list[bytes]) -> list[dict[str, Any]]:
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
    r = httpx.post(f"http://{base}/v1/models/{model}/detect", files=files, timeout=60)
    assert r.status_code == 200, r.text
    return list(r.json()["results"])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mnist", "cifar10"])
def test_tritonclient_gets_the_v1_verdicts_for_both_input_forms(servers: dict[str, str], model: str) -> None:
    client = tritonclient.InferenceServerClient(url=servers[model])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(model)
    ModelMetadata.model_validate(meta)
    assert {i["name"] for i in meta["inputs"]} == {"images", "pixels"}
    version = meta["versions"][0]
    assert client.get_model_metadata(model, model_version=version)["name"] == model

    x = _images(model)
    pngs = [_png(img) for img in x]
    v1 = _v1(servers[model], model, pngs)

    by_bytes = tritonclient.InferInput("images", [len(pngs)], "BYTES")
    by_bytes.set_data_from_numpy(np.array(pngs, dtype=np.object_))  # binary tensor data, tritonclient's default
    by_fp32 = tritonclient.InferInput("pixels", list(x.shape), "FP32")
    by_fp32.set_data_from_numpy(x.numpy().astype(np.float32))
    by_uint8 = tritonclient.InferInput("pixels", list(x.shape), "UINT8")
    by_uint8.set_data_from_numpy((x * 255).round().numpy().astype(np.uint8), binary_data=False)  # JSON data
    for inp in (by_bytes, by_fp32, by_uint8):
        result = client.infer(model, [inp], request_id="req-7")
        assert result.get_response()["id"] == "req-7"
        assert result.as_numpy("predicted_class").tolist() == [r["predicted_class"] for r in v1]
        assert result.as_numpy("is_adversarial").tolist() == [r["decision"]["flagged"] for r in v1]
        np.testing.assert_array_equal(result.as_numpy("p_value"), [r["decision"]["p_value"] for r in v1])
        assert result.as_numpy("instance_score").shape == (len(pngs),)

    # outputs asked for by name, some in JSON, a score among them; alpha as a request parameter
    score = "fisher_input_trace"
    outputs = [tritonclient.InferRequestedOutput("p_value", binary_data=False), tritonclient.InferRequestedOutput(score)]
    outputs.append(tritonclient.InferRequestedOutput("is_adversarial"))
    loose = client.infer(model, [by_bytes], outputs=outputs, parameters={"alpha": 0.5})
    assert [o["name"] for o in loose.get_response()["outputs"]] == ["p_value", score, "is_adversarial"]
    p = loose.as_numpy("p_value")
    assert loose.as_numpy("is_adversarial").tolist() == (p <= 0.5).tolist()
    shown = _v1_scores(servers[model], model, pngs, score)
    np.testing.assert_allclose(loose.as_numpy(score), shown, rtol=1e-12)

    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.infer("nope", [by_bytes])
    with pytest.raises(InferenceServerException, match="unknown output 'nope'"):
        client.infer(model, [by_bytes], outputs=[tritonclient.InferRequestedOutput("nope")])
    client.close()


def _v1_scores(base: str, model: str, pngs: list[bytes], score: str) -> list[float]:
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
    r = httpx.post(f"http://{base}/v1/models/{model}/detect", params={"scores": score}, files=files, timeout=60)
    return [x["scores"][score] for x in r.json()["results"]]


@pytest.mark.slow
def test_a_json_only_client_and_the_protocols_schemas(servers: dict[str, str]) -> None:
    """No binary extension at all: base64 BYTES and nested FP32 lists in, JSON data out."""
    base = "http://" + servers["mnist"]
    ServerMetadata.model_validate(httpx.get(base + "/v2").json())
    x = _images("mnist", 2)
    pngs = [png(img) for img in x]
    body = {
        "id": "j1",
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "data": [base64.b64encode(b).decode() for b in pngs]}],
    }
    r = httpx.post(base + "/v2/models/mnist/infer", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json" and "inference-header-content-length" not in r.headers
    out = InferResponse.model_validate(r.json())
    assert out.id == "j1" and out.model_name == "mnist" and all(o.data is not None and o.shape == [2] for o in out.outputs)
    nested = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]}
    again = httpx.post(base + "/v2/models/mnist/versions/1.0.0/infer", json=nested, timeout=60).json()
    assert {o["name"]: o["data"] for o in again["outputs"]} == {o.name: o.data for o in out.outputs}
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/mnist/ready", "/v2/models/mnist/versions/1.0.0/ready"):
        r = httpx.get(base + path)
        assert r.status_code == 200 and r.content == b"", path
    for path, status in (("/v2/models/nope", 404), ("/v2/models/mnist/versions/9", 404), ("/v2/models/nope/ready", 404)):
        r = httpx.get(base + path)
        assert r.status_code == status and ErrorResponse.model_validate(r.json()).error, path


def _infer(base: str, content: bytes, headers: dict[str, str] | None = None, model: str = "mnist") -> httpx.Response:
    return httpx.post(f"{base}/v2/models/{model}/infer", content=content, headers=headers or {}, timeout=30)


def _binary_body(inputs: list[tuple[dict[str, Any], bytes]], **extra: Any) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [spec | {"parameters": {"binary_data_size": len(blob)}} for spec, blob in inputs]} | extra).encode()
    return header + b"".join(blob for _, blob in inputs), {"Inference-Header-Content-Length": str(len(header))}


def test_malformed_requests_get_the_protocols_4xx_errors(mnist, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    one = png(x[0])
    elem = struct.pack("<I", len(one)) + one
    images = {"name": "images", "datatype": "BYTES", "shape": [1]}
    with serving(create_app(Settings(device="cpu"), bundle=mnist)) as base:
        body, head = _binary_body([(images, elem)])
        assert _infer(base, body, head).status_code == 200
        cases: list[tuple[bytes, dict[str, str], int, str]] = [
            (b"{not json", {}, 400, "malformed"),
            (body, {"Inference-Header-Content-Length": "99999"}, 400, "not a length within"),
            (*_binary_body([(images, elem[:-5])]), 400, "claims"),
            (*_binary_body([(images, elem + b"\0\0")]), 400, "ends inside"),
            (*_binary_body([({**images, "datatype": "FP128"}, elem)]), 400, "datatype 'FP128'"),
            (*_binary_body([(images, elem), (images, elem)]), 400, "exactly one input"),
            (*_binary_body([({**images, "name": "img"}, elem)]), 400, "unknown input 'img'"),
            (*_binary_body([({**images, "shape": [2]}, elem)]), 400, "do not make shape"),
            (
                *_binary_body([({"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28]}, np.full(784, 2, "<f4").tobytes())]),
                400,
                "in [0, 1]",
            ),
            (
                *_binary_body([({"name": "pixels", "datatype": "FP32", "shape": [1, 3, 28, 28]}, np.zeros(3 * 784, "<f4").tobytes())]),
                400,
                "[N, 1, 28, 28]",
            ),
            (
                *_binary_body([({"name": "pixels", "datatype": "INT32", "shape": [1, 1, 28, 28]}, np.zeros(784, "<i4").tobytes())]),
                400,
                "not FP32 or UINT8",
            ),
            (*_binary_body([(images, struct.pack("<I", 9) + b"not a png")]), 400, "image 0"),
            (*_binary_body([(images, elem)], parameters={"alpha": "high"}), 400, "alpha must be a number"),
            (*_binary_body([(images, elem)], parameters={"alpha": 0.9}), 422, "outside"),
            (*_binary_body([(images, elem)], parameters={"timeout": -5}), 400, "microseconds"),
            (*_binary_body([(images, elem)], outputs=[{"name": "nope"}]), 400, "unknown output"),
            (json.dumps({"inputs": [{**images, "data": ["%%%"]}]}).encode(), {}, 400, "not base64"),
            (json.dumps({"inputs": []}).encode(), {}, 400, "non-empty list of inputs"),
        ]
        for content, headers, status, words in cases:
            r = _infer(base, content, headers)
            assert r.status_code == status and words in r.json()["error"], (words, r.status_code, r.text)
            assert ErrorResponse.model_validate(r.json()) and r.json()["code"]
        r = _infer(base, body, head, model="cifar10")
        assert r.status_code == 404 and "unknown model 'cifar10'" in r.json()["error"]
        too_many = [png(x[i % 16]) for i in range(65)]
        big, big_head = _binary_body([({**images, "shape": [65]}, b"".join(struct.pack("<I", len(b)) + b for b in too_many))])
        assert _infer(base, big, big_head).status_code == 413


def test_details_off_withholds_everything_continuous(mnist, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": x[0].reshape(-1).tolist()}]}
    with serving(create_app(Settings(device="cpu", expose_details=False), bundle=mnist)) as base:
        r = httpx.post(base + "/v2/models/mnist/infer", json=body, timeout=30)
        assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["predicted_class", "is_adversarial"]
        meta = httpx.get(base + "/v2/models/mnist").json()
        assert {o["name"] for o in meta["outputs"]} == {"predicted_class", "is_adversarial"}
        for name in ("p_value", "instance_score", "mahalanobis"):
            r = httpx.post(base + "/v2/models/mnist/infer", json=body | {"outputs": [{"name": name}]}, timeout=30)
            assert r.status_code == 403 and r.json()["code"] == "forbidden"


def test_keys_guard_infer_but_not_the_protocols_health(mnist) -> None:  # type: ignore[no-untyped-def]
    with serving(create_app(Settings(device="cpu", api_keys="k1"), bundle=mnist)) as base:
        assert httpx.get(base + "/v2/health/ready").status_code == 200
        r = httpx.post(base + "/v2/models/mnist/infer", json={"inputs": []})
        assert r.status_code == 401 and r.json()["code"] == "unauthorized" and isinstance(r.json()["error"], str)
        assert httpx.get(base + "/v2/models/mnist").status_code == 401


def test_a_request_the_queue_cannot_hold_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.serve import uploads

    opened: list[int] = []
    real = uploads.open_image

    def spy(*args: Any) -> Any:
        opened.append(1)
        return real(*args)

    monkeypatch.setattr(uploads, "open_image", spy)
    pngs = [png(_images("mnist", 3)[i]) for i in range(3)]
    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [3], "data": [base64.b64encode(b).decode() for b in pngs]}]}
    app = create_app(Settings(device="cpu", max_queue_images=2), bundle=probe_bundle(Probe()))
    with serving(app) as base:
        r = httpx.post(base + "/v2/models/probe/infer", json=body, timeout=30)
        assert r.status_code == 503 and r.json()["code"] == "overloaded" and r.headers["retry-after"] == "1"
        assert opened == [] and app.state.fg.batcher.occupied == 0
        ok = httpx.post(
            base + "/v2/models/probe/infer",
            json=body | {"inputs": [body["inputs"][0] | {"shape": [2], "data": body["inputs"][0]["data"][:2]}]},
            timeout=30,
        )
        assert ok.status_code == 200 and len(opened) == 2

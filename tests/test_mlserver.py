"""FisherGuard as an MLServer custom runtime (docs/serving-platforms.md#seldon-core-2): a real
`mlserver start` on the folders `fisherguard bundle mlserver` writes, spoken to by tritonclient.

MLServer pins an older FastAPI than the service, so it lives in its own environment, `.venv-mlserver`
(.ci/run makes it: torch, mlserver and this project); without it the tests skip here and fail in CI.
"""

import base64
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from bench.mlserver import running
from service.core import decision
from service.core.bundle import Bundle, load_bundle
from service.core.images import decode
from service.core.packaging import export_mlserver
from service.core.scores import DEFAULT
from service.core.scoring import score
from tests.conftest import png

ROOT = Path(__file__).resolve().parent.parent
MLSERVER = Path(os.environ.get("FISHERGUARD_MLSERVER", ROOT / ".venv-mlserver" / "bin" / "mlserver"))

pytestmark = pytest.mark.slow


def verdicts(bundle: Bundle, x: torch.Tensor) -> tuple[list[int], list[bool], list[float]]:
    """What the service decides for images x (N, C, H, W): class, flag and p-value, from the core."""
    assert bundle.calibration is not None
    cal = bundle.calibration
    r = score(bundle, x, tuple(dict.fromkeys((*DEFAULT, *cal.decision_scores))))
    v = decision.decide(cal, r.thresholded(), cal.alpha, r.predicted.numpy())
    return r.predicted.tolist(), [bool(f) for f in v.flagged], [float(p) for p in v.p_value]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A running `mlserver start` on both bundles: its REST and gRPC addresses."""
    if not MLSERVER.is_file():
        why = f"no MLServer at {MLSERVER} (python3 -m venv .venv-mlserver && .venv-mlserver/bin/pip install torch==2.13.0 mlserver==1.7.1 -e .)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    root = tmp_path_factory.mktemp("mlserver")
    export_mlserver("mnist", root / "models" / "mnist", None, 32, 5.0)  # adaptive batching on
    export_mlserver("cifar10", root / "models" / "cifar10", None, 1, 0.0)  # off
    try:
        with running(root, ["mnist", "cifar10"], MLSERVER) as (http, grpc):
            yield f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def server(servers: tuple[str, str]) -> str:
    return servers[0]


def _client(server: str):  # type: ignore[no-untyped-def]
    import tritonclient.http as triton

    return triton, triton.InferenceServerClient(url=server)


def _infer(server: str, model: str, name: str, datatype: str, data: np.ndarray, outputs: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    triton, client = _client(server)
    inp = triton.InferInput(name, list(data.shape), datatype)
    inp.set_data_from_numpy(data, binary_data=False)  # MLServer's REST reads JSON tensors (no binary extension)
    wanted = [triton.InferRequestedOutput(o, binary_data=False) for o in outputs] or None
    return client.infer(model, [inp], outputs=wanted)


def test_tritonclient_sees_the_models_and_their_tensors(server: str) -> None:
    _, client = _client(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mnist")
    meta = client.get_model_metadata("cifar10")
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"images": [-1], "pixels": [-1, 3, 32, 32]}
    names = {o["name"]: o["datatype"] for o in meta["outputs"]}
    assert names["is_adversarial"] == "BOOL" and names["predicted_class"] == "INT64" and names["instance_score"] == "FP64"


def test_pixel_verdicts_equal_the_services(server: str, mnist: Bundle, cifar10: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    r = _infer(server, "mnist", "pixels", "FP32", x[:6].numpy())
    cls, flag, p = verdicts(mnist, x[:6])
    assert r.as_numpy("predicted_class").tolist() == cls and r.as_numpy("is_adversarial").tolist() == flag
    np.testing.assert_allclose(r.as_numpy("p_value"), p, rtol=0, atol=1e-12)
    u8 = (torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    r = _infer(server, "cifar10", "pixels", "UINT8", u8.numpy(), ("predicted_class", "is_adversarial", "p_value"))
    cls, flag, p = verdicts(cifar10, u8.float() / 255)
    assert r.as_numpy("predicted_class").tolist() == cls and r.as_numpy("is_adversarial").tolist() == flag
    np.testing.assert_allclose(r.as_numpy("p_value"), p, rtol=0, atol=1e-12)
    assert r.as_numpy("instance_score") is None  # only the outputs asked for


def test_encoded_images_and_adaptive_batching(server: str, mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    """Eight concurrent one-image requests, which MLServer may merge into one predict call: each gets
    the verdict the service gives its decoded image."""
    x, _ = digits
    files = [png(x[i]) for i in range(8)]
    images = torch.stack([decode(f, mnist.input, 10**7) for f in files])
    cls, flag, p = verdicts(mnist, images)

    def one(i: int) -> tuple[int, bool, float]:
        r = _infer(server, "mnist", "images", "BYTES", np.array([base64.b64encode(files[i])], dtype=np.object_))
        return int(r.as_numpy("predicted_class")[0]), bool(r.as_numpy("is_adversarial")[0]), float(r.as_numpy("p_value")[0])

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    assert [g[0] for g in got] == cls and [g[1] for g in got] == flag
    np.testing.assert_allclose([g[2] for g in got], p, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 27], "data": [0.5] * 756}]}, "is not [N, 1, 28, 28]"),
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [2.0] * 784}]}, "in [0, 1]"),
        ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["bm90IGFuIGltYWdl"]}]}, "image 0"),
        ({"inputs": [{"name": "logits", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "send 'images'"),
        (
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5] * 784}], "outputs": [{"name": "x"}]},
            "unknown outputs ['x']",
        ),
        (
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5] * 784}], "parameters": {"alpha": 2}},
            "alpha",
        ),
    ],
)
def test_bad_requests_get_400_with_the_reason(server: str, body: dict[str, object], says: str) -> None:
    r = httpx.post(f"http://{server}/v2/models/mnist/infer", json=body)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]


def test_too_many_images_are_refused_before_decoding(server: str) -> None:
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [65, 3, 32, 32], "data": [0] * (65 * 3 * 32 * 32)}]}
    r = httpx.post(f"http://{server}/v2/models/cifar10/infer", json=body)
    assert r.status_code == 400 and "65 images in one call; at most 64" in r.json()["error"]


def test_alpha_parameter_and_scores_as_outputs(server: str, mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    body = {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 1, 28, 28], "data": x[:2].flatten().tolist()}],
        "outputs": [{"name": "p_value"}, {"name": "margin"}],
        "parameters": {"alpha": 0.2},
        "id": "req-7",
    }
    r = httpx.post(f"http://{server}/v2/models/mnist/infer", json=body).json()
    assert r["id"] == "req-7" and r["parameters"]["alpha"] == 0.2 and [o["name"] for o in r["outputs"]] == ["p_value", "margin"]
    want = score(mnist, x[:2], ("margin",)).raw["margin"].tolist()
    np.testing.assert_allclose(r["outputs"][1]["data"], want, rtol=1e-6)


GRPC_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton

client = triton.InferenceServerClient(url=sys.argv[1])
x = np.load(sys.argv[2])
inp = triton.InferInput("pixels", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
r = client.infer("mnist", [inp], outputs=[triton.InferRequestedOutput(k) for k in ("predicted_class", "is_adversarial", "p_value")])
print(json.dumps({"ready": client.is_server_ready() and client.is_model_ready("mnist"),
                  "cls": r.as_numpy("predicted_class").tolist(), "flag": r.as_numpy("is_adversarial").tolist(),
                  "p": r.as_numpy("p_value").tolist()}))
"""


def test_grpc_through_mlserver(servers: tuple[str, str], mnist: Bundle, digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The Open Inference Protocol over gRPC, which MLServer adds: tritonclient's gRPC client (in the
    MLServer environment, whose protobuf it shares) gets the service's verdicts."""
    x, _ = digits
    np.save(tmp_path / "x.npy", x[:5].numpy())
    python = MLSERVER.parent / "python"
    done = subprocess.run(
        [str(python), "-c", GRPC_CLIENT, servers[1], str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    got = json.loads(done.stdout.strip().splitlines()[-1])
    cls, flag, p = verdicts(mnist, x[:5])
    assert got["ready"] and got["cls"] == cls and got["flag"] == flag
    np.testing.assert_allclose(got["p"], p, rtol=0, atol=1e-12)


def test_the_runtime_imports_the_core_only() -> None:
    """It must not pull the HTTP service (FastAPI versions differ under MLServer) or the laboratory."""
    from tests.test_layout import imported

    names = imported(ROOT / "service" / "mlserver_runtime.py")
    assert not [n for n in names if n.startswith(("service.serve", "service.lab", "service.cli", "fastapi"))]


def test_the_cli_writes_the_model_folder(tmp_path: Path) -> None:
    out = tmp_path / "m"
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "bundle", "mlserver", str(out), "--model", "mnist", "--name", "digits"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    import json

    settings = json.loads((out / "model-settings.json").read_text())
    assert settings["name"] == "digits" and settings["implementation"] == "service.mlserver_runtime.FisherGuardRuntime"
    assert load_bundle(out).name == "mnist"  # the folder is itself a bundle
    again = subprocess.run(
        [sys.executable, "-m", "service.cli", "bundle", "mlserver", str(out), "--model", "mnist"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode != 0 and "is not empty" in again.stderr
    shutil.rmtree(out)

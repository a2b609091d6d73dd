import io
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from service.bundle import Bundle, load_bundle
from service.serve.app import create_app
from service.serve.settings import Settings

FIXTURES = Path(__file__).parent / "fixtures"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout, when present


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """16 MNIST test digits from the evaluation half: (16, 1, 28, 28) in [0, 1], labels (16,)."""
    f = np.load(FIXTURES / "mnist_eval16.npz")
    return torch.from_numpy(f["x"]).float().div(255)[:, None], torch.from_numpy(f["y"]).long()


@pytest.fixture(scope="session")
def digits512() -> tuple[torch.Tensor, torch.Tensor]:
    """512 seeded MNIST test digits from the evaluation half (index = their test-set positions)."""
    f = np.load(FIXTURES / "mnist_eval512.npz")
    return torch.from_numpy(f["x"]).float().div(255)[:, None], torch.from_numpy(f["y"]).long()


@pytest.fixture(scope="session")
def mnist() -> Bundle:
    return load_bundle("mnist")


@pytest.fixture(scope="session")
def cifar10() -> Bundle:
    return load_bundle("cifar10")


def png(x: torch.Tensor, mode: str = "L") -> bytes:
    """(1, H, W) or (3, H, W) in [0, 1] -> PNG bytes in the given mode."""
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    img.convert(mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(mnist: Bundle) -> Iterator[TestClient]:
    settings = Settings(device="cpu", max_body_bytes=200_000, max_images_per_request=8)
    with TestClient(create_app(settings, bundle=mnist)) as c:
        yield c


def need_tool(name: str, package: str) -> str:
    """The path of a command-line tool; CI must have it (.ci/run installs it), elsewhere the test skips."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs Debian's {package} package")
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, timeout_s: float) -> None:
    """Polls /readyz until it answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{base} did not become ready in {timeout_s} s")


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """The app under a real uvicorn on a loopback port, in a thread; yields the base URL once ready."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, 60)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)

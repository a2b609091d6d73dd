"""The container image, really built and run (docs/deployment.md#containers): a Debian bookworm base
made without any registry, the project's own Dockerfile built from a wheelhouse (no index reached
inside the build), and the container checked as users run it. Marked `image`: skip it locally with
-m "not image"; CI runs it (.ci/run installs docker.io, debootstrap and docker-compose)."""

import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import FIXTURES, free_port, need_tool, png

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.image, pytest.mark.slow]
BASE = "fisherguard-base:bookworm-test"
IMAGE = "fisherguard:image-test"
BASE_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]  # what python:3.11-slim sets


def run(*cmd: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, **kw)


@pytest.fixture(scope="module")
def docker() -> Iterator[str]:
    """A Docker engine: the running one, or dockerd started here (and stopped at the end)."""
    client = need_tool("docker", "docker.io")
    if run(client, "info", check=False, timeout=30).returncode == 0:
        yield client
        return
    daemon = need_tool("dockerd", "docker.io")
    if os.geteuid() != 0:
        pytest.skip("starting dockerd needs root")
    proc = subprocess.Popen([daemon], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while run(client, "info", check=False, timeout=30).returncode != 0:
            assert time.monotonic() < deadline, "dockerd did not start"
            time.sleep(1)
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def base(docker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian bookworm minbase with Python 3.11, its venv module and jemalloc, imported as an image."""
    debootstrap = need_tool("debootstrap", "debootstrap")
    root = tmp_path_factory.mktemp("rootfs")
    run(
        debootstrap,
        "--variant=minbase",
        "--include=python3,python3-venv,libjemalloc2",
        "bookworm",
        str(root),
        "http://deb.debian.org/debian",
        timeout=900,
    )
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"):
        shutil.rmtree(root / junk, ignore_errors=True)
    tar = root.parent / "rootfs.tar"
    with tarfile.open(tar, "w") as t:
        t.add(root, arcname=".")
    changes = [a for e in BASE_ENV for a in ("--change", f"ENV {e}")]
    run(docker, "import", *changes, "--change", 'CMD ["python3"]', str(tar), BASE)
    tar.unlink()
    shutil.rmtree(root, ignore_errors=True)
    try:
        yield BASE
    finally:
        run(docker, "rmi", "-f", BASE, check=False)


def _context(dst: Path) -> Path:
    """The build context as a clean clone has it (git's files), with the wheelhouse filled."""
    files = run("git", "ls-files", "-z", cwd=ROOT).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    run("sh", str(dst / "docker" / "wheelhouse.sh"), str(dst / "docker" / "wheelhouse"), cwd=dst)
    return dst


def _build(docker: str, context: Path, tag: str, *extra: str) -> float:
    t0 = time.monotonic()
    done = run(
        docker,
        "build",
        *extra,
        "--build-arg",
        f"BASE={BASE}",
        "-t",
        tag,
        str(context),
        timeout=900,
        check=False,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def image(docker: str, base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float, Path]]:
    context = _context(tmp_path_factory.mktemp("context"))
    seconds = _build(docker, context, IMAGE)
    try:
        yield IMAGE, seconds, context
    finally:
        run(docker, "rmi", "-f", IMAGE, check=False)
        # the legacy builder keeps each build stage as an untagged image: the Dockerfile labels them
        run(docker, "image", "prune", "-f", "--filter", "label=org.fisherguard.stage=build", check=False)


def _ready(docker: str, name: str, base_url: str, timeout_s: float = 120) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if run(docker, "inspect", "-f", "{{.State.Running}}", name).stdout.strip() != "true":
            raise AssertionError(f"{name} exited: " + run(docker, "logs", name, check=False).stderr[-2000:])
        try:
            if httpx.get(base_url + "/readyz", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{base_url} not ready in {timeout_s} s")


def _health(docker: str, name: str, timeout_s: float = 90) -> str:
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        status = run(docker, "inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()
        if status != "starting":
            return status
        time.sleep(1)
    return status


def _digit() -> tuple[bytes, int]:
    f = np.load(FIXTURES / "mnist_eval16.npz")
    import torch

    return png(torch.from_numpy(f["x"][:1]).float().div(255)), int(f["y"][0])


def test_the_image_builds_without_an_index_and_runs_as_users_run_it(docker: str, image: tuple[str, float, Path]) -> None:
    tag, seconds, _ = image
    size = int(run(docker, "image", "inspect", "-f", "{{.Size}}", tag).stdout)
    assert seconds < 600 and size < 1.0e9, (seconds, size)  # docs/deployment.md quotes both
    body, label = _digit()
    for name, args, env, inner in (
        ("fg-image-default", [], [], 8000),
        ("fg-image-flag", ["--port", "18080"], [], 18080),
        ("fg-image-env", [], ["-e", "FISHERGUARD_PORT=18081"], 18081),
    ):
        port = free_port()
        run(docker, "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", "-p", f"127.0.0.1:{port}:{inner}", *env, tag, *args)
        try:
            url = f"http://127.0.0.1:{port}"
            warm = _ready(docker, name, url)
            assert warm < 60
            if name == "fg-image-default":
                r = httpx.post(url + "/v1/detect", content=body, headers={"content-type": "image/png"}, timeout=30).json()["results"][0]
                assert r["predicted_class"] == label and r["decision"]["flagged"] is False
                assert 'fisherguard_model_ready{model="mnist"} 1.0' in httpx.get(url + "/metrics").text
                assert run(docker, "exec", name, "id", "-u").stdout.strip() == "10001"
                assert "libjemalloc" in run(docker, "exec", name, "cat", "/proc/1/maps").stdout  # serve re-executed under it
            assert _health(docker, name) == "healthy", run(docker, "logs", name, check=False).stderr[-2000:]
        finally:
            run(docker, "rm", "-f", name, check=False)


def test_docker_stop_drains_a_request_in_flight_and_exits_0(docker: str, image: tuple[str, float, Path]) -> None:
    tag, _, _ = image
    port = free_port()
    run(docker, "run", "-d", "--name", "fg-image-stop", "-e", "FISHERGUARD_MAX_DELAY_MS=1000", "-p", f"127.0.0.1:{port}:8000", tag)
    try:
        url = f"http://127.0.0.1:{port}"
        _ready(docker, "fg-image-stop", url)
        body, label = _digit()
        import threading

        answers: list[httpx.Response] = []
        t = threading.Thread(
            target=lambda: answers.append(httpx.post(url + "/v1/detect", content=body, headers={"content-type": "image/png"}, timeout=60))
        )
        t.start()
        deadline = time.monotonic() + 0.8  # queued: the batch waits 1 s (the most max_delay_ms allows) for company
        while 'fisherguard_queue_depth_images{model="mnist"} 1.0' not in httpx.get(url + "/metrics").text and time.monotonic() < deadline:
            time.sleep(0.02)
        run(docker, "stop", "-t", "30", "fg-image-stop", timeout=60)
        t.join(timeout=60)
        assert answers and answers[0].status_code == 200 and answers[0].json()["results"][0]["predicted_class"] == label
        assert run(docker, "inspect", "-f", "{{.State.ExitCode}}", "fg-image-stop").stdout.strip() == "0"
    finally:
        run(docker, "rm", "-f", "fg-image-stop", check=False)


def test_two_builds_install_the_same_packages(docker: str, image: tuple[str, float, Path]) -> None:
    tag, _, context = image
    again = tag + "-again"
    _build(docker, context, again, "--no-cache")
    try:
        freeze = [run(docker, "run", "--rm", "--entrypoint", "pip", t, "freeze", "--all").stdout for t in (tag, again)]
        assert freeze[0] == freeze[1] and "torch==2.13.0" in freeze[0] and "fastapi==" in freeze[0]
    finally:
        run(docker, "rmi", "-f", again, check=False)


def test_compose_files_pass_the_real_tool() -> None:
    compose = need_tool("docker-compose", "docker-compose")
    for files in (["-f", "docker-compose.yml"], ["-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"]):
        done = run(compose, *files, "config", cwd=ROOT, check=False)
        assert done.returncode == 0, done.stderr
        assert "fisherguard" in json.dumps(done.stdout)

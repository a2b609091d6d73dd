"""The `fisherguard` command: calibrate and evaluate on small data, serve as a real process."""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.bundle import Bundle, BundleError, load_bundle
from service.cli import main
from service.core.baselines import Mahalanobis
from service.serve.app import create_app
from service.serve.settings import Settings
from tests.conftest import FIXTURES, png, wait_ready


@pytest.fixture
def small_npz(tmp_path: Path) -> Path:
    f = np.load(FIXTURES / "mnist_eval16.npz")
    path = tmp_path / "digits.npz"
    np.savez(path, x_test=f["x"], y_test=f["y"], x_train=np.tile(f["x"], (4, 1, 1)), y_train=np.tile(f["y"], 4))
    return path


def evaluate_args(model: str | Path, data: Path, *more: str) -> list[str]:
    """`fisherguard evaluate` on every image of `data` (the small fixtures have no split to speak of)."""
    return ["evaluate", "--model", str(model), "--data", str(data), "--split", "all", *more]


def test_calibrate_writes_a_calibration_the_bundle_accepts(tmp_path: Path, small_npz: Path, mnist: Bundle) -> None:
    dst = tmp_path / "b"
    shutil.copytree(mnist.path, dst, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(dst),
                "--data",
                str(small_npz),
                "--split",
                "all",
                "--statistic",
                "margin",
                "--tail",
                "two-sided",
                "--alpha",
                "0.1",
            ]
        )
        == 0
    )
    d = json.loads((dst / "calibration.json").read_text())
    assert d["n"] == 16 and d["alpha"] == 0.1 and d["decision"] == {"statistic": "margin", "tail": "two-sided"}
    assert d["weights_sha256"] == mnist.weights_sha256
    assert d["scores"]["margin"]["values"] == sorted(d["scores"]["margin"]["values"])
    assert load_bundle(dst).calibration.n == 16  # type: ignore[union-attr]


def test_calibrate_a_combined_decision_and_serve_it(tmp_path: Path, small_npz: Path, mnist: Bundle) -> None:
    dst = tmp_path / "b"
    shutil.copytree(mnist.path, dst, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    args = ["calibrate", "--model", str(dst), "--data", str(small_npz), "--split", "all", "--alpha", "0.2"]
    parts = "fisher_input_trace:two-sided,mahalanobis:one-sided,feature_squeezing:one-sided"
    assert main([*args, "--fit-mahalanobis", "64", "--statistic", "combined", "--components", parts]) == 0
    d = json.loads((dst / "calibration.json").read_text())["decision"]
    assert d["statistic"] == "combined" and len(d["values"]) == 8
    assert sorted(d["reference"]) == ["feature_squeezing", "fisher_input_trace", "mahalanobis"]
    bundle = load_bundle(dst)
    assert bundle.mahalanobis is not None and {"feature_squeezing", "mahalanobis", "mahalanobis_layers"} <= set(bundle.scores)
    assert list(bundle.mahalanobis.layers) == ["7", "8", "penultimate"]  # the end of each stage after the first (14 and 7 px)
    with TestClient(create_app(Settings(device="cpu"), bundle=bundle)) as client:
        r = client.post("/v1/detect?scores=margin", content=(FIXTURES / "digit.png").read_bytes(), headers={"content-type": "image/png"})
        assert client.get("/v1/model/calibration/mahalanobis").json()["direction"] == "high"
    res = r.json()["results"][0]
    assert r.status_code == 200 and set(res["scores"]) == {"margin", "fisher_input_trace", "mahalanobis", "feature_squeezing"}
    assert res["decision"]["components"] == [
        {"score": "fisher_input_trace", "tail": "two-sided"},
        {"score": "mahalanobis", "tail": "one-sided"},
        {"score": "feature_squeezing", "tail": "one-sided"},
    ]
    assert res["p_values"]["mahalanobis"] > 0 and res["scores"]["mahalanobis"] > 0
    assert res["decision"]["p_value"] in [k / 9 for k in range(1, 10)]  # (1 + #{b: m_b ≤ m}) / (8 + 1)
    assert main([*args, "--statistic", "combined"]) == 0  # keeps the bundle's components
    assert main([*args, "--statistic", "margin", "--components", "margin:one-sided"]) == 2
    bundle.mahalanobis.save(dst / "mahalanobis.safetensors", "0" * 64)
    with pytest.raises(BundleError, match=r"was made for weights with sha256 '0000.*fit-mahalanobis"):
        load_bundle(dst)


def test_calibrate_scores_changes_the_decision_without_rescoring(
    tmp_path: Path, small_npz: Path, mnist: Bundle, capsys: pytest.CaptureFixture[str]
) -> None:
    """calibrate --scores (an evaluate run's per-image clean scores on the same split) gives exactly the
    calibration that scoring the images again gives, and refuses scores of other images."""
    dst = tmp_path / "b"
    shutil.copytree(mnist.path, dst, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    args = ["calibrate", "--model", str(dst), "--data", str(small_npz), "--split", "all", "--alpha", "0.2"]
    assert (
        main([*args, "--fit-mahalanobis", "64", "--mahalanobis-layers", "7", "--statistic", "fisher_input_trace", "--tail", "two-sided"])
        == 0
    )
    assert list(Mahalanobis.load(dst / "mahalanobis.safetensors")[0].layers) == ["7", "penultimate"]
    run = evaluate_args(dst, small_npz, "--attacks", "noise:0.1", "--limit", "2", "--no-cache")
    assert main([*run, "--out", str(tmp_path / "e")]) == 0
    parts = ["--statistic", "combined", "--components", "fisher_input_trace:two-sided,mahalanobis:one-sided"]
    assert main([*args, *parts, "--scores", str(tmp_path / "e" / "scores.npz"), "--out", str(tmp_path / "fast.json")]) == 0
    assert main([*args, *parts, "--out", str(tmp_path / "slow.json")]) == 0
    fast, slow = (json.loads((tmp_path / f).read_text()) for f in ("fast.json", "slow.json"))
    assert fast["created"] <= slow["created"]
    assert {k: v for k, v in fast.items() if k != "created"} == {k: v for k, v in slow.items() if k != "created"}
    z = dict(np.load(tmp_path / "e" / "scores.npz"))
    z["clean/margin"] = z["clean/margin"][::-1] * (1 + 1e-6)  # float32 noise (other batches): accepted
    np.savez(tmp_path / "noisy.npz", **z)
    assert main([*args, *parts, "--scores", str(tmp_path / "noisy.npz"), "--out", str(tmp_path / "noisy.json")]) == 0
    z["clean/margin"] = z["clean/margin"] * 1.1  # other numbers: refused
    np.savez(tmp_path / "other.npz", **z)
    assert main([*args, *parts, "--scores", str(tmp_path / "other.npz")]) == 2
    assert "do not match this calibration's values of 'margin'" in capsys.readouterr().err


def test_calibrate_mondrian_from_scores_or_images_and_serve_it(tmp_path: Path, small_npz: Path, mnist: Bundle) -> None:
    """--mondrian gives the same class-conditional references from an evaluate run's scores as from
    scoring the images again, and the service decides with them (each image against its predicted class)."""
    dst = tmp_path / "b"
    shutil.copytree(mnist.path, dst, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    args = ["calibrate", "--model", str(dst), "--data", str(small_npz), "--split", "all", "--alpha", "0.2", "--mondrian"]
    parts = ["--statistic", "combined", "--components", "margin:two-sided,feature_squeezing:one-sided"]
    assert main([*args, *parts]) == 0
    slow = json.loads((dst / "calibration.json").read_text())
    run = evaluate_args(dst, small_npz, "--attacks", "noise:0.1", "--limit", "2", "--no-cache")
    assert main([*run, "--out", str(tmp_path / "e")]) == 0
    assert main([*args, *parts, "--scores", str(tmp_path / "e" / "scores.npz"), "--out", str(tmp_path / "fast.json")]) == 0
    fast = json.loads((tmp_path / "fast.json").read_text())
    assert fast["decision"]["mondrian"] == slow["decision"]["mondrian"]
    labels = np.load(small_npz)["y_test"]
    assert sum(len(v) for v in slow["decision"]["mondrian"].values()) == 8 and set(slow["decision"]["mondrian"]) <= set(map(str, labels))
    bundle = load_bundle(dst)
    assert bundle.calibration is not None and bundle.calibration.mondrian is not None
    with TestClient(create_app(Settings(device="cpu"), bundle=bundle)) as client:
        r = client.post("/v1/detect", content=(FIXTURES / "digit.png").read_bytes(), headers={"content-type": "image/png"})
        assert client.get("/v1/model").json()["calibration"]["mondrian"] is True
    res = r.json()["results"][0]
    ref = bundle.calibration.mondrian.get(res["predicted_class"], np.empty(0))
    assert r.status_code == 200 and res["decision"]["p_value"] in [k / (len(ref) + 1) for k in range(1, len(ref) + 2)]


def test_calibrate_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--model", "nope", "--data", str(tmp_path)]) == 2
    assert "no bundle 'nope'" in capsys.readouterr().err


def test_evaluate_small(tmp_path: Path, small_npz: Path) -> None:
    out = tmp_path / "report"
    assert main([*evaluate_args("mnist", small_npz, "--attacks", "pgd_linf:0.3", "--no-cache"), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    a = rep["attacks"]["pgd_linf:0.3"]
    assert a["success_rate"] > 0.9 and a["median_linf"] <= 0.3 + 0.5 / 255 + 1e-6
    # ε = 0.3 on MNIST: every digit flips and every one is flagged, none of the 16 clean ones is (docs/detection.md)
    assert a["n_successful"] == 16 and a["decision"]["tpr@0.01"] == 1.0 and a["decision"]["fpr@0.05"] == 0.0
    assert a["decision"]["auc"] == 1.0 and a["scores"]["mahalanobis_layers"]["auc"] >= 0.95
    md = (out / "report.md").read_text()
    assert md.startswith("# Detection report: mnist")
    # the summary row: PGD-L∞ is a family the shipped detector was trained on; every success flagged
    # 16 of 16 flagged: the exact 95% interval of the TPR is 0.025^(1/16) = 0.794 to 1
    assert "| pgd_linf:0.3 | seen | 1.000 | 16 | 1.000 | 1.000 | 1.000 | 0.794–1.000 | 0.000 |" in md
    assert "- seen (1): mean TPR 1.000 at α = 0.05, 1.000 at α = 0.01; lowest at α = 0.05: 1.000" in md
    (out / "report.md").unlink()  # the markdown is the JSON's alone: written again from it, the same file
    subprocess.run([sys.executable, "-m", "service.lab.report", str(out)], check=True)
    assert (out / "report.md").read_text() == md


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_serve_answers_and_stops_cleanly_on_sigterm(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A real `fisherguard serve` on a port given as a flag: it answers, the health probe finds that port
    through the address file (the environment says another), and SIGTERM ends it with status 0."""
    port = _free_port()
    env = {
        **os.environ,
        "FISHERGUARD_MAX_BATCH_SIZE": "8",
        "FISHERGUARD_ADDRESS_FILE": str(tmp_path / "address.json"),
        "FISHERGUARD_PORT": "9",
    }
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--device", "auto"], env=env)
    base = f"http://127.0.0.1:{port}"
    probe = [sys.executable, "-m", "service.serve.health"]
    try:
        wait_ready(base, 120)
        x, y = digits
        r = httpx.post(base + "/v1/detect", content=png(x[0]), headers={"content-type": "image/png"}, timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["predicted_class"] == int(y[0])
        assert httpx.get(base + "/v1/model").json()["batching"]["max_batch_size"] == 8  # from the environment
        assert json.loads((tmp_path / "address.json").read_text())["port"] == port
        assert subprocess.run(probe, env=env).returncode == 0
        assert subprocess.run(probe, env={**env, "FISHERGUARD_ADDRESS_FILE": str(tmp_path / "none.json")}).returncode == 1  # port 9
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert subprocess.run(probe, env=env).returncode == 1  # nothing listens any more


def test_evaluate_keeps_attacked_images_and_reruns_only_the_adaptive_attack(tmp_path: Path, small_npz: Path) -> None:
    """--cache: a second run takes every attack's images from the cache — the same report rows — except the
    adaptive attack's, which depends on the decision and is never kept (docs/detection.md#attack-cache)."""
    cache = tmp_path / "cache"
    run = evaluate_args("mnist", small_npz, "--limit", "6", "--cache", str(cache), "--attacks", "fgsm:0.3,noise:0.1,adaptive:0.3")
    reports = []
    for i in range(2):
        assert main([*run, "--out", str(tmp_path / f"r{i}")]) == 0
        reports.append(json.loads((tmp_path / f"r{i}" / "report.json").read_text())["attacks"])
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["fgsm_0.3", "noise_0.1"]  # nothing half-written, nothing adaptive
    assert [a["cached"] for a in reports[0].values()] == [False, False, False]
    assert [a["cached"] for a in reports[1].values()] == [True, True, False]
    for name in ("fgsm:0.3", "noise:0.1"):
        first, second = ({k: v for k, v in r[name].items() if k not in ("seconds", "cached")} for r in reports)
        assert first == second


def test_prepare_runs_the_attacks_a_later_evaluate_takes_from_the_cache(
    tmp_path: Path, small_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--prepare keeps each attack's images under the key `evaluate` will look for, shows no score, and
    leaves out the adaptive attack; the evaluate after it runs only that one."""
    cache = tmp_path / "cache"
    run = evaluate_args("mnist", small_npz, "--limit", "5", "--cache", str(cache), "--attacks", "fgsm:0.3,jpeg:50,adaptive:0.3")
    assert main([*run, "--prepare"]) == 0
    out = capsys.readouterr()
    assert "0 of 2 attacks were kept already" in out.out and "adaptive:0.3: attacks the decision" in out.err
    assert "tpr" not in out.out.lower() and "auc" not in out.out.lower() and not (tmp_path / "r").exists()
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["fgsm_0.3", "jpeg_50"]
    assert main([*run, "--prepare"]) == 0 and "2 of 2 attacks were kept already" in capsys.readouterr().out
    assert main([*run, "--out", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())["attacks"]
    assert {name: a["cached"] for name, a in report.items()} == {"fgsm:0.3": True, "jpeg:50": True, "adaptive:0.3": False}
    with pytest.raises(SystemExit, match="cannot go with --no-cache"):
        main([*evaluate_args("mnist", small_npz, "--attacks", "fgsm:0.3", "--no-cache"), "--prepare"])


def test_an_attacks_key_names_the_weights_the_spec_the_code_and_the_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """service.lab.attack_cache: change any of them and the kept images are not taken."""
    from service.lab import attack_cache
    from service.lab.attack_specs import parse_attack

    mnist = load_bundle("mnist")
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 3])
    fgsm = parse_attack("fgsm:0.1", mnist)
    key = attack_cache.attack_key(mnist, fgsm, x, y)
    assert key == attack_cache.attack_key(mnist, fgsm, x.clone(), y.clone())
    assert key != attack_cache.attack_key(mnist, parse_attack("fgsm:0.2", mnist), x, y)
    assert key != attack_cache.attack_key(mnist, fgsm, x.flip(0), y)
    assert key != attack_cache.attack_key(mnist, fgsm, x, y.flip(0))
    other = dataclasses.replace(mnist, weights_sha256="0" * 64)
    assert key != attack_cache.attack_key(other, fgsm, x, y)
    monkeypatch.setattr(attack_cache, "code_digest", lambda: "edited")
    assert key != attack_cache.attack_key(mnist, fgsm, x, y)
    assert all((Path(attack_cache.__file__).parent / name).is_file() for name in attack_cache.SOURCES)
    assert attack_cache.path_for(Path("c"), parse_attack("adaptive:0.3", mnist), key) is None
    assert attack_cache.path_for(None, fgsm, key) is None
    assert attack_cache.path_for(Path("c"), fgsm, key) == Path("c") / f"fgsm_0.1-{key}.npz"

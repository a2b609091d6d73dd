"""Container, Compose, Kubernetes, Prometheus and Grafana files, checked by the real tools that run here."""

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from service.bundle import Bundle
from service.serve.app import create_app
from service.serve.settings import Settings
from tests.conftest import free_port, need_tool, png, serving

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def live(mnist: Bundle) -> Iterator[str]:
    with serving(create_app(Settings(device="cpu"), bundle=mnist)) as base:
        yield base


def exported_names(base: str, digits) -> set[str]:  # type: ignore[no-untyped-def]
    x, _ = digits
    httpx.post(base + "/v1/detect", content=png(x[0]), headers={"content-type": "image/png"})
    httpx.post(base + "/v1/detect", content=b"junk", headers={"content-type": "image/png"})
    text = httpx.get(base + "/metrics").text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("fisherguard_")}


def test_promtool_accepts_the_config_and_rules() -> None:
    promtool = need_tool("promtool", "prometheus")
    subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus.yml")], check=True, capture_output=True)
    out = subprocess.run([promtool, "check", "rules", str(DOCKER / "alerts.yml")], check=True, capture_output=True, text=True)
    assert "SUCCESS: 5 rules found" in out.stdout


def test_alert_rules_name_exported_metrics(live: str, digits) -> None:  # type: ignore[no-untyped-def]
    names = exported_names(live, digits)
    rules = yaml.safe_load((DOCKER / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {
        "FisherGuardNotReady",
        "FisherGuardHigh503Rate",
        "FisherGuardSlowP99",
        "FisherGuardFlagRateHigh",
        "FisherGuardQueryPattern",
    }
    for r in rules:
        for metric in re.findall(r"fisherguard_[a-z_]+", r["expr"]):
            assert metric in names, (r["alert"], metric)


def test_grafana_dashboard_queries_name_exported_metrics(live: str, digits) -> None:  # type: ignore[no-untyped-def]
    names = exported_names(live, digits)
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "fisherguard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    for e in exprs:
        metrics = re.findall(r"fisherguard_[a-z_]+", e)
        assert metrics, e
        for m in metrics:
            assert m in names, (e, m)
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("status", "error", "latency", "batch", "queue", "503", "flag", "p-value", "model", "ready", "gpu"):
        assert topic in titles, topic
    prov = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert prov["datasources"][0]["uid"] == dash["panels"][0]["datasource"]["uid"]


def test_a_real_prometheus_scrapes_the_service(live: str, tmp_path: Path) -> None:
    prometheus = need_tool("prometheus", "prometheus")
    cfg = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["evaluation_interval"] = "1s"
    cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [live.removeprefix("http://")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    shutil.copy(DOCKER / "alerts.yml", tmp_path / "alerts.yml")
    port = free_port()
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        result: list = []  # type: ignore[type-arg]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not result:
            try:
                result = httpx.get(api + "/query", params={"query": 'fisherguard_model_ready{job="fisherguard"}'}).json()["data"]["result"]
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        assert result and result[0]["value"][1] == "1"
        info = httpx.get(api + "/query", params={"query": "fisherguard_model_info"}).json()["data"]["result"]
        assert info[0]["metric"]["name"] == "mnist" and info[0]["metric"]["device"] == "cpu"
        groups = httpx.get(api + "/rules").json()["data"]["groups"]
        assert len(groups[0]["rules"]) == 5 and all(r["health"] != "err" for r in groups[0]["rules"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("path", sorted((DOCKER / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_validate(path: Path) -> None:
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        if doc["kind"] == "Kustomization":
            assert all((path.parent / r).is_file() for r in doc["resources"])
        elif doc["kind"] == "PodMonitor":  # a CRD: no schema ships with kubernetes-validate
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert doc["spec"]["podMetricsEndpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s"}
        else:
            kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_deployments_drain_within_their_grace_period() -> None:
    for name in ("deployment.yaml", "deployment-gpu.yaml"):
        d = yaml.safe_load((DOCKER / "k8s" / name).read_text())
        pod = d["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        env = {e["name"]: e["value"] for e in c["env"]}
        drain_s = float(env.get("FISHERGUARD_REQUEST_TIMEOUT_MS", Settings.model_fields["request_timeout_ms"].default)) / 1000 + 5
        pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
        assert pod["terminationGracePeriodSeconds"] > pre_stop + drain_s
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["resources"]["limits"]
    gpu = yaml.safe_load((DOCKER / "k8s" / "deployment-gpu.yaml").read_text())
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    hpa = yaml.safe_load((DOCKER / "k8s" / "hpa.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "fisherguard_queue_depth_images"


def test_dockerfile() -> None:
    df = DockerfileParser(path=str(ROOT / "Dockerfile"))
    froms = [i for i in df.structure if i["instruction"] == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    args = {i["value"].split("=")[0] for i in df.structure if i["instruction"] == "ARG"}
    assert {"BASE", "TORCH_INDEX", "TORCH_VERSION"} <= args
    users = [i["value"] for i in df.structure if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0")
    health = [i["value"] for i in df.structure if i["instruction"] == "HEALTHCHECK"]
    assert health and "service.serve.health" in health[0]  # follows the bound port: tests/test_image.py
    assert json.loads(df.structure[-1]["value"]) == ["fisherguard", "serve"] and df.structure[-1]["instruction"] == "ENTRYPOINT"
    assert "--workers" not in df.content
    copied = " ".join(i["value"] for i in df.structure if i["instruction"] == "COPY")
    assert "models" in copied and "service" in copied
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignore)


def test_compose_files() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"fisherguard", "prometheus", "grafana"}
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            assert (ROOT / vol.split(":")[0]).exists(), vol
    env = compose["services"]["fisherguard"]["environment"]
    assert set(env) <= {f"FISHERGUARD_{k.upper()}" for k in Settings.model_fields}
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    assert gpu["services"]["fisherguard"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.slow
def test_the_dockerfile_install_works_in_a_fresh_venv(tmp_path: Path) -> None:
    """The locked set and `pip install .` as the Dockerfile runs them (torch from this machine's local wheel instead of
    the PyTorch index), then the console script and the shipped bundles work outside the repo."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", "--require-hashes", "-r", str(ROOT / "docker" / "requirements.lock")], check=True, cwd=tmp_path)
    subprocess.run([*pip, "torch==2.13.0"], check=True, cwd=tmp_path)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True, cwd=tmp_path)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check"], check=True, cwd=tmp_path)  # the lock is complete
    subprocess.run([str(venv / "bin" / "fisherguard"), "--help"], check=True, capture_output=True, cwd=tmp_path)
    code = (
        "from service.bundle import load_bundle; b = load_bundle('mnist'); "
        "print(b.path, b.detector is not None, b.calibration.data['correct'], load_bundle('mnist-fisherreg').name)"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    path, has_fit, correct, other = out.split()
    assert "site-packages" in path and has_fit == "True" and int(correct) > 2450 and other == "mnist-fisherreg"


def _strict(doc: object, schema: dict[str, Any], at: str = "") -> list[str]:
    """Fields the schema does not declare (what `kubectl apply --validate=strict` refuses)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or not isinstance(doc, dict | list):
        return []
    if isinstance(doc, list):
        return [e for i, item in enumerate(doc) for e in _strict(item, schema.get("items", {}), f"{at}[{i}]")]
    props = schema.get("properties")
    if props is None:  # a map (additionalProperties) or a free-form object
        extra = schema.get("additionalProperties")
        return [e for k, v in doc.items() for e in _strict(v, extra, f"{at}.{k}")] if isinstance(extra, dict) else []
    return [f"{at}.{k}" for k in doc if k not in props] + [
        e for k, v in doc.items() if k in props for e in _strict(v, props[k], f"{at}.{k}")
    ]


def test_the_kserve_inferenceservice_validates_against_kserves_crd() -> None:
    """The v1beta1 schema of KServe's InferenceService CRD (config/crd/full, kserve/kserve at aaac4e294),
    vendored gzipped: the manifest must satisfy it and use no field it does not declare; its probes and
    flags must be the service's own."""
    import gzip

    import jsonschema

    schema = json.loads(gzip.decompress((ROOT / "tests" / "fixtures" / "kserve-inferenceservice-v1beta1.schema.json.gz").read_bytes()))
    doc = yaml.safe_load((DOCKER / "kserve" / "inferenceservice.yaml").read_text())
    jsonschema.validate(doc, schema)
    assert _strict(doc, schema) == []
    assert _strict({**doc, "spec": {"predictor": {"containerz": []}}}, schema) == [".spec.predictor.containerz"]  # the check bites
    (c,) = doc["spec"]["predictor"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert c["name"] == "kserve-container" and c["ports"][0]["containerPort"] == int(env["FISHERGUARD_PORT"])
    app = create_app(Settings(device="cpu"))
    paths = app.openapi()["paths"]
    assert c["readinessProbe"]["httpGet"]["path"] in paths and c["livenessProbe"]["httpGet"]["path"] in paths
    from service.cli import parser

    assert parser().parse_args(["serve", *c["args"]]).model == ["mnist", "cifar10"]


def _seldon_schema(kind: str) -> dict[str, Any]:
    import gzip

    return json.loads(gzip.decompress((ROOT / "tests" / "fixtures" / f"seldon-{kind}-v1alpha1.schema.json.gz").read_bytes()))


def test_the_seldon_manifests_validate_against_seldon_core_2s_crds() -> None:
    """The v1alpha1 schemas of Seldon Core 2's Server and Model CRDs (operator/config/crd/bases,
    SeldonIO/seldon-core at 7b77f8b), vendored gzipped: each manifest satisfies its CRD and uses no
    field it does not declare; the Model requires the capability the Server adds, on Seldon's
    MLServer ServerConfig, and its artifact is what `fisherguard bundle mlserver` writes."""
    import jsonschema

    server = yaml.safe_load((DOCKER / "seldon" / "server.yaml").read_text())
    model = yaml.safe_load((DOCKER / "seldon" / "model-mnist.yaml").read_text())
    for doc, kind in ((server, "server"), (model, "model")):
        schema = _seldon_schema(kind)
        jsonschema.validate(doc, schema)
        assert _strict(doc, schema) == [], kind
    assert _strict({**model, "spec": {"storageURI": "x"}}, _seldon_schema("model")) == [".spec.storageURI"]  # the check bites
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**model, "spec": {**model["spec"], "replicas": "one"}}, _seldon_schema("model"))
    assert server["spec"]["serverConfig"] == "mlserver" and server["spec"]["podSpec"]["containers"][0]["name"] == "mlserver"
    assert set(model["spec"]["requirements"]) <= set(server["spec"]["extraCapabilities"])
    from service.cli import parser

    cmd = next(line for line in (DOCKER / "seldon" / "model-mnist.yaml").read_text().splitlines() if "fisherguard bundle mlserver" in line)
    argv = cmd.split("`")[1].split()[1:]
    assert parser().parse_args(argv).model == model["metadata"]["name"]

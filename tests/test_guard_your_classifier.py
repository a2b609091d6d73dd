"""Guard your own classifier, end to end (docs/guard-your-classifier.md): a randomly initialised
torchvision ResNet-18 (1000 classes, 224×224) and a folder of generated images of several sizes →
`fisherguard bundle create` → `fisherguard calibrate` → the served verdict over HTTP; the card's
preprocessing equals torchvision's evaluation transform on the same images."""

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.cli import main
from service.core.bundle import load_bundle
from service.core.images import decode
from service.core.preprocess import Normalized
from service.serve.app import create_app
from service.serve.settings import Settings
from tests.conftest import serving
from tests.vision import torchvision

pytestmark = pytest.mark.slow
SIZES = [(320, 240), (240, 320), (256, 256), (500, 375), (300, 300), (640, 427)] * 2  # (width, height)


def _images(d: Path) -> list[Path]:
    """Smooth random colour fields (12 files, PNG and JPEG), in a flat folder: unlabelled clean images."""
    d.mkdir()
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate(SIZES):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)
        path = d / f"{i:02d}.{'png' if i % 2 else 'jpg'}"
        img.save(path)
        out.append(path)
    return out


def test_a_torchvision_resnet18_bundled_calibrated_and_served(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tv = torchvision()
    torch.manual_seed(0)
    net = tv.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "resnet18.pt")  # the user's weights: a plain state dict
    (tmp_path / "classes.txt").write_text("".join(f"class {k}\n" for k in range(1000)))
    files = _images(tmp_path / "clean")
    bundle_dir = tmp_path / "bundle"

    assert main(["bundle", "create", str(bundle_dir), "--architecture", "torchvision.models:resnet18",
                 "--weights", str(tmp_path / "resnet18.pt"), "--classes", str(tmp_path / "classes.txt"),
                 "--preset", "imagenet"]) == 0  # fmt: skip
    card = json.loads((bundle_dir / "card.json").read_text())
    assert card["input"]["resize_shorter"] == 256 and card["param_count"] == 11_689_512
    assert main(["calibrate", "--model", str(bundle_dir), "--data", str(tmp_path / "clean"), "--split", "all",
                 "--statistic", "fisher_input_trace", "--only", "fisher_input_trace", "--top-classes", "10",
                 "--alpha", "0.1", "--batch-size", "4", "--device", "cpu"]) == 0  # fmt: skip
    assert "wrote" in capsys.readouterr().out

    bundle = load_bundle(bundle_dir)
    assert bundle.calibration is not None and bundle.calibration.n == 12
    assert "unlabelled" in bundle.calibration.data["description"]
    assert bundle.calibration.score_options["top_classes"] == 10
    t = tv.transforms
    reference = t.Compose([t.Resize(256), t.CenterCrop(224), t.ToTensor(), t.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    for f in files:  # what the model sees from the service equals what torchvision's transform gives it
        with Image.open(f) as img:
            theirs = reference(img.convert("RGB"))
        assert isinstance(bundle.model, Normalized)
        ours = (decode(f.read_bytes(), bundle.input, 1 << 26)[None] - bundle.model.mean) / bundle.model.std
        torch.testing.assert_close(ours[0], theirs, rtol=0, atol=1e-6)

    with serving(create_app(Settings(device="cpu"), bundle=bundle)) as base:
        r = httpx.post(base + "/v1/detect", content=files[1].read_bytes(), headers={"content-type": "image/png"}, timeout=120)
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        with torch.no_grad():
            expected = int(bundle.model(decode(files[1].read_bytes(), bundle.input, 1 << 26)[None]).argmax())
        assert result["predicted_class"] == expected and result["label"] == f"class {expected}"
        assert result["decision"]["statistic"] == "fisher_input_trace" and isinstance(result["decision"]["flagged"], bool)
        assert 0 < result["decision"]["p_value"] <= 1 and result["scores"]["fisher_input_trace"] > 0
        buf = io.BytesIO()
        Image.new("RGB", (50, 40), (10, 200, 30)).save(buf, "PNG")
        assert (
            httpx.post(base + "/v1/detect", content=buf.getvalue(), headers={"content-type": "image/png"}, timeout=120).status_code == 200
        )

"""`fisherguard bundle create` (docs/guard-your-classifier.md): a file factory copied in, weights as a
state dict, refusals that name what is wrong, and --force dropping what belonged to old weights."""

import json
from pathlib import Path

import pytest
import torch

from service.cli import main
from service.core.bundle import load_bundle

TINY = "import torch\n\ndef build(k=3):\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, k))\n"


def _setup(tmp: Path) -> tuple[Path, Path]:
    (tmp / "tiny.py").write_text(TINY)
    (tmp / "classes.json").write_text(json.dumps({"0": ["n0", "cat"], "1": ["n1", "dog"], "2": ["n2", "owl"]}))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp / "ckpt.pt")
    return tmp / "tiny.py", tmp / "ckpt.pt"


def _create(tmp: Path, *extra: str) -> int:
    return main(["bundle", "create", str(tmp / "b"), "--architecture", f"{tmp / 'tiny.py'}:build", "--classes",
                 str(tmp / "classes.json"), "--size", "4", "--weights", str(tmp / "ckpt.pt"), *extra])  # fmt: skip


def test_a_file_factory_and_a_checkpoint_make_a_bundle_that_loads(tmp_path: Path) -> None:
    _setup(tmp_path)
    assert _create(tmp_path) == 0
    b = load_bundle(tmp_path / "b")
    assert b.card["architecture"] == "./tiny.py:build" and (tmp_path / "b" / "tiny.py").is_file()
    assert b.classes == ["cat", "dog", "owl"] and b.input.shape == (3, 4, 4)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["state_dict"]
    torch.testing.assert_close(b.model.state_dict()["1.weight"], state["module.1.weight"])


def test_what_cannot_be_loaded_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _setup(tmp_path)
    torch.save(torch.nn.Linear(48, 3), tmp_path / "ckpt.pt")  # a pickled module, not a state dict
    assert _create(tmp_path) == 2 and "weights_only=True" in capsys.readouterr().err
    torch.save({"1.weight": torch.zeros(3, 47), "1.bias": torch.zeros(3)}, tmp_path / "ckpt.pt")
    assert _create(tmp_path) == 2 and "size mismatch for 1.weight" in capsys.readouterr().err
    torch.save({"1.weight": torch.zeros(3, 48)}, tmp_path / "ckpt.pt")
    assert _create(tmp_path) == 2 and "missing ['1.bias']" in capsys.readouterr().err
    assert not (tmp_path / "b" / "card.json").exists()
    assert main(["bundle", "create", str(tmp_path / "c"), "--architecture", f"{tmp_path / 'tiny.py'}:build", "--kwarg", "k=5",
                 "--classes", str(tmp_path / "classes.json"), "--size", "4", "--random-init"]) == 2  # fmt: skip
    assert "expected logits of shape (2, 3)" in capsys.readouterr().err


def test_force_replaces_a_bundle_and_drops_what_belonged_to_its_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _setup(tmp_path)
    assert _create(tmp_path) == 0
    (tmp_path / "b" / "calibration.json").write_text("{}")  # made for the first weights
    assert _create(tmp_path) == 2 and "not empty" in capsys.readouterr().err
    assert _create(tmp_path, "--force") == 0
    assert not (tmp_path / "b" / "calibration.json").exists()
    load_bundle(tmp_path / "b")

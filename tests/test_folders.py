"""Calibrating on your own folders (docs/guard-your-classifier.md#calibrate): class folders or a flat
folder, the seeded split recorded, unreadable files left out and counted, and a run that stops
resumes from its checkpoint to the same calibration."""

from pathlib import Path

import numpy as np
import pytest
import torch

from service.core.bundle import Bundle
from service.lab import calibrate, folders
from service.lab.calibrate import DecisionSpec
from tests.conftest import png


def _flat(tmp: Path, x: torch.Tensor) -> Path:
    d = tmp / "flat"
    d.mkdir()
    for i, img in enumerate(x):
        (d / f"{i:02d}.png").write_bytes(png(img))
    (d / "notes.txt").write_text("not an image")  # not listed: not an image extension
    return d


def test_class_folders_take_the_card_classes_and_refuse_others(tmp_path: Path, mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    for i, (img, label) in enumerate(zip(x, y.tolist(), strict=True)):
        (tmp_path / str(label)).mkdir(exist_ok=True)
        (tmp_path / str(label) / f"{i}.png").write_bytes(png(img))
    f = folders.scan(tmp_path, mnist.classes)
    assert f.labelled and len(f.files) == 16
    assert sorted(f.labels or ()) == sorted(y.tolist())
    assert all(f.files[i].split("/")[0] == mnist.classes[label] for i, label in enumerate(f.labels or ()))
    (tmp_path / "cats").mkdir()
    with pytest.raises(ValueError, match=r"\['cats'\] are not class names"):
        folders.scan(tmp_path, mnist.classes)


def test_a_stopped_calibration_resumes_to_the_same_result(tmp_path: Path, mnist: Bundle, digits, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    root = _flat(tmp_path, x)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    spec = DecisionSpec("margin", "one-sided")
    whole = calibrate.calibrate_folder(mnist, root, "all", 0.1, spec, batch_size=4, names=["margin"], checkpoint=tmp_path / "a.npz")
    assert not (tmp_path / "a.npz").exists()  # removed when done
    assert whole.n == 16 and "1 files did not decode" in whole.data["description"] and "unlabelled" in whole.data["description"]

    calls = {"n": 0}
    real = folders.score

    def stops_on_the_third_batch(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(folders, "score", stops_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        calibrate.calibrate_folder(mnist, root, "all", 0.1, spec, batch_size=4, names=["margin"], checkpoint=tmp_path / "b.npz")
    assert (tmp_path / "b.npz").exists()
    scored_batches: list[int] = []

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        scored_batches.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(folders, "score", counted)
    resumed = calibrate.calibrate_folder(mnist, root, "all", 0.1, spec, batch_size=4, names=["margin"], checkpoint=tmp_path / "b.npz")
    assert len(scored_batches) == 2  # 17 files in batches of 4: 2 done before the stop, 2 scored now, the last holds only broken.png
    np.testing.assert_array_equal(resumed.values["margin"], whole.values["margin"])
    assert resumed.data == whole.data


def test_the_split_halves_the_folder_by_the_seeded_permutation(tmp_path: Path, mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    f = folders.scan(_flat(tmp_path, x), mnist.classes)
    cal, ev = f.split("calibration"), f.split("evaluation")
    assert len(cal.files) == len(ev.files) == 8 and not set(cal.files) & set(ev.files)
    assert cal.files == tuple(f.files[i] for i in np.random.default_rng(0).permutation(16)[:8])


def test_every_command_splits_a_class_folder_alike(tmp_path: Path, mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    """fit-detector and evaluate load a folder into memory, calibrate streams it: part B must be the same images."""
    from service.core.images import decode
    from service.lab.data import load_dataset

    x, y = digits
    for i, (img, label) in enumerate(zip(x, y.tolist(), strict=True)):
        (tmp_path / str(label)).mkdir(exist_ok=True)
        (tmp_path / str(label) / f"{i}.png").write_bytes(png(img))
    streamed = folders.scan(tmp_path, mnist.classes).split("calibration-b")
    loaded = load_dataset(tmp_path, "calibration-b", mnist.classes, mnist.input)
    expected = torch.stack([decode((tmp_path / f).read_bytes(), mnist.input, 1 << 26) for f in streamed.files])
    torch.testing.assert_close(loaded.x, expected, rtol=0, atol=0)
    assert loaded.y.tolist() == list(streamed.labels or ())

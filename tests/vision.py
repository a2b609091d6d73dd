"""torchvision and timm for the tests that check the service against them (the `vision` extra), as
bench/vision.py imports them; a test skips when they are not installed, and fails in CI (which
installs them)."""

import importlib.util
import os
from types import ModuleType

import pytest

from bench.vision import import_timm, import_torchvision


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed; the dev extra installs the vision extra")
        pytest.skip(f"{module} is not installed (pip install -e '.[vision]')")


def torchvision() -> ModuleType:
    _need("torchvision")
    return import_torchvision()


def timm() -> ModuleType:
    _need("torchvision")
    _need("timm")
    return import_timm()

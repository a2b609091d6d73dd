"""torchvision and timm where the benchmarks and tests need them (the `vision` extra).

PyPI's torchvision wheel is built against the CUDA build of torch; beside the CPU build these
machines install, its C++ operators do not load, and `import torchvision` then fails while it
registers fake kernels for two of them (`torchvision::nms`, `torchvision::qnms`). Neither models nor
transforms use those operators, so when they are missing their schemas are declared (no kernel) and
torchvision is imported again. With a torchvision built for the installed torch nothing is declared."""

import sys
from types import ModuleType

import torch

_declared: list[torch.library.Library] = []  # kept alive: a dropped Library removes its definitions


def import_torchvision() -> ModuleType:
    try:
        import torchvision
    except RuntimeError as e:
        if "operator torchvision::" not in str(e):
            raise
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _declared.append(lib)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torchvision
    return torchvision


def import_timm() -> ModuleType:
    import_torchvision()  # timm imports torchvision
    import timm

    return timm

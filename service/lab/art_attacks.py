"""Reference attacks from IBM's Adversarial Robustness Toolbox (ART), a third party's implementations
(docs/detection.md#attacks): the detector is measured on attacks nobody here wrote, and the project's
own attacks are checked against them (`bench/art_compare.py`). Needs `adversarial-robustness-toolbox`
(the `eval` extra)."""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def _classifier(model: nn.Module, x: Tensor) -> Any:
    try:
        from art.estimators.classification import PyTorchClassifier
    except ImportError as e:
        raise ValueError("ART attacks need adversarial-robustness-toolbox: pip install -e '.[eval]'") from e
    with torch.no_grad():
        k = int(model(x[:1]).shape[1])
    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=k,
        clip_values=(0.0, 1.0),
        device_type="gpu" if x.is_cuda else "cpu",
    )


SEED = 0  # ART's global generators are seeded with it for each call


def _run(make: Callable[[Any], Any], model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """An ART evasion attack on (x, y), untargeted with the true labels; back as a tensor on x's device.
    ART draws its random starts and proposals from numpy's (and torch's) global generators: they are
    seeded for the call and restored after it, so the same images give the same attack."""
    was, state = model.training, np.random.get_state()
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            np.random.seed(SEED)
            torch.manual_seed(SEED)
            attack = make(_classifier(model, x))
            adv = attack.generate(x.detach().cpu().numpy().astype(np.float32), y=y.detach().cpu().numpy())
    finally:
        model.train(was)
        np.random.set_state(state)
    return torch.from_numpy(np.asarray(adv, dtype=np.float32)).to(x.device).clamp(0, 1)


def apgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, loss: str = "ce", steps: int = 100) -> Tensor:
    """Auto-PGD (Croce & Hein 2020), L∞, with the cross-entropy (`ce`) or the DLR (`dlr`) loss."""
    from art.attacks.evasion import AutoProjectedGradientDescent

    loss_type = {"ce": "cross_entropy", "dlr": "difference_logits_ratio"}[loss]
    return _run(
        lambda c: AutoProjectedGradientDescent(
            c,
            norm=np.inf,
            eps=eps,
            eps_step=2 * eps,
            max_iter=steps,
            targeted=False,
            nb_random_init=1,
            batch_size=len(x),
            loss_type=loss_type,
            verbose=False,
        ),
        model,
        x,
        y,
    )


def cw(model: nn.Module, x: Tensor, y: Tensor, confidence: float = 0.0, steps: int = 100, search: int = 6) -> Tensor:
    """Carlini & Wagner L2 with ART's defaults for the rest (tanh variables, Adam-free line search)."""
    from art.attacks.evasion import CarliniL2Method

    return _run(
        lambda c: CarliniL2Method(c, confidence=confidence, max_iter=steps, binary_search_steps=search, batch_size=len(x), verbose=False),
        model,
        x,
        y,
    )


def deepfool(model: nn.Module, x: Tensor, y: Tensor, overshoot: float = 1e-6, steps: int = 100) -> Tensor:
    """DeepFool over all classes (`epsilon` = the overshoot)."""
    from art.attacks.evasion import DeepFool

    return _run(lambda c: DeepFool(c, max_iter=steps, epsilon=overshoot, nb_grads=10, batch_size=len(x), verbose=False), model, x, y)


def square(model: nn.Module, x: Tensor, y: Tensor, eps: float, queries: int = 1000) -> Tensor:
    """The Square attack, L∞, queries only."""
    from art.attacks.evasion import SquareAttack

    return _run(
        lambda c: SquareAttack(c, norm=np.inf, eps=eps, max_iter=queries, nb_restarts=1, batch_size=len(x), verbose=False), model, x, y
    )


def hop_skip_jump(model: nn.Module, x: Tensor, y: Tensor, steps: int = 20) -> Tensor:
    """HopSkipJump (Chen et al. 2020), L2, decision-based: it sees only the predicted label."""
    from art.attacks.evasion import HopSkipJump

    return _run(
        lambda c: HopSkipJump(c, norm=2, max_iter=steps, max_eval=1000, init_eval=100, batch_size=len(x), verbose=False), model, x, y
    )


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 40) -> Tensor:
    """ART's PGD, L∞, random start, step 2.5 ε / steps (Madry et al.'s setting, as the project's own)."""
    from art.attacks.evasion import ProjectedGradientDescent

    return _run(
        lambda c: ProjectedGradientDescent(
            c, norm=np.inf, eps=eps, eps_step=2.5 * eps / steps, max_iter=steps, num_random_init=1, batch_size=len(x), verbose=False
        ),
        model,
        x,
        y,
    )

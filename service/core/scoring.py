"""The one scoring entry point (docs/architecture.md#scoring): a batch of images through a bundle's
model, every requested score (engine and clean-data detectors) and heatmap, and the same over a
whole dataset in batches, in the thresholded form calibrations keep."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.core.baselines import forward_scores
from service.core.batches import cat_batches, device_of, progress
from service.core.bundle import Bundle
from service.core.features import extract, squeezing_from_features
from service.core.learned import SCORES as LEARNED
from service.core.scores import detectors, engine, thresholded_all
from service.fisher import compute
from service.fisher.basics import predictive
from service.fisher.plan import FORWARD


@dataclass
class Scored:
    """One batch's results on the CPU: probs (N, K) float32, predicted (N,), raw scores name -> (N,)
    float64, heatmaps name -> (N, H, W) float32."""

    probs: Tensor
    predicted: Tensor
    raw: dict[str, Tensor]
    heatmaps: dict[str, Tensor]

    @property
    def confidence(self) -> Tensor:
        """p̂ (N,) float32."""
        return self.probs.gather(1, self.predicted[:, None]).squeeze(1)

    def thresholded(self) -> dict[str, np.ndarray]:
        return thresholded_all(self.raw)


def options(bundle: Bundle) -> dict[str, Any]:
    """The engine options the bundle was calibrated with (none before calibration)."""
    return dict(bundle.calibration.score_options) if bundle.calibration else {}


def score(bundle: Bundle, x: Tensor, names: Sequence[str], heatmaps: Sequence[str] = (), opts: Mapping[str, Any] | None = None) -> Scored:
    """Scores `names` and `heatmaps` for images x (N, C, H, W) in [0, 1]; opts default to `options(bundle)`."""
    unknown = [n for n in names if n not in bundle.scores]
    if unknown:
        raise ValueError(f"bundle {bundle.name} cannot compute {unknown}; it has {sorted(bundle.scores)}")
    x = x.to(device_of(bundle.model))
    names = list(dict.fromkeys(names))
    learned = [n for n in names if n in LEARNED]
    if learned:  # one recorded forward and backward of x, one forward of its copies (service.core.features)
        assert bundle.detector is not None
        raw = extract(bundle.model, x, bundle.detector.spec, bundle.mahalanobis)
        values = bundle.detector.scores(raw, learned)
        values |= squeezing_from_features(raw, bundle.detector.spec, names, x.shape[1])  # copies already run: no second forward
        values |= {k: v for k, v in raw.distances.items() if k in names}  # nor for the Mahalanobis scores the columns read
        rest = [n for n in detectors(names) if n not in LEARNED and n not in values]
        z = raw.logits
        values |= forward_scores(bundle.model, x, rest, bundle.mahalanobis)[1] if rest else {}
    else:
        z, values = forward_scores(bundle.model, x, detectors(names), bundle.mahalanobis)  # one forward: x and its copies
    p, y, forward_only = predictive(z)
    values |= forward_only
    maps: dict[str, Tensor] = {}
    if heatmaps or set(engine(names)) - FORWARD:  # gradients, noise: the Fisher engine's own passes
        r = compute(
            bundle.model, x, [n for n in engine(names) if n not in FORWARD], heatmaps, **(options(bundle) if opts is None else dict(opts))
        )
        values |= r.scores
        maps = {k: v.cpu() for k, v in r.heatmaps.items()}
    return Scored(p.float().cpu(), y.cpu(), {k: values[k].cpu() for k in names}, maps)


def score_dataset(
    bundle: Bundle,
    x: Tensor,
    names: Sequence[str],
    batch_size: int = 64,
    show_progress: bool = False,
    opts: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Thresholded scores name -> (N,) float64 and predictions (N,) over x in batches."""
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}
    preds = []
    for i in progress(range(0, len(x), batch_size), show_progress, "scoring"):
        part = score(bundle, x[i : i + batch_size], names, (), opts)
        for k, v in part.thresholded().items():
            values[k].append(v)
        preds.append(part.predicted.numpy())
    empty = np.zeros(0, dtype=np.float64)
    return {k: np.concatenate(v) if v else empty for k, v in values.items()}, (np.concatenate(preds) if preds else np.zeros(0, np.int64))


def predict(bundle_or_model: Bundle | torch.nn.Module, x: Tensor, batch: int = 256) -> Tensor:
    """Predicted classes of x (N, C, H, W) in batches, without gradients. -> (N,) on the CPU."""
    model = bundle_or_model.model if isinstance(bundle_or_model, Bundle) else bundle_or_model
    with torch.no_grad():
        return cat_batches(lambda xb: model(xb).argmax(1), x, batch=batch, device=device_of(model))

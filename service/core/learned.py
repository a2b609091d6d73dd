"""The learned detector (docs/detection.md#learned-detector): a small model over the standardised
features of `service.core.features`, trained in the laboratory on clean images, benign controls and
attacks of the calibration half's part A, and calibrated conformally on the clean images of part B.

Its score `learned` is the model's logit (larger = more likely adversarial). Beside it the bundle
serves `fisher_noise_shift`, Roth et al.'s statistic: max over k ≠ ŷ of the noise shift of z_k − z_ŷ,
standardised per (ŷ, k) on clean part-A images.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from service.core.features import FeatureSpec, RawFeatures

SCORES = ("learned", "fisher_noise_shift")


@dataclass
class LearnedDetector:
    spec: FeatureSpec
    names: tuple[str, ...]  # the model's input columns, in order
    shift_mean: Tensor  # (K, K) float64: clean mean of the shift of z_k − z_ŷ, row ŷ
    shift_std: Tensor  # (K, K)
    mean: Tensor  # (F,) float64: standardisation of the columns
    std: Tensor  # (F,)
    weights: dict[str, Tensor]  # linear: w (F,), b (); mlp: w1 (H, F), b1 (H,), w2 (H,), b2 (); optional proj (F, F)
    meta: dict[str, Any] = field(default_factory=dict)  # what it was trained on (data, split, families, options)

    @property
    def kind(self) -> str:
        return "mlp" if "w1" in self.weights else "linear"

    def noise_shift(self, raw: RawFeatures) -> Tensor:
        """max_{k≠ŷ} (shift_k − μ[ŷ, k]) / σ[ŷ, k]. -> (N,) float64."""
        y = raw.predicted
        z = (raw.shift - self.shift_mean.to(raw.shift)[y]) / self.shift_std.to(raw.shift)[y]
        return z.scatter(1, y[:, None], float("-inf")).amax(1)

    def matrix(self, raw: RawFeatures) -> Tensor:
        """The standardised input columns (N, F) float64."""
        cols = raw.columns | {"noise_shift": self.noise_shift(raw)}
        missing = [n for n in self.names if n not in cols]
        if missing:
            raise ValueError(f"the features lack {missing}: the detector was trained on another model or options")
        x = torch.stack([cols[n].double() for n in self.names], 1)
        return (x - self.mean.to(x)) / self.std.to(x)

    def logit(self, raw: RawFeatures) -> Tensor:
        """The model's output (N,) float64: larger = more likely adversarial."""
        h = self.matrix(raw)
        w = {k: v.to(h) for k, v in self.weights.items()}
        if "proj" in w:  # blind to the directions the benign controls move the features in (service.lab.learn)
            h = h @ w["proj"]
        if self.kind == "mlp":
            h = torch.tanh(h @ w["w1"].T + w["b1"])
            return h @ w["w2"] + w["b2"]
        return h @ w["w"] + w["b"]

    def scores(self, raw: RawFeatures, names: tuple[str, ...] | list[str] = SCORES) -> dict[str, Tensor]:
        out = {}
        if "learned" in names:
            out["learned"] = self.logit(raw)
        if "fisher_noise_shift" in names:
            out["fisher_noise_shift"] = self.noise_shift(raw)
        return out

    def save(self, path: Path, weights_sha256: str) -> None:
        """safetensors, tied to the model weights; the column names, options and provenance as metadata."""
        tensors = {"shift_mean": self.shift_mean, "shift_std": self.shift_std, "mean": self.mean, "std": self.std}
        tensors |= {f"weights/{k}": v for k, v in self.weights.items()}
        meta = {
            "weights_sha256": weights_sha256,
            "names": json.dumps(list(self.names)),
            "spec": json.dumps({"sigma": self.spec.sigma, "draws": self.spec.draws, "squeezers": list(self.spec.squeezers)}),
            "meta": json.dumps(self.meta),
        }
        save_file({k: v.detach().double().contiguous() for k, v in tensors.items()}, str(path), meta)
        path.chmod(0o644)  # shipped inside bundles: readable by the service's user

    @classmethod
    def load(cls, path: Path) -> tuple["LearnedDetector", str]:
        """The detector and the weights sha256 it was trained for."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        t = load_file(str(path))
        spec = json.loads(meta["spec"])
        detector = cls(
            FeatureSpec(float(spec["sigma"]), int(spec["draws"]), tuple(spec["squeezers"])),
            tuple(json.loads(meta["names"])),
            t["shift_mean"],
            t["shift_std"],
            t["mean"],
            t["std"],
            {k.removeprefix("weights/"): v for k, v in t.items() if k.startswith("weights/")},
            json.loads(meta.get("meta", "{}")),
        )
        return detector, meta.get("weights_sha256", "")

"""Published clean-data detectors, run side by side with the Fisher scores (docs/detection.md#baselines).

- Mahalanobis (Lee et al. 2018): class-conditional Gaussians with a tied covariance on the
  penultimate features, fitted on clean training images; score = min_c (f − μ_c)ᵀ Σ⁻¹ (f − μ_c).
- Multi-layer Mahalanobis (Lee et al.'s feature ensemble, with clean-data weights): the same distance
  d_l on the channel means of hidden layers' outputs (by default the end of every stage but the
  first) and on the penultimate features, each
  divided by its median on the training images it was fitted on, summed: Σ_l d_l(x) / median_train d_l.
  (Lee et al. weight the layers by a logistic regression on adversarial examples; we use no attack.)
- Feature squeezing (Xu et al. 2018): max over squeezers of ‖p(x) − p(squeeze(x))‖₁, with bit-depth
  reduction and a 2×2 median filter. Needs no fitting at all.
- Squeeze drop (ours, from the same bit-depth copy): log p_ŷ(x) − log p_ŷ(b(x)), ŷ = argmax p(x), how
  much bit-depth reduction takes from x's own answer. Unlike the L1 distance it does not count a
  drop in x's confidence against x (a blurred or brightened digit the classifier still reads
  right), only the squeezed copy's disagreement with x's answer (docs/detection.md#baselines).
All are "larger = more unusual".
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from service.core.batches import cat_dicts, map_batches
from service.core.transforms import bit_depth, median_2x2


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


PENULTIMATE = "penultimate"  # the name features() gives the input of the last nn.Linear


def penultimate(model: nn.Module, x: Tensor, grad: bool = False) -> Tensor:
    """The input of the model's last nn.Linear: the penultimate features. -> (N, F).
    grad=True keeps them differentiable in x (for an adaptive attacker)."""
    return features(model, x, (), grad)[PENULTIMATE]


def features(model: nn.Module, x: Tensor, taps: Sequence[str], grad: bool = False) -> dict[str, Tensor]:
    """One forward pass; the outputs of the modules named `taps` (4-D ones reduced to their channel
    means, (N, C)) and the penultimate features (N, F), keyed by tap name and PENULTIMATE."""
    return logits_and_features(model, x, taps, len(x), grad)[1]


def logits_and_features(
    model: nn.Module, x: Tensor, taps: Sequence[str], rows: int, grad: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward pass of x (B, C, H, W): the logits (B, K) and, of the first `rows` images only, the
    tapped features as in `features`."""
    out: dict[str, Tensor] = {}
    handles = feature_hooks(model, taps, out, rows)
    try:
        with torch.set_grad_enabled(grad):
            z = model(x)
    finally:
        for h in handles:
            h.remove()
    return (z, out) if grad else (z.detach(), {k: v.detach() for k, v in out.items()})


def feature_hooks(model: nn.Module, taps: Sequence[str], out: dict[str, Tensor], rows: int | None = None) -> list[RemovableHandle]:
    """Forward hooks that put into `out` the outputs of the modules named `taps` (4-D ones reduced to
    their channel means, (N, C)) and the penultimate features (N, F), of the first `rows` images (all:
    None). The caller removes them."""
    modules = dict(model.named_modules())

    def keep(name: str, t: Tensor) -> None:
        t = t[:rows]
        out[name] = t.mean((2, 3)) if t.dim() == 4 else t.flatten(1)

    handles = [modules[t].register_forward_hook(lambda mod, args, o, t=t: keep(t, o)) for t in taps]
    handles.append(_last_linear(model).register_forward_hook(lambda mod, args, o: keep(PENULTIMATE, args[0])))
    return handles


def stage_outputs(model: nn.Module, x: Tensor) -> list[str]:
    """The default hidden layers for the multi-layer fit, in forward order: for each spatial size of the
    4-D activations, the module that finishes last with an output of that size (the end of that stage),
    counting only blocks (modules with children) where a size has any, single layers otherwise."""
    done: list[tuple[str, torch.Size, bool]] = []
    handles = [
        m.register_forward_hook(
            lambda mod, args, o, n=n: done.append((n, o.shape, any(True for _ in mod.children()))) if isinstance(o, Tensor) else None
        )
        for n, m in model.named_modules()
        if n
    ]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    sizes = {shape[2:] for _, shape, _ in done if len(shape) == 4}
    blocks = {shape[2:] for _, shape, block in done if len(shape) == 4 and block}
    last = {shape[2:]: n for n, shape, block in done if len(shape) == 4 and (block or shape[2:] not in blocks)}
    order = [n for n, _, _ in done]
    return sorted((last[s] for s in sizes), key=order.index)


@dataclass
class Gaussians:
    """Class-conditional Gaussians with a tied covariance on one layer's features."""

    means: Tensor  # (K, F)
    precision: Tensor  # (F, F)

    @classmethod
    def fit(cls, f: Tensor, y: Tensor) -> "Gaussians":
        """f (N, F), y (N,). Σ gets a ridge of 1e-3 × its mean variance (dead units have none)."""
        f = f.double()
        classes = torch.unique(y)  # classes without images get no Gaussian
        means = torch.stack([f[y == c].mean(0) for c in classes])  # (K', F)
        centred = f - means[torch.searchsorted(classes, y)]
        cov = centred.T @ centred / len(f)  # tied covariance (F, F)
        ridge = 1e-3 * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
        return cls(means, torch.linalg.inv(cov + ridge).contiguous())  # row-major, as a loaded fit: the same BLAS path

    def distance(self, f: Tensor) -> Tensor:
        """min_c (f − μ_c)ᵀ Σ⁻¹ (f − μ_c) of features f (N, F), float64 -> (N,)."""
        d = f.double()[:, None, :] - self.means.to(f.device)[None]  # (N, K, F)
        return torch.einsum("nkf,fg,nkg->nk", d, self.precision.to(f.device), d).min(1).values  # (N,)


@dataclass
class Mahalanobis:
    """The penultimate fit (score `mahalanobis`) and, when fitted with hidden layers, the multi-layer
    ensemble (score `mahalanobis_layers`): layers[name] = (Gaussians, median training distance)."""

    penultimate: Gaussians
    layers: dict[str, tuple[Gaussians, float]] = field(default_factory=dict)  # hidden taps and PENULTIMATE (the same Gaussians)

    @classmethod
    def fit(cls, model: nn.Module, x: Tensor, y: Tensor, batch: int = 500, taps: Sequence[str] | None = None) -> "Mahalanobis":
        """Fits on clean training images x (N, C, H, W), y (N,). taps default to every stage output but
        the first: the first stage's statistics move with any pixel-level change (on both shipped
        bundles it flags uniform noise of an attack's size at 100%, bench/results/layers-*)."""
        taps = stage_outputs(model, x)[1:] if taps is None else list(taps)
        unknown = [t for t in taps if t not in dict(model.named_modules()) or not t]
        if unknown:
            raise ValueError(f"no modules named {unknown} in this model (names as in model.named_modules())")
        f = cat_dicts(map_batches(lambda xb: features(model, xb, taps), x, batch=batch))  # name -> (N, F_l)
        fits = {k: Gaussians.fit(v, y) for k, v in f.items()}
        layers = {k: (g, float(g.distance(f[k]).median())) for k, g in fits.items()} if taps else {}
        return cls(fits[PENULTIMATE], layers)

    def taps(self, names: Sequence[str]) -> list[str]:
        """The hidden modules whose outputs the named scores read (the penultimate features always come)."""
        if "mahalanobis_layers" not in names:
            return []
        if not self.layers:
            raise ValueError("this Mahalanobis fit has no hidden layers: refit with `fisherguard calibrate --fit-mahalanobis N`")
        return [k for k in self.layers if k != PENULTIMATE]

    def from_features(self, f: dict[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
        """`mahalanobis` and/or `mahalanobis_layers` (Σ_l d_l(x) / median_train d_l), float64 (N,) each,
        from the features of `logits_and_features` with `taps(names)`."""
        out = {"mahalanobis": self.penultimate.distance(f[PENULTIMATE])} if "mahalanobis" in names else {}
        if "mahalanobis_layers" in names:
            out["mahalanobis_layers"] = torch.stack([g.distance(f[k]) / scale for k, (g, scale) in self.layers.items()]).sum(0)
        return out

    def scores(self, model: nn.Module, x: Tensor, names: Sequence[str], grad: bool = False) -> dict[str, Tensor]:
        """The named Mahalanobis scores of x from one forward pass."""
        return self.from_features(features(model, x, self.taps(names), grad), names)

    def score(self, model: nn.Module, x: Tensor, grad: bool = False) -> Tensor:
        return self.scores(model, x, ["mahalanobis"], grad)["mahalanobis"]

    def layers_score(self, model: nn.Module, x: Tensor, grad: bool = False) -> Tensor:
        return self.scores(model, x, ["mahalanobis_layers"], grad)["mahalanobis_layers"]

    def save(self, path: Path, weights_sha256: str) -> None:
        """safetensors, tied to the model weights it was fitted for; hidden layers under layer/<name>/
        (the penultimate layer's Gaussians are the top-level means/precision, stored once)."""
        from safetensors.torch import save_file

        tensors = {"means": self.penultimate.means.contiguous(), "precision": self.penultimate.precision.contiguous()}
        for k, (g, scale) in self.layers.items():
            if k != PENULTIMATE:
                tensors |= {f"layer/{k}/means": g.means.contiguous(), f"layer/{k}/precision": g.precision.contiguous()}
            tensors[f"layer/{k}/scale"] = torch.tensor(scale, dtype=torch.float64)
        save_file(tensors, str(path), {"weights_sha256": weights_sha256, "layers": json.dumps(list(self.layers))})

    @classmethod
    def load(cls, path: Path) -> tuple["Mahalanobis", str]:
        """The fit and the weights sha256 it was made for."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            pen = Gaussians(f.get_tensor("means"), f.get_tensor("precision"))

            def gaussians(k: str) -> Gaussians:
                return pen if k == PENULTIMATE else Gaussians(f.get_tensor(f"layer/{k}/means"), f.get_tensor(f"layer/{k}/precision"))

            layers = {k: (gaussians(k), float(f.get_tensor(f"layer/{k}/scale"))) for k in json.loads(meta.get("layers", "[]"))}
            return cls(pen, layers), meta.get("weights_sha256", "")


SQUEEZING = ("feature_squeezing", "squeeze_drop")  # the scores read from squeezed copies of x


def squeeze_bits(channels: int) -> int:
    """The bit depth the squeezing scores reduce to: 1 bit for greyscale, 5 for colour (Xu et al.)."""
    return 1 if channels == 1 else 5


def bit_squeezed(x: Tensor, grad: bool = False) -> Tensor:
    """The bit-depth squeezed copy of x (`squeeze_bits`). grad=True passes gradients straight through it
    (BPDA, Athalye et al. 2018), for an adaptive attacker."""
    bits = squeeze_bits(x.shape[1])
    return x + (bit_depth(x, bits) - x).detach() if grad else bit_depth(x, bits)


def squeezed(x: Tensor, grad: bool = False) -> list[Tensor]:
    """Feature squeezing's copies of x: the bit-depth squeezed copy and a 2×2 median filter (which is
    differentiable as is)."""
    return [bit_squeezed(x, grad), median_2x2(x)]


def squeezing_distance(z: Tensor, z_squeezed: Sequence[Tensor]) -> Tensor:
    """max over squeezers of ‖p(x) − p(squeeze(x))‖₁ from the logits (N, K) of x and of each copy. -> (N,) float64."""
    p = torch.softmax(z, 1)
    return torch.stack([(p - torch.softmax(zs, 1)).abs().sum(1) for zs in z_squeezed]).amax(0).double()


def squeeze_drop(z: Tensor, z_bits: Tensor) -> Tensor:
    """log p_ŷ(x) − log p_ŷ(b(x)), ŷ = argmax_k z_k, from the logits (N, K) of x and of its bit-depth
    squeezed copy b(x). -> (N,) float64."""
    y = z.argmax(1, keepdim=True)
    return (torch.log_softmax(z.double(), 1).gather(1, y) - torch.log_softmax(z_bits.double(), 1).gather(1, y)).squeeze(1)


def feature_squeezing(model: nn.Module, x: Tensor, grad: bool = False) -> Tensor:
    """max over squeezers of the L1 distance between predictions, from one forward of x and its copies. -> (N,) float64."""
    return forward_scores(model, x, ["feature_squeezing"], None, grad)[1]["feature_squeezing"]


def forward_scores(
    model: nn.Module, x: Tensor, names: Sequence[str], mahalanobis: "Mahalanobis | None", grad: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """The logits of x (N, K) and the named clean-data detector scores (float64 (N,) each) from ONE
    forward pass: x and its squeezed copies go through the network together, and the Mahalanobis
    features are read from x's rows of that same pass."""
    wanted = [n for n in ("mahalanobis", "mahalanobis_layers") if n in names]
    if wanted and mahalanobis is None:
        raise ValueError("this bundle has no mahalanobis.safetensors: fit one with `fisherguard calibrate --fit-mahalanobis N`")
    n = len(x)
    copies: list[Tensor] = []  # feature squeezing needs both copies, the squeeze drop only the bit-depth one (first)
    if "feature_squeezing" in names:
        copies = squeezed(x, grad)
    elif "squeeze_drop" in names:
        copies = [bit_squeezed(x, grad)]
    taps = mahalanobis.taps(wanted) if mahalanobis is not None and wanted else []
    z, f = logits_and_features(model, torch.cat([x, *copies]) if copies else x, taps, n, grad)
    out = {"feature_squeezing": squeezing_distance(z[:n], z[n:].split(n))} if "feature_squeezing" in names else {}
    if "squeeze_drop" in names:
        out["squeeze_drop"] = squeeze_drop(z[:n], z[n : 2 * n])
    if mahalanobis is not None and wanted:
        out |= mahalanobis.from_features(f, wanted)
    return z[:n], out


def available(mahalanobis: Mahalanobis | None) -> tuple[str, ...]:
    """The baseline scores a bundle can serve: the squeezing scores always, Mahalanobis with its fit."""
    if mahalanobis is None:
        return SQUEEZING
    return (*SQUEEZING, "mahalanobis", "mahalanobis_layers") if mahalanobis.layers else (*SQUEEZING, "mahalanobis")


def baseline_scores(model: nn.Module, x: Tensor, names: Sequence[str], mahalanobis: Mahalanobis | None) -> dict[str, Tensor]:
    """The requested baseline scores, float64 (N,), on x's device (one forward pass for all of them)."""
    return forward_scores(model, x, names, mahalanobis)[1]

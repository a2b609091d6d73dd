"""Conformal calibration (docs/detection.md#calibration): sorted clean scores, p-values, and the decision.

For a score where larger is more unusual, the p-value of t is (1 + #{c_i ≥ t}) / (n + 1); under
exchangeability with the n clean calibration images, P(p ≤ α) ≤ α. Scores are compared in the
form they are thresholded in (log10 for the Fisher scores).

A combined decision (`Combination`) takes the smallest of several scores' p-values, each against a
reference part A of the clean calibration images, and calibrates that minimum on the disjoint
part B: p = (1 + #{b ∈ B: m_b ≤ m(x)}) / (|B| + 1), so the guarantee P(p ≤ α) ≤ α still holds.
"""

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.core.scores import SCORES

FORMAT = 1
TAILS = ("one-sided", "two-sided")


def conformal_p_value(cal: np.ndarray, t: np.ndarray, direction: str = "high") -> np.ndarray:
    """(1 + #{c_i at least as unusual as t}) / (n + 1) against sorted clean values cal."""
    if direction == "high":
        unusual = len(cal) - np.searchsorted(cal, t, side="left")  # #{c ≥ t}
    else:
        unusual = np.searchsorted(cal, t, side="right")  # #{c ≤ t}
    return (1.0 + unusual) / (len(cal) + 1.0)


def tail_p_value(cal: np.ndarray, t: np.ndarray, direction: str, tail: str) -> np.ndarray:
    """One-sided in the score's own direction, or two-sided: min(1, 2·min(p_upper, p_lower))."""
    if tail == "one-sided":
        return conformal_p_value(cal, t, direction)
    return np.minimum(1.0, 2.0 * np.minimum(conformal_p_value(cal, t, "high"), conformal_p_value(cal, t, "low")))


def stored(values: np.ndarray) -> np.ndarray:
    """What calibration.json keeps of the per-score values: 9 significant digits."""
    return np.array([float(f"{v:.9g}") for v in values], dtype=np.float64)


@dataclass(frozen=True)
class Component:
    score: str
    tail: str = "two-sided"

    def __post_init__(self) -> None:
        if self.score not in SCORES or self.tail not in TAILS:
            raise ValueError(f"component {self.score}:{self.tail} is not a known score and tail ({sorted(SCORES)}; {TAILS})")

    def to_json(self) -> dict[str, str]:
        return {"score": self.score, "tail": self.tail}


def halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A combination's seeded split of n clean images into part A (the reference) and part B."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n // 2], perm[n // 2 :]


@dataclass
class Combination:
    """The most extreme of several conformal p-values, itself calibrated on held-apart clean images."""

    components: tuple[Component, ...]
    reference: dict[str, np.ndarray]  # score -> sorted values of part A
    values: np.ndarray  # sorted min-p of the part-B images

    def component_p_values(self, t: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """p_j(x) against part A, one per component. t: score -> thresholded values (any common shape)."""
        return [tail_p_value(self.reference[c.score], np.asarray(t[c.score]), SCORES[c.score].direction, c.tail) for c in self.components]

    def min_p(self, t: Mapping[str, np.ndarray]) -> np.ndarray:
        """m(x) = min_j p_j(x) against part A."""
        return np.minimum.reduce(self.component_p_values(t))

    def p_value(self, t: Mapping[str, np.ndarray]) -> np.ndarray:
        return conformal_p_value(self.values, self.min_p(t), "low")

    @classmethod
    def fit(cls, components: Sequence[Component], clean: Mapping[str, np.ndarray], seed: int = 0) -> "Combination":
        """Splits the clean images (values aligned across scores) at random into parts A and B."""
        a, b = halves(len(clean[components[0].score]), seed)
        reference = {c.score: np.sort(np.asarray(clean[c.score])[a]) for c in components}
        combo = cls(tuple(components), reference, np.array([]))
        combo.values = np.sort(combo.min_p({c.score: np.asarray(clean[c.score])[b] for c in components}))
        return combo

    def to_json(self) -> dict[str, Any]:
        return {
            "components": [c.to_json() for c in self.components],
            "reference": {k: [float(v) for v in vals] for k, vals in self.reference.items()},
            "values": [float(v) for v in self.values],  # exact: p-values of part A, compared with ≤
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Combination":
        components = tuple(Component(c["score"], c["tail"]) for c in d["components"])
        reference = {k: np.sort(np.asarray(v, dtype=np.float64)) for k, v in d["reference"].items()}
        return cls(components, reference, np.sort(np.asarray(d["values"], dtype=np.float64)))


COMBINED = "combined"


@dataclass
class Calibration:
    weights_sha256: str
    data: dict[str, Any]
    alpha: float
    statistic: str
    values: dict[str, np.ndarray]  # name -> sorted (n,) float64, thresholded form
    score_options: dict[str, Any] = field(default_factory=dict)
    tail: str = "one-sided"  # of the decision statistic: its own direction, or both tails
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    combination: Combination | None = None  # with statistic "combined"
    mondrian: dict[int, np.ndarray] | None = None  # class-conditional: predicted class -> sorted decision statistic

    def __post_init__(self) -> None:
        if self.tail not in TAILS:
            raise ValueError(f"decision tail {self.tail!r} is not one of {TAILS}")
        if (self.statistic == COMBINED) != (self.combination is not None):
            raise ValueError("a combined decision needs its combination, and only it")

    @property
    def n(self) -> int:
        """Clean images behind the decision's p-value (part B for a combined decision)."""
        return len(self.combination.values) if self.combination else len(self.values[self.statistic])

    @property
    def components(self) -> list[dict[str, str]] | None:
        """A combined decision's scores and tails, as in calibration.json; None for one statistic."""
        return [c.to_json() for c in self.combination.components] if self.combination else None

    @property
    def decision_scores(self) -> tuple[str, ...]:
        """The scores the decision needs."""
        return tuple(c.score for c in self.combination.components) if self.combination else (self.statistic,)

    def p_value(self, name: str, t: np.ndarray) -> np.ndarray:
        """Conformal p-values of thresholded-form scores t (any shape) against the clean values."""
        return conformal_p_value(self.values[name], t, SCORES[name].direction)

    def decision_rank(self, t: Mapping[str, np.ndarray]) -> np.ndarray:
        """Smaller = more unusual, ordered like the decision p-value but without its ties (the
        uncalibrated minimum for a combined decision): for ROC curves of the decision."""
        return self.combination.min_p(t) if self.combination else self.decision_p_value(t)

    def decision_statistic(self, t: Mapping[str, np.ndarray]) -> np.ndarray:
        """What the decision ranks: the statistic's thresholded value, or a combination's min-p."""
        return self.combination.min_p(t) if self.combination else np.asarray(t[self.statistic], dtype=np.float64)

    def _against(self, reference: np.ndarray, s: np.ndarray) -> np.ndarray:
        if self.combination is not None:
            return conformal_p_value(reference, s, "low")
        return tail_p_value(reference, s, SCORES[self.statistic].direction, self.tail)

    def decision_p_value(self, t: Mapping[str, np.ndarray], predicted: np.ndarray | None = None) -> np.ndarray:
        """The p-value the flag is decided on, from thresholded scores t (name -> values; at least
        decision_scores). Two-sided: min(1, 2·min(p_upper, p_lower)), still valid; combined: see
        Combination. A Mondrian calibration ranks each image among the clean images of its predicted
        class (predicted: same shape as the values), so P(p ≤ α | class) ≤ α for every class."""
        return self.statistic_p_value(self.decision_statistic(t), predicted)

    def statistic_p_value(self, s: np.ndarray, predicted: np.ndarray | None = None) -> np.ndarray:
        """The decision p-value of decision statistics s (`decision_statistic`'s values)."""
        if self.mondrian is None:
            return self._against(self.combination.values if self.combination else self.values[self.statistic], s)
        if predicted is None:
            raise ValueError("this calibration is class-conditional (Mondrian): the decision needs each image's predicted class")
        classes = np.broadcast_to(np.asarray(predicted), s.shape)
        p = np.ones(s.shape)
        for c in np.unique(classes):
            here = classes == c
            p[here] = self._against(self.mondrian.get(int(c), np.empty(0)), s[here])  # no reference: p = 1, never flagged
        return p

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "weights_sha256": self.weights_sha256,
            "data": self.data,
            "n": self.n,
            "alpha": self.alpha,
            "decision": {"statistic": self.statistic, "tail": self.tail}
            | (self.combination.to_json() if self.combination else {})
            | ({"mondrian": {str(c): [float(v) for v in vals] for c, vals in self.mondrian.items()}} if self.mondrian else {}),
            "score_options": self.score_options,
            "created": self.created,
            "scores": {
                k: {"direction": SCORES[k].direction, "log10": SCORES[k].log, "values": stored(vals).tolist()}
                for k, vals in self.values.items()
            },
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Calibration":
        if d.get("format") != FORMAT:
            raise ValueError(f"calibration format {d.get('format')!r} is not supported (expected {FORMAT})")
        values = {k: np.sort(np.asarray(v["values"], dtype=np.float64)) for k, v in d["scores"].items() if k in SCORES}
        statistic = d["decision"]["statistic"]
        combination = Combination.from_json(d["decision"]) if statistic == COMBINED else None
        if combination is None and statistic not in values:
            raise ValueError(f"decision statistic {statistic!r} has no calibration values")
        tail = d["decision"].get("tail", "one-sided")
        if tail not in TAILS:
            raise ValueError(f"decision tail {tail!r} is not one of {TAILS}")
        mondrian = (
            {int(c): np.sort(np.asarray(v, dtype=np.float64)) for c, v in d["decision"]["mondrian"].items()}
            if "mondrian" in d["decision"]
            else None
        )
        return cls(
            d["weights_sha256"],
            d["data"],
            float(d["alpha"]),
            statistic,
            values,
            d.get("score_options", {}),
            tail,
            d["created"],
            combination,
            mondrian,
        )

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        return cls.from_json(json.loads(path.read_text()))

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "alpha": self.alpha,
            "statistic": self.statistic,
            "tail": self.tail,
            "components": self.components,
            "mondrian": self.mondrian is not None,
            "data": self.data,
            "created": self.created,
            "score_options": self.score_options,
            "scores": sorted(self.values),
        }


def mondrian_references(cal: Calibration, clean: Mapping[str, np.ndarray], labels: np.ndarray) -> dict[int, np.ndarray]:
    """Per class, the sorted decision statistic of the clean calibration images of that class (the
    images cal was fitted on, in the same order: score -> (n,), labels (n,) = their predicted classes,
    which are their true ones). For a combination only its part B counts, as for the pooled values."""
    labels = np.asarray(labels)
    if cal.combination is not None:
        _, b = halves(len(labels))
        s, labels = cal.combination.min_p({k: np.asarray(clean[k])[b] for k in cal.decision_scores}), labels[b]
        if not np.array_equal(np.sort(s), cal.combination.values):
            raise ValueError("these clean values are not the ones the combination was fitted on (or not in the same order)")
    else:
        s = np.asarray(clean[cal.statistic], dtype=np.float64)
    return {int(c): np.sort(s[labels == c]) for c in np.unique(labels)}

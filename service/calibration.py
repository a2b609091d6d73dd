"""Conformal calibration (design.md §5): sorted clean scores, p-values, and the decision.

For a score where larger is more unusual, the p-value of t is (1 + #{c_i ≥ t}) / (n + 1); under
exchangeability with the n clean calibration images, P(p ≤ α) ≤ α. Scores are compared in the
form they are thresholded in (log10 for the Fisher scores).
"""

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.fisher import SCORES

FORMAT = 1
TAILS = ("one-sided", "two-sided")


def conformal_p_value(cal: np.ndarray, t: np.ndarray, direction: str = "high") -> np.ndarray:
    """(1 + #{c_i at least as unusual as t}) / (n + 1) against sorted clean values cal."""
    if direction == "high":
        unusual = len(cal) - np.searchsorted(cal, t, side="left")  # #{c ≥ t}
    else:
        unusual = np.searchsorted(cal, t, side="right")  # #{c ≤ t}
    return (1.0 + unusual) / (len(cal) + 1.0)


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

    def __post_init__(self) -> None:
        if self.tail not in TAILS:
            raise ValueError(f"decision tail {self.tail!r} is not one of {TAILS}")

    @property
    def n(self) -> int:
        return len(self.values[self.statistic])

    def p_value(self, name: str, t: np.ndarray) -> np.ndarray:
        """Conformal p-values of thresholded-form scores t (any shape) against the clean values."""
        return conformal_p_value(self.values[name], t, SCORES[name].direction)

    def decision_p_value(self, t: np.ndarray) -> np.ndarray:
        """The decision statistic's p-value; two-sided: min(1, 2·min(p_upper, p_lower)), still valid."""
        if self.tail == "one-sided":
            return self.p_value(self.statistic, t)
        cal = self.values[self.statistic]
        upper = (1.0 + len(cal) - np.searchsorted(cal, t, side="left")) / (len(cal) + 1.0)
        lower = (1.0 + np.searchsorted(cal, t, side="right")) / (len(cal) + 1.0)
        return np.minimum(1.0, 2.0 * np.minimum(upper, lower))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "weights_sha256": self.weights_sha256,
            "data": self.data,
            "n": self.n,
            "alpha": self.alpha,
            "decision": {"statistic": self.statistic, "tail": self.tail},
            "score_options": self.score_options,
            "created": self.created,
            "scores": {
                k: {"direction": SCORES[k].direction, "log10": SCORES[k].log, "values": [float(f"{v:.9g}") for v in vals]}
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
        if statistic not in values:
            raise ValueError(f"decision statistic {statistic!r} has no calibration values")
        tail = d["decision"].get("tail", "one-sided")
        if tail not in TAILS:
            raise ValueError(f"decision tail {tail!r} is not one of {TAILS}")
        return cls(d["weights_sha256"], d["data"], float(d["alpha"]), statistic, values, d.get("score_options", {}), tail, d["created"])

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        return cls.from_json(json.loads(path.read_text()))

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "alpha": self.alpha,
            "statistic": self.statistic,
            "tail": self.tail,
            "data": self.data,
            "created": self.created,
            "score_options": self.score_options,
            "scores": sorted(self.values),
        }

"""What each detector column sees on its own: a part-B study (docs/detection.md#detector-options).

    python -m bench.column_auc --model cifar10 --sigma 0.00784 --squeezers median2,blur05,blur1,bits4,bits5 \
      --attacks <fit-detector's attacks> --controls <its controls> --out bench/results/column-auc-cifar10

For every raw feature column (service.core.features, with the squeezers given, which may be more than a
detector uses) and every attack and control, on part B's images as `fisherguard fit-detector` collects
them (the same cached images): the ROC-AUC of the column between the clean images and the attack's
successful images, or the control's changed images the classifier still reads right. 0.5: the column
does not move; far from 0.5 either way: it does. A column that separates an attack from the clean
images but not from a control is a column the detector cannot use against that attack once the
control is among its negatives.
"""

import argparse
from typing import Any

from bench.common import environment, write
from bench.detector_options import add_study_arguments, collected
from service.lab import learn
from service.lab.stats import roc_auc


def aucs(c: learn.Collected, part: str = "b") -> dict[str, dict[str, float]]:
    """column -> spec -> AUC of clean against the spec's images (controls: those still read right)."""
    sets = c.sets[part]
    cols = [k for k in sets.clean if k not in ("shift", "predicted")]
    images = {s: learn.still_right(sets, s) if s in c.controls else sets.adv[s] for s in (*c.attacks, *c.controls)}
    return {k: {s: roc_auc(sets.clean[k], t[k]) if len(t[k]) else float("nan") for s, t in images.items()} for k in cols}


def markdown(table: dict[str, dict[str, float]], specs: list[str]) -> str:
    lines = [
        "# Each column on its own, part B (ROC-AUC, clean against the attack's successes or the control's images still read right)",
        "",
        "| column | " + " | ".join(specs) + " |",
        "|" + "---|" * (1 + len(specs)),
    ]
    lines += [f"| {k} | " + " | ".join(f"{row[s]:.2f}" for s in specs) + " |" for k, row in table.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    add_study_arguments(ap)
    a = ap.parse_args()
    _, _, c = collected(a)
    table = aucs(c)
    specs = [*c.attacks, *c.controls]
    report: dict[str, Any] = {"environment": environment("cpu"), "model": a.model, "squeezers": a.squeezers, "auc": table}
    a.out.mkdir(parents=True, exist_ok=True)
    write(a.out / "columns.json", report)
    (a.out / "columns.md").write_text(markdown(table, specs))
    print(markdown(table, specs))


if __name__ == "__main__":
    main()

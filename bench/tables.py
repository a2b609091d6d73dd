"""Markdown tables from the committed benchmark JSON (what the README quotes).

python -m bench.tables bench/results/engine-cpu.json
python -m bench.tables bench/results/load-cpu.json
"""

import json
import sys
from pathlib import Path
from typing import Any


def engine(d: dict[str, Any]) -> str:
    rows = d["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    out = []
    for m in models:
        out += [
            f"**{m}** — images/s (× cost floor measured in the same run)",
            "",
            "| method | " + " | ".join(f"batch {b}" for b in batches) + " |",
            "|---|" + "---|" * len(batches),
        ]
        methods = list(dict.fromkeys(r["method"] for r in rows if r["model"] == m))
        for meth in methods:
            cells = []
            for b in batches:
                r = next((r for r in rows if r["model"] == m and r["batch"] == b and r["method"] == meth), None)
                if r is None:
                    cells.append("—")
                elif "speedup_of_engine" in r:
                    cells.append(f"{r['images_per_s']:.0f} (engine {r['speedup_of_engine']:.1f}× faster)")
                elif "ratio_to_floor" in r:
                    cells.append(f"{r['images_per_s']:.0f} ({r['ratio_to_floor']:.2f}×)")
                else:
                    cells.append(f"{r['images_per_s']:.0f}")
            out.append(f"| `{meth}` | " + " | ".join(cells) + " |")
        out.append("")
    env = d["environment"]
    out.append(
        f"{env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, {env['date']}, commit {env['git_commit']}; median of {d['reps']} interleaved repeats."
    )
    return "\n".join(out)


def load(d: dict[str, Any]) -> str:
    """bench/load.py's result: per bundle, the closed and open loops, then the headline ratios."""
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else "—"  # noqa: E731
    out: list[str] = []
    for model, m in d["models"].items():
        out += [
            f"### {model}",
            "",
            "| max_batch_size | concurrency | images/s | p50 ms | p90 ms | p99 ms | 503 rate | mean batch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for b, cfg in m["configs"].items():
            for r in cfg["closed_loop"]:
                mb = f"{r['mean_batch_size']:.1f}" if r["mean_batch_size"] else "—"
                out.append(
                    f"| {b} | {r['concurrency']} | {r['images_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['rate_503']:.3f} | {mb} |"
                )
        out += [
            "",
            "| max_batch_size | offered load | offered/s | served images/s | p50 ms | p99 ms | 503 rate | p99 of 503s ms | lost |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for b, cfg in m["configs"].items():
            for r in cfg.get("open_loop", []):
                out.append(
                    f"| {b} | {r['load_factor']}× | {r['offered_per_s']:.0f} | {r['images_per_s']:.0f} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {r['rate_503']:.3f} | {fmt(r['p99_503_ms'])} | {r['lost_or_failed']} |"
                )
        for b, cfg in m["configs"].items():
            if "rss_kb" in cfg:
                rss = cfg["rss_kb"]
                out.append(
                    f"\nbatch {b}: server RSS {rss['before'] / 1024:.0f} MB before the open loops, {rss['after'] / 1024:.0f} MB after"
                )
        heat = m["heatmap_neighbours"]
        out += [
            "",
            f"engine offline at batch 32: {m['engine_offline_images_per_s_b32']:.0f} images/s; batched / batch-1 at concurrency 32: "
            f"{m['batched_over_unbatched_at_c32']:.2f}; service / engine at saturation (batch 32): {m['service_over_engine_b32']:.2f}; "
            f"a default image's compute beside `heatmaps=fis` / alone: {heat['ratio']:.2f}",
        ]
        for b, cfg in m["configs"].items():
            for kind in ("bombs_overloaded", "bombs_idle"):
                if kind in cfg:
                    rows = cfg[kind]["requests"]
                    codes = sorted({f"{r['status']} {r['code']}" for r in rows})
                    worst = max(r["ms"] for r in rows)
                    out.append(
                        f"- batch {b}, {kind.replace('_', ' to ').replace('bombs', 'bomb requests')}: {len(rows)} × {', '.join(codes)}, slowest {worst:.1f} ms, RSS growth {cfg[kind]['rss_growth_kb'] / 1024:.1f} MB"
                    )
        out.append("")
    env = d["environment"]
    out.append(f"{env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, {env['date']}, commit {env['git_commit']}.")
    return "\n".join(out)


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    print(engine(data) if "rows" in data else load(data))

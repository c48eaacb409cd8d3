"""`mclfir report RUN_DIR...`: per-run tables and cross-run comparison, markdown + PNG plots."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..methods import METHODS
from ..utils.io import atomic_write_text
from ..runfolder.layout import RunFolder
from .record import fmt, markdown_table, mean_excess_leakage, summary_text


def load_results(run_dir: str | Path) -> dict:
    return RunFolder(run_dir).read_results()


def has_estimates(res: dict) -> bool:
    """Some of the run's cost was computed, not run (static_final_only)."""
    return any(c.get("estimated") for c in res["cost"])


def method_of(res: dict) -> str:
    return res["config"]["train"]["method"]


def method_class(res: dict):
    """The run's method class where it is registered here (a results file imports nothing), else None."""
    name = method_of(res)
    return METHODS.get(name) if name in METHODS else None


def method_label(res: dict) -> str:
    return METHODS.label(method_of(res))


def static_costs(results: Sequence[dict]) -> Optional[dict]:
    """Training cost of the static baseline (a method whose `static_reference` is set): the last joint
    retraining, and all of them summed."""
    for res in results:
        cls = method_class(res)
        if cls is not None and cls.static_reference and res["cost"]:
            return {"final": res["cost"][-1]["train_seconds"],
                    "cumulative": sum(c["train_seconds"] for c in res["cost"]),
                    "estimated": has_estimates(res)}
    return None


def comparison_table(runs: Sequence[str], results: Sequence[dict]) -> str:
    static = static_costs(results)
    rows = [["run", "method", "final avg mAP", "avg forgetting", "BWT", "train s", "device-s", "eval s",
             "run wall s", "cost / static-final", "cost / static-cumulative", "leakage"]]
    est = "*" if static and static["estimated"] else ""
    for r, res in zip(runs, results):
        m = res["metrics"][-1] if res["metrics"] else {}
        train_s = sum(c["train_seconds"] for c in res["cost"])
        run_est = "*" if has_estimates(res) else ""
        done, total = len(res["accuracy_matrix"]), len(res["increments"])
        name = Path(r).name if res.get("complete") else f"{Path(r).name} (INCOMPLETE: {done}/{total} increments)"
        rows.append([name, method_label(res), fmt(m.get("average_map")),
                     fmt(m.get("average_forgetting")), fmt(m.get("bwt")), f"{train_s:.1f}{run_est}",
                     f"{sum(c['device_seconds'] for c in res['cost']):.1f}",
                     f"{sum(c['eval_seconds'] for c in res['cost']):.1f}",
                     f"{res['wall_seconds']:.0f}" if res.get("wall_seconds") else "-",
                     f"{train_s / static['final']:.2f}" if static else "-",
                     f"{train_s / static['cumulative']:.2f}{est}" if static else "-",
                     _leakage_cell(res)])
    table = markdown_table(rows) + ("\n\nleakage: mean over heads and the other attributes of (share of a head's "
                                    "top-10 sharing the query's value) - (chance), in points; 0 = attribute-specific.")
    if est:
        table += ("\n\n\\* includes joint retrainings that were not run (train.static_final_only): their "
                  "seconds are computed from the final retraining's measured seconds per step.")
    return table


def _leakage_cell(res: dict) -> str:
    gap = mean_excess_leakage(res)
    return "-" if gap is None else f"{100 * gap:+.1f}"


def plot_matrix(res: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    attrs = [a for inc in res["increments"] for a in inc["attributes"]]
    mat = np.full((len(res["accuracy_matrix"]), len(attrs)), np.nan)
    for t, row in enumerate(res["accuracy_matrix"]):
        for j, a in enumerate(attrs):
            if a in row:
                mat[t, j] = 100 * row[a]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(attrs), 1.0 + 0.6 * len(mat)))
    im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=100)
    for t in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            if not np.isnan(mat[t, j]):
                ax.text(j, t, f"{mat[t, j]:.1f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(attrs)), attrs, rotation=30, ha="right")
    ax.set_yticks(range(mat.shape[0]), [f"after {t}" for t in range(mat.shape[0])])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="mAP %")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(runs: Sequence[str], results: Sequence[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r, res in zip(runs, results):
        xs, ys, total = [], [], 0.0
        for c, m in zip(res["cost"], res["metrics"]):
            total += c["train_seconds"]
            xs.append(total)
            ys.append(100 * m["average_map"])
        ax.plot(xs, ys, marker="o", label=f"{Path(r).name} ({method_label(res)})")
    ax.set_xlabel("cumulative training seconds")
    ax.set_ylabel("average mAP over seen attributes (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compatibility(runs: Sequence[str], results: Sequence[dict], path: Path) -> bool:
    """Per run: mean over old attributes of a-c (forgetting, re-embedded) and b-c (stale deployed index)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for r, res in zip(runs, results):
        rows = res.get("compatibility") or []
        if not rows:
            continue
        xs = [e["increment"] for e in rows]
        for key, style in (("forgetting", "-o"), ("stale_index_cost", "--s")):
            ys = [100 * float(np.mean([a[key] for a in e["attributes"].values()])) for e in rows]
            ax.plot(xs, ys, style, label=f"{Path(r).name} ({method_label(res)}): "
                                         f"{'a-c re-embedded' if key == 'forgetting' else 'b-c deployed index'}")
        drawn = True
    if drawn:
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("after increment")
        ax.set_ylabel("mAP change on old attributes (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def machines_text(runs: Sequence[str], results: Sequence[dict]) -> str:
    """Which machine measured each run's costs (runs from before this was recorded say so)."""
    lines = ["Machines (costs compare only within one machine):"]
    for r, res in zip(runs, results):
        m = res.get("machine")
        if not m:
            lines.append(f"- {Path(r).name}: not recorded")
            continue
        device = m["gpu"] or f"CPU only, {m['cpu_count']} cores ({m['torch_threads']} torch threads)"
        lines.append(f"- {Path(r).name}: {m['host']}, {device}, torch {m['torch']}, Python {m['python']}")
    return "\n".join(lines)


def report(runs: List[str], out: Optional[str] = None) -> str:
    results = [load_results(r) for r in runs]
    out_dir = Path(out or runs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ["# MCL-FIR report", "## Comparison", comparison_table(runs, results), machines_text(runs, results)]
    for r, res in zip(runs, results):
        name = Path(r).name
        png = out_dir / f"matrix_{name}.png"
        plot_matrix(res, png, name)
        parts += [f"## {name}", summary_text(res), f"![accuracy matrix]({png.name})"]
    plot_cost(runs, results, out_dir / "map_vs_cost.png")
    parts.append("![average mAP vs cumulative training cost](map_vs_cost.png)")
    if plot_compatibility(runs, results, out_dir / "compatibility.png"):
        parts.append("![old attributes: re-embedded (a-c) vs the deployed index (b-c)](compatibility.png)")
    text = "\n\n".join(parts) + "\n"
    atomic_write_text(out_dir / "report.md", text)
    print(text)
    return text

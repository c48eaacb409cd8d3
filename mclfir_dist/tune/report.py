"""`mclfir tune --report`: what a study found, to look at. REPORT.md (every trial: params, metric, state,
seconds; the best; each knob's best value interior or at an end), Optuna's plots as PNG (matplotlib), and the
command that opens optuna-dashboard on the storage."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Dict, List

from ..utils.io import atomic_write_text
from . import space as spaces

log = logging.getLogger(__name__)
PLOTS = ("optimization_history", "param_importances", "slice", "contour", "intermediate_values")


def knob_position(key: str, spec: dict, best, finished: List[dict]) -> str:
    """'interior' when values on both sides of the best one were tried (for a ladder of choices: both
    neighbours); else which end it sits at, and whether that end is the range's own bound."""
    tried = sorted({t["params"][key] for t in finished if key in t["params"]})
    ladder = spaces.ladder(spec)
    if ladder is not None:
        i = ladder.index(best)
        below, above = ladder[i - 1] if i > 0 else None, ladder[i + 1] if i + 1 < len(ladder) else None
        if below is not None and above is not None:
            return "interior" if below in tried and above in tried else \
                f"not settled (neighbour {below if below not in tried else above} untried)"
        return f"at the {'low' if below is None else 'high'} end of its choices"
    if "choices" in spec:
        return "a choice (unordered)"
    low, high = next(iter(spec.values()))
    if any(v < best for v in tried) and any(v > best for v in tried):
        return "interior (values tried on both sides)"
    side = "low" if not any(v < best for v in tried) else "high"
    return f"at the {side} end of what was tried (range {low} - {high})"


def trial_rows(study) -> List[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "params": dict(t.params), "value": t.value,
                     "seconds": t.user_attrs.get("seconds"), "run": t.user_attrs.get("run", "")})
    return rows


def report_text(study, settings: dict) -> str:
    rows = trial_rows(study)
    space = settings["space"]
    keys = list(space)
    lines = [f"# Study `{study.study_name}`", "",
             f"Sampler {settings['sampler']} (seed {settings['seed']}), pruner {settings['pruner']}, metric "
             f"`{settings['metric']}` ({study.direction.name.lower()}), validation split. "
             f"{sum(r['state'] in ('COMPLETE', 'PRUNED') for r in rows)} finished trials "
             f"({sum(r['state'] == 'PRUNED' for r in rows)} pruned), {sum(r['state'] == 'FAIL' for r in rows)} "
             "failed.", "", "| trial | " + " | ".join(keys) + " | metric | state | seconds |",
             "|" + "---|" * (len(keys) + 4)]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = study.best_trial if complete else None
    for r in rows:
        cells = [_fmt(r["params"].get(k)) for k in keys]
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        if r["state"] == "PRUNED" and value:   # Optuna keeps the last reported point: not the final metric
            value = f"({value} at the stop)"
        if best is not None and r["number"] == best.number:
            value = f"**{value}**"
        lines.append(f"| {r['number']} | " + " | ".join(cells) + f" | {value} | {r['state'].lower()} | "
                     f"{'' if r['seconds'] is None else r['seconds']} |")
    if best is not None:
        lines += ["", f"Best: trial {best.number}, {settings['metric']} = {best.value:.4f}.", "",
                  "| knob | best value | position |", "|---|---|---|"]
        for k in keys:
            lines.append(f"| `{k}` | {_fmt(best.params.get(k))} | "
                         f"{knob_position(k, space[k], best.params.get(k), complete)} |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def write_plots(study, out: Path) -> Dict[str, str]:
    """Each of Optuna's plots that the study can draw, as a PNG; {plot: why not} for the others."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm
    optuna.logging.set_verbosity(optuna.logging.ERROR)   # "unique value length is less than 2": not news here
    skipped = {}
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # "experimental" warnings of Optuna's matplotlib backend
                ax = getattr(ovm, f"plot_{name}")(study)
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            figure.set_size_inches(8, 5)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # the slice plot's colour bar is not tight_layout's kind
                figure.tight_layout()
            figure.savefig(out / f"{name}.png", dpi=100)
            plt.close(figure)
        except Exception as e:   # too few trials, one parameter for a contour...: said, not fatal
            skipped[name] = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            plt.close("all")
    return skipped


def write_report(study, settings: dict, out: Path, storage_shown: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    skipped = write_plots(study, out)
    text = report_text(study, settings)
    drawn = [p for p in PLOTS if p not in skipped]
    text += "\n" + "".join(f"![{p}]({p}.png)\n\n" for p in drawn)
    text += "".join(f"- {p}: not drawn ({why})\n" for p, why in skipped.items())
    text += f"\nOpen the study in a browser: `optuna-dashboard {storage_shown}`\n"
    atomic_write_text(out / "REPORT.md", text)
    return text

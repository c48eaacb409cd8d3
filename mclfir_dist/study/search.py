"""A compass search over a method's knobs, each a ladder of values: the next trial is the best point so far with
one knob moved to its nearest untried value, so every knob moves once before any moves twice. A search is
settled when every one-step neighbour of its best point was tried. `knobs` is a list of (config key, ladder);
a trial is {"point": {key: value}, "score": float, ...}."""
from __future__ import annotations


def next_trial(knobs: list, start: dict, trials: list):
    """The compass search's next point: the best point so far with one knob moved along its ladder to the
    nearest untried value: distance 1 before 2; the knob with the fewest values tried first (so a small budget
    moves every knob once, the method's own KD weight and decay included), one step up before one step down.
    `start` when nothing was tried; None when every value of every knob was tried around the best."""
    if not trials:
        return dict(start)
    best = max(trials, key=lambda t: t["score"])["point"]
    tried = [t["point"] for t in trials]
    knobs = sorted(knobs, key=lambda knob: len({p[knob[0]] for p in tried}))   # stable: the given order
    longest = max(len(ladder) for _, ladder in knobs)
    for distance in range(1, longest):
        for key, ladder in knobs:
            for step in (distance, -distance):
                j = ladder.index(best[key]) + step
                if 0 <= j < len(ladder):
                    candidate = {**best, key: ladder[j]}
                    if candidate not in tried:
                        return candidate
    return None


def interior(knobs: list, trials: list) -> dict:
    """Per knob: is the chosen value beaten by neither neighbour on its ladder, both tried (with the other knobs
    at their chosen values)? At the ladder's first or last value (an encoder scale of 0 cannot go lower) the
    one neighbour is asked for."""
    best = max(trials, key=lambda t: t["score"])["point"]
    tried = [t["point"] for t in trials]
    out = {}
    for key, ladder in knobs:
        i = ladder.index(best[key])
        sides = [{**best, key: ladder[j]} for j in (i - 1, i + 1) if 0 <= j < len(ladder)]
        every = all(s in tried for s in sides)
        if len(sides) < 2:
            out[key] = f"end of the ladder, its neighbour {'tried' if every else 'untried'}"
        else:
            out[key] = "interior" if every else "a neighbour untried"
    return out


SETTLED = ("interior", "end of the ladder, its neighbour tried")


def settled(knobs: list, trials: list) -> bool:
    """Has the compass search converged: was every ladder neighbour of the best point (one knob moved one step)
    tried, so that every chosen value is interior or at the end of its ladder with its one neighbour tried?"""
    return all(v in SETTLED for v in interior(knobs, trials).values())


def bracketed(knobs: list, trials: list) -> dict:
    """Per knob, the weaker test: was a value below and a value above the chosen one tried (whatever the other
    knobs were)? That is, did the grid reach past the chosen value on both sides."""
    best = max(trials, key=lambda t: t["score"])["point"]
    out = {}
    for key, ladder in knobs:
        i = ladder.index(best[key])
        seen = {ladder.index(t["point"][key]) for t in trials}
        below, above = any(j < i for j in seen), any(j > i for j in seen)
        out[key] = "bracketed" if below and above else \
            "end of the ladder" if i in (0, len(ladder) - 1) else f"nothing tried {'below' if above else 'above'}"
    return out


def trial_table(title: str, entry: dict, seconds: str, verdict) -> list:
    """Markdown lines of one method's trials: a row per trial (the chosen one's score in bold), then its chosen
    values with `verdict(key)` for each. `seconds`: the trial field shown as the last column."""
    keys = list(entry["chosen"])
    label = "seconds" if seconds == "seconds" else "train s"
    lines = [f"## {title}", "", "| trial | " + " | ".join(keys) + f" | val avg mAP | {label} |",
             "|---|" + "---|" * (len(keys) + 2)]
    for t in entry["trials"]:
        bold = "**" if t["point"] == entry["chosen"] else ""
        lines.append(f"| {t['run']} | " + " | ".join(f"{t['point'][k]:g}" for k in keys)
                     + f" | {bold}{100 * t['score']:.2f}{bold} | {t.get(seconds) or 0:.0f} |")
    return lines + ["", "Chosen: " + ", ".join(f"{k}={v:g} ({verdict(k)})" for k, v in entry["chosen"].items()), ""]

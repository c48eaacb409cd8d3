"""One study run: `mclfir train` in its own process, kept when it already finished with the same settings, so a
study can be stopped and restarted phase by phase. Misuse is one line and exit 2; a failed run exits 1."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ..runfolder.layout import RunFolder

ROOT = Path(__file__).resolve().parents[2]


class UsageError(SystemExit):
    """A study refused: one line on stderr, exit 2."""


def usage_error(prog: str, message: str):
    print(f"{prog}: {message}", file=sys.stderr)
    raise UsageError(2)


class Parser(argparse.ArgumentParser):
    """argparse's errors (a bad number, an unknown method) as one line and exit 2, not usage plus error."""

    def error(self, message: str):
        usage_error(self.prog.removesuffix(".py"), message)


def same_settings(config: Path, overrides, res: dict) -> bool:
    """Was a kept run made with these settings? (A run is found by name; a new choice of values must not
    reuse the old run.)"""
    from ..config import RunConfig, flat_keys, to_dict
    from ..configure import load_config
    saved, wanted, default = (flat_keys(d) for d in (res.get("config") or {}, to_dict(load_config(config, list(overrides))),
                                                 to_dict(RunConfig())))
    # a key newer than the kept run counts as the same when asked at its default: the run behaved that way
    return all(saved[k] == v if k in saved else k in default and v == default[k] for k, v in wanted.items()) and \
        set(saved) <= set(wanted)


def run_train(config: Path, out: Path, overrides, log: Path, prog: str = "study") -> dict:
    """One `mclfir train`, skipped when its results.json is already complete with the same settings; the
    results with `wall_seconds`, the run's own clock from start to exit."""
    results, wall = RunFolder(out).results, out / "wall_seconds.json"   # the second is the study's own
    if results.is_file() and json.loads(results.read_text()).get("complete"):
        res = json.loads(results.read_text())
        if same_settings(config, overrides, res):
            print(f"  {out.name}: done before, kept", flush=True)
            res["wall_seconds"] = json.loads(wall.read_text()) if wall.is_file() else None
            return res
        print(f"  {out.name}: done before with other settings, run again", flush=True)
    cmd = [str(Path(sys.executable).parent / "mclfir"), "train", "--config", str(config), "--out", str(out),
           "--overwrite", *overrides]
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode in (130, 143):   # the run was stopped by Ctrl-C or SIGTERM (it saved, then exited)
        raise KeyboardInterrupt
    if p.returncode == 2:   # `mclfir train` refused something the user can fix (a bad CSV, a wrong value): its line
        lines = [ln for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
        usage_error(prog, f"{out.name}: {lines[-1] if lines else 'exit 2'} (log: {log})")
    if p.returncode != 0:
        raise SystemExit(f"{out.name} failed (exit {p.returncode}); its log: {log}")
    res = json.loads(results.read_text())
    res["wall_seconds"] = round(time.time() - t0, 1)
    wall.write_text(json.dumps(res["wall_seconds"]))   # the budget counts runs kept from an earlier start too
    print(f"  {out.name}: final avg mAP {100 * res['final']['average_map']:.2f} in {res['wall_seconds']:.0f}s",
          flush=True)
    return res

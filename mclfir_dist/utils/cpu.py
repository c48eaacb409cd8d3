"""What this CPU can do fast: bf16 matrix units decide whether bf16 autocast pays on CPU."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

# AMX-BF16 tiles (Sapphire Rapids and later) or AVX512-BF16 dot products (Cooper Lake, Zen 4): oneDNN runs
# bf16 convolutions and matmuls natively. Without them bf16 is emulated and ran 10-20x slower than fp32.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:   # macOS, Windows
        return ""


def _field(cpuinfo: str, name: str) -> str:
    """The first `name : value` line's value ('' if none)."""
    for line in cpuinfo.splitlines():
        if line.startswith(name) and ":" in line:
            return line.split(":", 1)[1].strip()
    return ""


def cpu_flags(cpuinfo: str | None = None) -> frozenset:
    """The flags line of /proc/cpuinfo (empty where there is none)."""
    return frozenset(_field(_cpuinfo() if cpuinfo is None else cpuinfo, "flags").split())


@functools.lru_cache(maxsize=None)
def bf16_units() -> tuple:
    """The bf16 matrix-unit flags this CPU reports, in BF16_FLAGS order (empty: none)."""
    flags = cpu_flags()
    return tuple(f for f in BF16_FLAGS if f in flags)


def cpu_name() -> str:
    """The CPU's model name (for results.json: speeds compare only on one CPU)."""
    return _field(_cpuinfo(), "model name") or platform.processor() or platform.machine()

"""What this CPU can do fast: bf16 matrix units decide whether bf16 autocast pays on CPU."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

# AMX-BF16 tiles (Sapphire Rapids and later) or AVX512-BF16 dot products (Cooper Lake, Zen 4): oneDNN runs
# bf16 convolutions and matmuls natively. Without them bf16 is emulated and ran 10-20x slower than fp32.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> frozenset:
    """The flags line of /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=None)
def bf16_units() -> tuple:
    """The bf16 matrix-unit flags this CPU reports, in BF16_FLAGS order (empty: none)."""
    flags = cpu_flags()
    return tuple(f for f in BF16_FLAGS if f in flags)


def cpu_name() -> str:
    """The CPU's model name (for results.json: speeds compare only on one CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

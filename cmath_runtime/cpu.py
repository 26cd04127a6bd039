"""Which CPU this is: its model name and ISA class, for the engine choice's cache key and for benchmark records.

The ISA class is the widest vector unit the engines can use, read from the kernel's CPU flags (/proc/cpuinfo on
Linux): "amx" (AMX tiles: bf16 and int8 matrix units), "avx512_vnni" (AVX-512 with int8 dot products),
"avx512", "avx2", else "other". Two more facts the engine choice reads: whether the CPU has bf16 arithmetic
(avx512_bf16 / amx_bf16: OpenVINO's bf16 runs only there) and int8 dot products (VNNI in any width, or AMX int8:
without them int8 kernels widen to 16 bits and run no faster than fp32). Elsewhere (macOS, Windows, ARM) the
model name comes from `platform` and the class is "other".
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
ISA_CLASSES = ("amx", "avx512_vnni", "avx512", "avx2", "other")
# the flags that decide what the engines can run; the cache key lists those present
RELEVANT_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


@dataclass(frozen=True)
class CpuInfo:
    """A CPU as the engine choice sees it."""

    model: str  # "AMD EPYC 7B13", "Intel(R) Xeon(R) Platinum 8481C", ...
    flags: frozenset[str]  # the RELEVANT_FLAGS it has

    @property
    def isa(self) -> str:
        f = self.flags
        if "amx_tile" in f:
            return "amx"
        if "avx512_vnni" in f:
            return "avx512_vnni"
        if "avx512f" in f:
            return "avx512"
        if "avx2" in f:
            return "avx2"
        return "other"

    @property
    def bf16(self) -> bool:
        """bf16 arithmetic in hardware (OpenVINO refuses bf16 elsewhere)."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    @property
    def int8_dot(self) -> bool:
        """int8 dot-product instructions (VNNI, AMX int8)."""
        return bool(self.flags & {"avx_vnni", "avx512_vnni", "amx_int8"})

    @property
    def key(self) -> str:
        """What identifies this CPU in the engine choice's cache: model name and the relevant flags."""
        return f"{self.model} [{' '.join(sorted(self.flags))}]"

    def describe(self) -> str:
        return f"{self.model} ({self.isa})"

    def to_json(self) -> dict[str, object]:
        return {"model": self.model, "isa": self.isa, "flags": sorted(self.flags)}


def parse_cpuinfo(text: str) -> CpuInfo:
    """A CpuInfo from the text of /proc/cpuinfo (the first processor's "model name" and "flags")."""
    model, flags = "", ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and not model:
            model = value.strip()
        elif name in ("flags", "Features") and not flags:  # "Features" on ARM
            flags = value
        if model and flags:
            break
    have = set(flags.split())
    return CpuInfo(model or _platform_model(), frozenset(f for f in RELEVANT_FLAGS if f in have))


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (read once)."""
    try:
        return parse_cpuinfo(CPUINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:  # not Linux
        return CpuInfo(_platform_model(), frozenset())


def _platform_model() -> str:
    return platform.processor() or platform.machine() or "unknown CPU"

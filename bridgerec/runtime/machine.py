"""What machine a figure was measured on, for every benchmark JSON: CPU model, core count, the SIMD
flags that change torch's and FAISS's speed (AVX2, AVX-512, AVX-512 BF16, AMX), the load average at
the time (other work slows every figure), Python and torch versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_info() -> dict[str, Any]:
    """{'model': ..., 'flags': [the SIMD_FLAGS present]} from /proc/cpuinfo (empty on other systems)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {"model": model, "flags": [f for f in SIMD_FLAGS if f in flags]}


def machine_info() -> dict[str, Any]:
    """The block every bench/*.py writes under "machine" in its JSON."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        **cpu_info(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info

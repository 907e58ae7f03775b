"""Named onnxruntime profiles that stand for the devices users ship to.

Only descriptions live here (no onnxruntime import): `compresskit ls` and validation list them
instantly. backends/ort.py turns a Target into session options.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from compresskit.registry import Registry


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    allowed = allowed or 1
    try:
        cores: set[tuple[str, str]] = set()
        phys = core = ""
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                    cores.add((phys, core))
        if cores:
            return max(1, min(allowed, len(cores)))
    except OSError:
        pass
    return allowed


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int | None = None
    """Intra-op threads; None means all physical cores."""
    sequential: bool = True
    arena: bool = True
    provider_options: tuple[dict[str, str], ...] = field(default_factory=tuple)

    def resolved_threads(self) -> int:
        return self.threads or physical_cores()


TARGETS: Registry[Target] = Registry("target")
TARGETS.register("cpu")(Target(
    name="cpu",
    description="onnxruntime CPU execution provider, all physical cores, sequential executor",
))

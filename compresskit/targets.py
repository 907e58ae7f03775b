"""Named onnxruntime profiles that stand for the devices users ship to.

Only descriptions live here (no onnxruntime import): `compresskit ls` and validation list them
instantly. backends/ort.py turns a Target into session options.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

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
    """How onnxruntime runs a model on one kind of device."""

    name: str
    description: str
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int | None = None
    """Intra-op threads; None means all physical cores."""
    sequential: bool = True
    arena: bool = True
    provider_options: tuple[dict[str, str], ...] = field(default_factory=tuple)
    optimization: str = "all"
    """Graph optimisation level: all, extended, basic or disable."""
    pin_cores: int | None = None
    """Pin the measuring process to this many cores (None: leave the affinity alone)."""
    ort_format: bool = False
    """Load the model converted to ORT format, as onnxruntime mobile does."""

    def resolved_threads(self) -> int:
        return self.threads or physical_cores()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "providers": list(self.providers),
                "provider_options": list(self.provider_options)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Target:
        return cls(**{**data, "providers": tuple(data["providers"]),
                      "provider_options": tuple(data.get("provider_options", ()))})


TARGETS: Registry[Target] = Registry("target")
TARGETS.register("cpu")(Target(
    name="cpu",
    description="onnxruntime CPU execution provider, all physical cores, sequential executor",
))
TARGETS.register("edge")(Target(
    name="edge",
    description=(
        "an edge CPU emulated here: one thread pinned to one core, sequential executor, memory "
        "arena off, the model in ORT format as onnxruntime mobile loads it. It keeps this "
        "machine's instruction set, caches and clock, so it shows single-core behaviour and "
        "relative speed, not an ARM board's absolute latency"),
    threads=1, arena=False, pin_cores=1, ort_format=True,
))
TARGETS.register("cuda")(Target(
    name="cuda",
    description=("onnxruntime's CUDA execution provider on an NVIDIA GPU (needs onnxruntime-gpu "
                 "and a GPU; reported unavailable otherwise)"),
    providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
))


def resolve(name: str, defined: dict[str, Any] | None = None) -> Target:
    """A target by name: one defined in the pipeline file (a TargetConfig), else a built-in."""
    if defined and name in defined:
        cfg = defined[name]
        return Target(name=name, description=cfg.description,
                      providers=tuple(cfg.providers), threads=cfg.threads,
                      sequential=cfg.sequential, arena=cfg.arena,
                      provider_options=tuple(cfg.provider_options),
                      optimization=cfg.optimization, pin_cores=cfg.pin_cores,
                      ort_format=cfg.ort_format)
    return TARGETS.get(name)

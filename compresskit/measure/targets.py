"""Named onnxruntime profiles that stand for the devices users ship to.

Only descriptions live here (no onnxruntime import): `compresskit ls` and validation list them
instantly. backends/ort.py turns a Target into session options.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from compresskit.backends.device_runner import physical_cores
from compresskit.backends.remote import Remote
from compresskit.registry import Registry

__all__ = ["TARGETS", "Target", "channel_block", "physical_cores", "resolve"]


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
    remote: Remote | None = None
    """Measured on another machine (over ssh or through a command), not here."""

    def resolved_threads(self) -> int:
        return self.threads or physical_cores()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "providers": list(self.providers),
                "provider_options": list(self.provider_options),
                "remote": self.remote.to_json() if self.remote else None}


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
        remote = None
        if cfg.remote:
            remote = Remote(ssh=cfg.ssh, port=cfg.port, ssh_options=tuple(cfg.ssh_options),
                            command=cfg.command, python=cfg.python, workdir=cfg.workdir,
                            timeout_s=cfg.timeout_s)
        return Target(name=name, description=cfg.description,
                      providers=tuple(cfg.providers), threads=cfg.threads,
                      sequential=cfg.sequential, arena=cfg.arena,
                      provider_options=tuple(cfg.provider_options),
                      optimization=cfg.optimization, pin_cores=cfg.pin_cores,
                      ort_format=cfg.ort_format, remote=remote)
    return TARGETS.get(name)


def channel_block(target: Target) -> tuple[int, str]:
    """The channel count the kernels onnxruntime runs on `target` work in, and why: the
    `round_to` that lets a pruned layer fill them. onnxruntime's NCHWc convolutions block
    channels by 16 with AVX-512 and by 8 with AVX/AVX2; CUDA's tensor cores want multiples of
    8; Arm's NEON kernels work in 4- to 16-lane blocks, and 8 is what they fill well. A remote
    target is asked for its CPU's flags."""
    if "CUDAExecutionProvider" in target.providers:
        return 8, f"{target.name} runs on CUDA, whose tensor cores take channels in 8s"
    from compresskit.backends import device_runner, remote

    try:
        info = remote.probe(target.remote, target.name)["device"] if target.remote \
            else device_runner.device_info()
    except remote.RemoteError as e:
        return 8, f"{target.name} could not be asked for its CPU ({e}); 8 suits most kernels"
    isa = set(info.get("isa") or [])
    cpu = info.get("cpu") or "its CPU"
    if "avx512f" in isa:
        return 16, (f"{target.name} has AVX-512 ({cpu}): onnxruntime's NCHWc convolutions "
                    "block channels by 16")
    if isa & {"avx2", "avx"}:
        return 8, (f"{target.name} has AVX2 and no AVX-512 ({cpu}): onnxruntime's NCHWc "
                   "convolutions block channels by 8")
    return 8, f"{target.name} ({cpu}, no AVX): 8 fills NEON's and most kernels' lanes"

"""One module per YAML `type`; each exposes `run(config, ctx) -> StageResult`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compresskit.registry import Registry
from compresskit.stages import benchmark, distill, export, lowrank, prune, ptq, qat, train

STAGES: Registry[Callable[[Any, Any], Any]] = Registry("stage")
for _module in (train, distill, prune, lowrank, qat, export, ptq, benchmark):
    STAGES.register(_module.__name__.rsplit(".", 1)[-1])(_module.run)

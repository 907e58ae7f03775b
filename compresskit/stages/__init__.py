"""One module per YAML stage `type`, each with `run(cfg, ctx) -> StageResult`, and one
descriptor per stage in STAGES. The pipeline schema's stage union, the registry the runner looks
stages up in, `compresskit ls` and the report's findings per stage are all derived from STAGES,
so a new stage is a config class, a module and one line here.

Importing this package loads no stage module (they import torch at the top): a stage's module is
imported when the stage runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compresskit.config.base import StageBase
from compresskit.config.distill import DistillConfig
from compresskit.config.stages import (
    BenchmarkConfig,
    ExportConfig,
    GenerateConfig,
    LowRankConfig,
    PruneConfig,
    PtqConfig,
    QatConfig,
    TrainConfig,
)
from compresskit.registry import Registry
from compresskit.report.findings import distill_findings, shrink_findings

Findings = Callable[[dict[str, Any], dict[str, Any]], list[str]]


@dataclass(frozen=True)
class Stage:
    """A YAML stage type: its schema, where it runs, an example, what it tells the report."""

    name: str
    """The YAML `type`."""
    config: type[StageBase]
    example: str
    """A pipeline file under pipelines/ that uses the stage (the contract test validates it)."""
    findings: Findings | None = None
    """Plain-words report lines from a finished stage's record and the whole report."""
    lm: str | None = None
    """'module:function' that runs the stage for `task: causal-lm` (compresskit.lm)."""

    @property
    def module(self) -> str:
        return f"compresskit.stages.{self.name}"

    def run(self, cfg: Any, ctx: Any) -> Any:
        if self.lm is not None and ctx.config.task == "causal-lm":
            module, function = self.lm.split(":")
            return getattr(importlib.import_module(module), function)(cfg, ctx)
        return importlib.import_module(self.module).run(cfg, ctx)


STAGES: Registry[Stage] = Registry("stage")
for _stage in (
    Stage("train", TrainConfig, "pipelines/digits.yaml"),
    Stage("distill", DistillConfig, "pipelines/distill/features.yaml", distill_findings,
          lm="compresskit.lm.distill:run"),
    Stage("prune", PruneConfig, "pipelines/resnet.yaml", shrink_findings),
    Stage("lowrank", LowRankConfig, "pipelines/digits.yaml", shrink_findings),
    Stage("qat", QatConfig, "pipelines/digits.yaml"),
    Stage("export", ExportConfig, "pipelines/digits.yaml", lm="compresskit.lm.stages:export_run"),
    Stage("ptq", PtqConfig, "pipelines/resnet.yaml", lm="compresskit.lm.stages:ptq_run"),
    Stage("benchmark", BenchmarkConfig, "pipelines/minilm.yaml", lm="compresskit.lm.bench:run"),
    Stage("generate", GenerateConfig, "pipelines/smollm.yaml"),
):
    STAGES.register(_stage.name)(_stage)

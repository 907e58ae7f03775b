"""`generate`: the teacher writes completions for sequence-level distillation (compresskit.lm)."""

from __future__ import annotations

from compresskit.config import GenerateConfig
from compresskit.engine.context import StageContext, StageResult
from compresskit.lm import generate


def run(cfg: GenerateConfig, ctx: StageContext) -> StageResult:
    return generate.run(cfg, ctx)

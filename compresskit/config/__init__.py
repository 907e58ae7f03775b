"""THE pipeline schema. Every key a pipeline file may hold, its default and its meaning, is in
this package: `base` (data, input, models, what stages share), `distill` (loss terms, teachers,
modes), `stages` (every other stage type), `pipeline` (the file as a whole and the ordering
rules). Stage configs also carry the ordering rules the loader checks before any heavy work
(`changes_model`, `needs_before`): a newcomer finds any behaviour from its YAML key here.
"""

from __future__ import annotations

from compresskit.config.base import (
    NAME_PATTERN,
    DataConfig,
    FromTeacher,
    InputConfig,
    ModelConfig,
    ModelRole,
    OptimOptions,
    OutputConfig,
    StageBase,
    Strict,
    TargetConfig,
    TeacherCacheOptions,
    TrainingOptions,
)
from compresskit.config.distill import (
    AttentionTerm,
    CosineTerm,
    DistillConfig,
    FeatureTerm,
    KLTerm,
    LossTerm,
    TeacherEntry,
)
from compresskit.config.pipeline import PipelineConfig, order_problems
from compresskit.config.stages import (
    STAGE_CONFIGS,
    BenchmarkConfig,
    CompressOptions,
    ExportConfig,
    GenerateConfig,
    Int8Options,
    LowRankConfig,
    PruneConfig,
    PtqConfig,
    QatConfig,
    StageConfig,
    StartFrom,
    TrainConfig,
)

__all__ = [
    "NAME_PATTERN", "STAGE_CONFIGS", "AttentionTerm", "BenchmarkConfig", "CompressOptions",
    "CosineTerm", "DataConfig", "DistillConfig", "ExportConfig", "FeatureTerm", "FromTeacher",
    "GenerateConfig", "InputConfig", "OutputConfig",
    "Int8Options", "KLTerm", "LossTerm", "LowRankConfig", "ModelConfig", "ModelRole",
    "OptimOptions", "PipelineConfig", "PruneConfig", "PtqConfig", "QatConfig", "StageBase",
    "StageConfig", "StartFrom", "Strict", "TargetConfig", "TeacherCacheOptions",
    "TeacherEntry", "TrainConfig", "TrainingOptions", "order_problems",
]

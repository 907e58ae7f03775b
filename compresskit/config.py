"""THE pipeline schema. Every key a pipeline file may hold, its default and its meaning, is here.

Stage configs also carry the ordering rules the loader checks before any heavy work
(`changes_model`, `needs_before`): a newcomer finds any behaviour from its YAML key in this file.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

ModelRole = Literal["teacher", "student"]


class Strict(BaseModel):
    """Unknown keys are errors, never silently ignored values."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataConfig(Strict):
    """Where the training and evaluation data come from."""

    source: str = Field(
        "digits",
        description=(
            "A built-in data source (see `compresskit ls`), or a factory given as "
            "'path/to/file.py:callable' or 'package.module:callable'. The factory is called with "
            "`kwargs` and returns a mapping with 'train' and 'val' (and optionally 'test') "
            "entries, each a torch Dataset of (input, label) pairs. Evaluation uses 'test' when "
            "present, else 'val'."
        ),
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the data source."
    )
    batch_size: int = Field(64, ge=1, description="Training batch size.")
    eval_batch_size: int = Field(256, ge=1, description="Batch size for evaluation passes.")


class InputConfig(Strict):
    """The model's input, as one sample without the batch dimension."""

    shape: list[Annotated[int, Field(ge=1)]] = Field(
        ..., min_length=1, description="Shape of one sample, without the batch dimension."
    )
    dtype: Literal["float32", "float16", "int64", "int32"] = Field(
        "float32", description="Element type of the input tensor."
    )


class ModelConfig(Strict):
    """A model: a callable returning a torch.nn.Module, and optionally its weights."""

    source: str = Field(
        ...,
        description=(
            "A callable returning a torch.nn.Module: 'path/to/file.py:callable' (relative to the "
            "pipeline file's folder, then the working directory) or 'package.module:callable'."
        ),
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the callable."
    )
    checkpoint: str | None = Field(
        None,
        description=(
            "Optional state_dict file (.pt/.pth, loaded with torch.load(weights_only=True)) "
            "loaded into the model before the first stage."
        ),
    )


class StageBase(Strict):
    """Fields and ordering rules shared by every stage."""

    changes_model: ClassVar[bool] = False
    """A stage that changes weights or structure; none may follow `export`."""
    needs_before: ClassVar[tuple[str, ...]] = ()
    """Stage types of which at least one must come earlier in the pipeline."""
    uses_models: ClassVar[tuple[str, ...]] = ()
    """Top-level model sections (teacher/student) this stage needs."""
    reads_artifacts: ClassVar[bool] = False
    """Whether the stage reads files written by earlier stages (so it reruns when they change)."""

    @property
    def models_needed(self) -> tuple[str, ...]:
        return self.uses_models


class TrainingOptions(StageBase):
    """Optimiser and schedule options shared by the stages that train."""

    changes_model: ClassVar[bool] = True

    epochs: int = Field(10, ge=1, description="Passes over the training split.")
    lr: float = Field(3e-3, gt=0, le=10, description="Peak learning rate.")
    optimizer: Literal["adamw", "adam", "sgd"] = Field(
        "adamw", description="Optimiser; sgd uses Nesterov momentum 0.9."
    )
    weight_decay: float = Field(1e-4, ge=0, description="Decoupled weight decay (L2 for sgd).")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="Learning-rate schedule over all steps of the stage."
    )
    checkpoint_every: int = Field(
        1, ge=0,
        description=(
            "Save a resumable training checkpoint every N epochs (0: only at the end), so an "
            "interrupted run resumes inside the stage."
        ),
    )


class TrainConfig(TrainingOptions):
    """Cross-entropy training of the teacher or the student."""

    type: Literal["train"]
    model: ModelRole = Field("student", description="Which model to train.")

    @property
    def models_needed(self) -> tuple[str, ...]:
        return (self.model,)


class DistillConfig(TrainingOptions):
    """Hinton knowledge distillation of the student from the teacher.

    loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student)
    """

    type: Literal["distill"]
    uses_models: ClassVar[tuple[str, ...]] = ("teacher", "student")

    epochs: int = Field(20, ge=1, description="Passes over the training split.")
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature T.")
    alpha: float = Field(
        0.9, ge=0, le=1, description="Weight of the distillation term; 1 - alpha weighs CE."
    )
    baseline: bool = Field(
        False,
        description=(
            "Also train a copy of the student from the same initialisation with cross-entropy "
            "alone (same epochs and optimiser) and report its accuracy, so the teacher's "
            "contribution is measured, not assumed."
        ),
    )


class ExportConfig(StageBase):
    """FP32 ONNX export with a dynamic batch axis, checked by onnx.checker and for parity."""

    type: Literal["export"]

    models: list[ModelRole] = Field(
        default_factory=lambda: list[ModelRole](("teacher", "student")),
        min_length=1,
        description="Models to export; each becomes artifacts/<model>.fp32.onnx.",
    )
    opset: int = Field(17, ge=13, le=21, description="ONNX opset version.")
    parity_samples: int = Field(
        512, ge=1, description="Evaluation samples run through torch and onnxruntime for parity."
    )
    atol: float = Field(1e-4, gt=0, description="Absolute tolerance of the parity check.")
    rtol: float = Field(1e-3, ge=0, description="Relative tolerance of the parity check.")

    @property
    def models_needed(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.models))


class BenchmarkConfig(StageBase):
    """Latency, throughput, peak memory and accuracy of every exported artifact, via onnxruntime."""

    type: Literal["benchmark"]
    needs_before: ClassVar[tuple[str, ...]] = ("export",)
    reads_artifacts: ClassVar[bool] = True

    targets: list[str] = Field(
        default_factory=lambda: ["cpu"],
        min_length=1,
        description="Target profiles to measure on (see `compresskit ls`).",
    )
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1], min_length=1, description="Batch sizes to time."
    )
    runs: int = Field(
        200, ge=10, description="Timed runs per artifact and batch size (after warm-up)."
    )
    warmup: int = Field(20, ge=0, description="Untimed runs before timing.")
    threads: int | None = Field(
        None, ge=1, description="Intra-op threads; null uses the target's own setting."
    )
    memory: bool = Field(
        True,
        description="Measure peak RSS of each artifact in a fresh child process.",
    )


StageConfig = Annotated[
    Union[TrainConfig, DistillConfig, ExportConfig, BenchmarkConfig],  # noqa: UP007
    Field(discriminator="type"),
]

STAGE_CONFIGS: dict[str, type[StageBase]] = {
    "train": TrainConfig,
    "distill": DistillConfig,
    "export": ExportConfig,
    "benchmark": BenchmarkConfig,
}


class PipelineConfig(Strict):
    """A compresskit pipeline: data, models, and the stages that turn a teacher into a student."""

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=100,
        description="Run name; the run folder defaults to runs/<name>.",
    )
    seed: int = Field(0, ge=0, description="Seed for initialisation, shuffling and sampling.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where training runs; auto picks cuda when a GPU is present."
    )
    data: DataConfig = Field(default_factory=lambda: DataConfig(),
                             description="Data source and batching.")
    input: InputConfig = Field(..., description="The model input, one sample.")
    teacher: ModelConfig | None = Field(None, description="The large, accurate model.")
    student: ModelConfig | None = Field(None, description="The small model to ship.")
    stages: list[StageConfig] = Field(..., min_length=1, description="Stages, run in order.")


def order_problems(cfg: PipelineConfig) -> list[tuple[tuple[Any, ...], str]]:
    """Stage-order and cross-section rules, as (path, message) pairs; empty when all hold."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    seen: list[str] = []
    exported = False
    for i, stage in enumerate(cfg.stages):
        path = ("stages", i, "type")
        if exported and stage.changes_model:
            problems.append(
                (path, f"'{stage.type}' changes the model, so it cannot come after 'export'; "
                 "move it before the export stage")
            )
        if stage.needs_before and not any(t in seen for t in stage.needs_before):
            need = " or ".join(f"'{t}'" for t in stage.needs_before)
            problems.append((path, f"'{stage.type}' needs a {need} stage before it"))
        for role in stage.models_needed:
            if getattr(cfg, role) is None:
                problems.append(
                    (path, f"'{stage.type}' uses the {role}, but the pipeline has no "
                     f"'{role}:' section; add one with a 'source:'")
                )
        exported = exported or stage.type == "export"
        seen.append(stage.type)
    return problems

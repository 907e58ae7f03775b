"""The whole pipeline file, and the cross-stage rules checked before any heavy work."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag

from compresskit.config.base import (
    NAME_PATTERN,
    DataConfig,
    InputConfig,
    ModelConfig,
    StageBase,
    Strict,
    TargetConfig,
)
from compresskit.config.search import SearchConfig
from compresskit.config.stages import StageConfig
from compresskit.registry import did_you_mean

LM_STAGES = ("generate", "distill", "export", "ptq", "benchmark")
"""The stages a causal-lm pipeline runs: generate, and those whose descriptor in
compresskit.stages names an `lm` runner (compresskit.lm)."""


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
    input: Annotated[
        Union[Annotated[InputConfig, Tag("input")],  # noqa: UP007
              Annotated[list[InputConfig], Tag("inputs")]],
        Discriminator(lambda v: "inputs" if isinstance(v, list) else "input"),
    ] = Field(
        ...,
        description=(
            "The model input, one sample: {shape, dtype} for a model with one input, or a list "
            "of named inputs ({name, shape, dtype, dynamic}) passed to forward by keyword, in "
            "the order the data yields them."
        ),
    )
    task: Literal["classify", "embed", "causal-lm"] = Field(
        "classify",
        description=(
            "What the model's output is. classify: logits, scored by accuracy on labels. "
            "embed: an embedding per sample, scored by mean cosine similarity to the teacher's "
            "embeddings and top-1 nearest-neighbour agreement with the teacher (no labels). "
            "causal-lm: next-token logits of a decoder (a transformers causal LM), scored by "
            "perplexity and next-token agreement with the teacher; stages generate, distill, "
            "export, ptq and benchmark."
        ),
    )
    teacher: ModelConfig | None = Field(None, description="The large, accurate model.")
    student: ModelConfig | None = Field(None, description="The small model to ship.")
    models: dict[Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)], ModelConfig] = Field(
        default_factory=dict,
        description=(
            "More models by name (letters, digits, '_'), for stages that take a model name: "
            "extra teachers of a multi-teacher distill, peers of mutual distillation. "
            "'teacher' and 'student' are the sections above."
        ),
    )

    @property
    def inputs(self) -> list[InputConfig]:
        """The inputs as a list, also when `input:` gives one."""
        return list(self.input) if isinstance(self.input, list) else [self.input]

    def model_sections(self) -> dict[str, tuple[tuple[str, ...], ModelConfig]]:
        """Every configured model by name, with the key path of its section."""
        out: dict[str, tuple[tuple[str, ...], ModelConfig]] = {}
        for role in ("teacher", "student"):
            section = getattr(self, role)
            if section is not None:
                out[role] = ((role,), section)
        for name, section in self.models.items():
            out.setdefault(name, (("models", name), section))
        return out
    targets: dict[Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)], TargetConfig] = \
        Field(default_factory=dict,
              description="Targets of your own, by name, usable in benchmark stages beside the "
                          "built-in ones (see `compresskit ls`).")
    stages: list[StageConfig] = Field(..., min_length=1, description="Stages, run in order.")
    search: SearchConfig | None = Field(
        None, description="What `compresskit search` explores, and what it optimises.")


def _key_naming(stage: StageBase, role: str) -> tuple[Any, ...]:
    """The stage key that names model `role`, for locating a problem with it."""
    for key in type(stage).model_fields:
        value = getattr(stage, key)
        if value == role:
            return (key,)
        if isinstance(value, list):
            for j, item in enumerate(value):
                if item == role or getattr(item, "model", None) == role:
                    return (key, j)
    return ("type",)


def order_problems(cfg: PipelineConfig) -> list[tuple[tuple[Any, ...], str]]:
    """Stage-order and cross-section rules, as (path, message) pairs; empty when all hold."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    seen: list[str] = []
    exported = quantized = False
    available = set(cfg.model_sections())
    names = [i.name for i in cfg.inputs]
    for j, inp in enumerate(cfg.inputs):
        at: tuple[Any, ...] = ("input", j) if isinstance(cfg.input, list) else ("input",)
        if names.count(inp.name) > 1:
            problems.append(((*at, "name"), f"input name '{inp.name}' is given twice"))
        for axis in inp.dynamic:
            if axis >= len(inp.shape):
                problems.append(((*at, "dynamic"), (
                    f"axis {axis} is not an axis of one sample of shape {inp.shape} (0 is "
                    "the first axis after the batch)")))
    if cfg.task == "embed" and cfg.teacher is None:
        problems.append((("task",), "task: embed scores a model by its agreement with the "
                         "teacher's embeddings; add a 'teacher:' section"))
    for role, (keys, section) in cfg.model_sections().items():
        if section.from_teacher is not None:
            if role != "student":
                problems.append(((*keys, "from_teacher"), "only the student can be built "
                                 "from_teacher"))
            elif cfg.teacher is None:
                problems.append(((*keys, "from_teacher"), "from_teacher needs a 'teacher:' "
                                 "section to copy"))
    for name in cfg.models:
        if name in ("teacher", "student"):
            problems.append((("models", name), f"'{name}' is a top-level section; define it "
                             f"as '{name}:' rather than under 'models:'"))
    for i, stage in enumerate(cfg.stages):
        path = ("stages", i, "type")
        lm = cfg.task == "causal-lm"
        if lm != (stage.type == "generate") and stage.type not in LM_STAGES[1:]:
            problems.append((path, (
                f"task causal-lm runs the stages {', '.join(LM_STAGES)}; '{stage.type}' is "
                "not available for a language model yet") if lm else (
                "'generate' makes text for task causal-lm; this pipeline's task is "
                f"{cfg.task}")))
            continue
        if exported and stage.changes_model:
            problems.append(
                (path, f"'{stage.type}' changes the model, so it cannot come after 'export'; "
                 "move it before the export stage")
            )
        elif quantized and stage.changes_model:
            problems.append(
                (path, f"'{stage.type}' changes the model, so it cannot come after a "
                 "quantization stage, which quantizes the model as it stands; move it before")
            )
        if stage.needs_before and not any(t in seen for t in stage.needs_before):
            need = " or ".join(f"'{t}'" for t in stage.needs_before)
            problems.append((path, f"'{stage.type}' needs a {need} stage before it"))
        for role in stage.models_needed:
            if role not in available:
                where = f"'{role}:' section" if role in ("teacher", "student") else \
                    f"model '{role}' under 'models:'"
                problems.append(
                    (("stages", i, *_key_naming(stage, role)),
                     f"'{stage.type}' uses the {role}{did_you_mean(role, available)}, but the "
                     "pipeline has no "
                     f"{where}; add one with a 'source:'")
                )
        problems += [(("stages", i, *key), msg) for key, msg in stage.problems(cfg)]
        available.update(stage.produces)
        exported = exported or stage.type == "export"
        quantized = quantized or stage.quantizes
        seen.append(stage.type)
    return problems

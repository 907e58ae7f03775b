"""Building blocks of the schema: strict models, the data, input and model sections, what
every stage shares, the optimiser options, the teacher-cache options and user targets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ModelRole = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
"""A model by name: 'teacher', 'student', or one defined under the pipeline's `models:`."""


class Strict(BaseModel):
    """Unknown keys are errors, never silently ignored values."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    def chosen(self) -> set[str]:
        """Fields given with a value other than their default: the user's choices. A run's
        resolved.yaml lists every default, and running it again must not read those as
        options given where they do not apply."""
        fields = type(self).model_fields
        return {k for k in self.model_fields_set
                if k in fields and getattr(self, k) != fields[k].get_default(
                    call_default_factory=True)}


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
    group_by_length: bool = Field(
        False,
        description=(
            "Token inputs (an attention_mask with a dynamic sequence axis): train on batches of "
            "similar length and cut the padding no sample in the batch uses; the outputs do "
            "not change, the work falls with the padding. Teacher caches are built the same way."
        ),
    )
    eval_batch_size: int = Field(256, ge=1, description="Batch size for evaluation passes.")


class InputConfig(Strict):
    """One model input, as one sample without the batch dimension."""

    name: str = Field(
        "input", pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$", max_length=64,
        description=(
            "The keyword the model's forward takes this input by (e.g. input_ids), and the "
            "input's name in the exported ONNX file."
        ),
    )
    shape: list[Annotated[int, Field(ge=1)]] = Field(
        ..., min_length=1,
        description=(
            "Shape of one sample, without the batch dimension; a dynamic axis gives the size "
            "the data is padded or cut to."
        ),
    )
    dtype: Literal["float32", "float16", "int64", "int32"] = Field(
        "float32", description="Element type of the input tensor."
    )
    dynamic: dict[Annotated[int, Field(ge=0)], Annotated[str, Field(pattern=NAME_PATTERN)]] = \
        Field(
            default_factory=dict,
            description=(
                "Axes of one sample (0 = the first after the batch) whose size may change at "
                "run time, by name: {0: sequence} exports a dynamic sequence length. Inputs "
                "that share a name share the axis."
            ),
        )


class OutputConfig(Strict):
    """Which output of the model the stages use, and how it is pooled."""

    key: str | int | None = Field(
        None,
        description=(
            "For a model returning a dict, tuple or Hugging Face ModelOutput: the key (or "
            "index) of the tensor the stages use, e.g. logits or last_hidden_state. Null: the "
            "model returns one tensor."
        ),
    )
    pool: Literal["mean", "cls"] | None = Field(
        None,
        description=(
            "Pool a [batch, tokens, dim] output into one embedding per sample: 'mean' over the "
            "tokens the mask input marks (sentence-transformers' mean pooling), 'cls' the first "
            "token."
        ),
    )
    mask: str = Field(
        "attention_mask",
        description="The input whose 1s mark real tokens, for pool: mean.",
    )
    normalize: bool = Field(False, description="Scale each embedding to unit length.")


class FromTeacher(Strict):
    """A student made from a copy of the teacher (DistilBERT's recipe)."""

    layers: list[Annotated[int, Field(ge=0)]] = Field(
        ..., min_length=1,
        description=(
            "Indices of the teacher's transformer layers to keep, in order; the student starts "
            "with their weights and everything else the teacher has (embeddings, pooler)."
        ),
    )
    path: str | None = Field(
        None,
        description=(
            "Module name of the layer list (e.g. encoder.layer); null: the longest "
            "torch.nn.ModuleList of identical blocks."
        ),
    )


class ModelConfig(Strict):
    """A model: a callable returning a torch.nn.Module, and optionally its weights."""

    source: str | None = Field(
        None,
        description=(
            "A callable returning a torch.nn.Module: 'path/to/file.py:callable' (relative to the "
            "pipeline file's folder, then the working directory), 'package.module:callable', or "
            "'hf:<folder>' for a Hugging Face transformers model saved in a local folder (or "
            "'hf:<package>' for an installed package that holds one; needs compresskit[hf])."
        ),
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the callable."
    )
    checkpoint: str | None = Field(
        None,
        description=(
            "Optional state_dict file (.pt/.pth, loaded with torch.load(weights_only=True), or "
            ".safetensors) loaded into the model before the first stage."
        ),
    )
    output: OutputConfig = Field(
        default_factory=lambda: OutputConfig(),
        description="Which output the stages use, for models with several.",
    )
    from_teacher: FromTeacher | None = Field(
        None,
        description="Build this model from the teacher instead of a source (students only).",
    )

    @model_validator(mode="after")
    def _one_origin(self) -> ModelConfig:
        if self.source is None and self.from_teacher is None:
            raise PydanticCustomError(
                "origin", "'source' is missing: give the callable that builds the model "
                "(file.py:callable, package.module:callable or hf:<folder>), or "
                "'from_teacher' for a student")
        if self.source is not None and self.from_teacher is not None:
            raise PydanticCustomError(
                "origin", "give 'source' or 'from_teacher', not both")
        if self.from_teacher is not None and (self.checkpoint or self.kwargs):
            raise PydanticCustomError(
                "origin", "a model built from_teacher takes the teacher's weights; remove "
                "'checkpoint' and 'kwargs'")
        return self


class StageBase(Strict):
    """Fields and ordering rules shared by every stage."""

    if TYPE_CHECKING:
        type: str  # each stage's Literal YAML type

    changes_model: ClassVar[bool] = False
    """A stage that changes weights or structure; none may follow `export`."""
    needs_before: ClassVar[tuple[str, ...]] = ()
    """Stage types of which at least one must come earlier in the pipeline."""
    uses_models: ClassVar[tuple[str, ...]] = ()
    """Top-level model sections (teacher/student) this stage needs."""
    reads_artifacts: ClassVar[bool] = False
    """Whether the stage reads files written by earlier stages (so it reruns when they change)."""
    quantizes: ClassVar[bool] = False
    """A stage that quantizes the model as it stands; nothing may change the model after it."""
    time_budget: float | None = Field(
        None, gt=0,
        description="Seconds the stage should take at most. A stage over it still finishes "
        "(stopping mid-training would throw the work away); the terminal and the report say "
        "it ran over. prune's tracing has its own hard limit, trace_seconds.")

    trains: ClassVar[bool] = False
    """A stage that trains without changing the pipeline's models (qat trains a quantized
    copy): under torchrun it runs on every rank, like the stages that change the model."""

    def problems(self, pipeline: Any) -> list[tuple[tuple[Any, ...], str]]:
        """What the config alone shows is wrong with this stage in `pipeline`, as (key path
        within the stage, message); checked by `validate`, before anything runs."""
        return []

    @property
    def every_rank(self) -> bool:
        """Under torchrun: runs on every rank (training under DistributedDataParallel), or on
        rank 0 alone while the others wait (export, ptq, benchmark)."""
        return self.changes_model or self.trains

    @property
    def models_needed(self) -> tuple[str, ...]:
        return self.uses_models

    @property
    def produces(self) -> tuple[str, ...]:
        """Model roles this stage creates, so later stages may use them without a section."""
        return ()


class OptimOptions(StageBase):
    """Optimiser and schedule options shared by the stages that train or fine-tune."""

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
    freeze: list[str] = Field(
        default_factory=list,
        description=(
            "Parameters left as they are while this stage trains: glob patterns over the "
            "names of model.named_parameters() (e.g. 'model.embeddings.*', a token model's "
            "embedding tables). A pattern that matches no parameter is an error."
        ),
    )
    bn_recalibration: int = Field(
        16, ge=0,
        description=(
            "After training, re-estimate BatchNorm running statistics for the final weights "
            "from this many training batches (a plain average, dropout off); 0 keeps the "
            "moving averages training left. A small BatchNorm momentum (torchvision's "
            "MobileNetV3: 0.01) or a few recovery steps after pruning leave them far from "
            "what the layers now compute."
        ),
    )

    def options(self, epochs: int) -> TrainingOptions:
        """These options for one run of the training loop of `epochs` epochs."""
        fields = OptimOptions.model_fields
        return TrainingOptions(epochs=max(1, epochs),
                               **{k: getattr(self, k) for k in fields})


class TrainingOptions(OptimOptions):
    """What the training loop runs with: the optimiser options and a number of epochs."""

    changes_model: ClassVar[bool] = True

    epochs: int = Field(10, ge=1, description="Passes over the training split.")



class TeacherCacheOptions(StageBase):
    """Where the teacher's outputs on the training split come from."""

    cache_teacher: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "Compute the teacher's outputs (logits and requested features) once per training "
            "split into memory-mapped files under <run>/cache, keyed by the teacher's weights, "
            "the data and the output, and reuse them in every epoch, stage and rerun. 'auto': "
            "on unless the training split is randomly augmented (the same index gives "
            "different inputs), when cached outputs would not match what the student sees."
        ),
    )
    cache_precision: Literal["float32", "float16"] = Field(
        "float32", description="Precision the cached teacher outputs are stored at."
    )


class TargetConfig(Strict):
    """A target of your own: how onnxruntime should run the model on your device."""

    description: str = Field("a target defined in the pipeline file",
                             description="One line shown in reports.")
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"], min_length=1,
        description="onnxruntime execution providers, in order of preference.",
    )
    provider_options: list[dict[str, str]] = Field(
        default_factory=list, description="Options per provider, in the same order."
    )
    threads: int | None = Field(None, ge=1, description="Intra-op threads (null: all cores).")
    sequential: bool = Field(True, description="Sequential executor (false: parallel).")
    arena: bool = Field(True, description="onnxruntime's CPU memory arena.")
    optimization: Literal["all", "extended", "basic", "disable"] = Field(
        "all", description="Graph optimisation level."
    )
    pin_cores: int | None = Field(
        None, ge=1, description="Pin the measuring process to this many cores."
    )
    ort_format: bool = Field(False, description="Run the model converted to ORT format.")

    # On another machine: over ssh, or through a command that runs a program there.
    ssh: str | None = Field(
        None, min_length=1,
        description="Measure on this machine over ssh: user@host, or a Host alias from "
        "~/.ssh/config (keys and options come from there; never a password).")
    port: int | None = Field(None, ge=1, le=65535, description="ssh port (null: ssh's own).")
    ssh_options: list[str] = Field(
        default_factory=list,
        description="More arguments for ssh, e.g. [-i, ~/.ssh/pi_key] or [-F, my_config].")
    command: str | None = Field(
        None, min_length=1,
        description="Measure through this command, which runs a program on the device, passing "
        "on its arguments and stdin: 'docker exec -i box', 'env' (here, for a test).")
    python: str = Field("python3", min_length=1,
                        description="The Python on the device (with numpy and onnxruntime).")
    workdir: str = Field("~/.cache/compresskit-device", min_length=1,
                         description="Folder on the device for the runner and the models.")
    timeout_s: float = Field(600.0, gt=0, description="Longest one measurement may take.")

    @model_validator(mode="after")
    def _one_way_to_the_device(self) -> TargetConfig:
        if self.ssh is not None and self.command is not None:
            raise PydanticCustomError(
                "remote", "a target runs over 'ssh' or through 'command', not both; keep one")
        if self.ssh is None and (self.port is not None or self.ssh_options):
            raise PydanticCustomError(
                "remote", "'port' and 'ssh_options' need 'ssh: user@host'")
        return self

    @property
    def remote(self) -> bool:
        return self.ssh is not None or self.command is not None


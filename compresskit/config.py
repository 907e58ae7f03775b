"""THE pipeline schema. Every key a pipeline file may hold, its default and its meaning, is here.

Stage configs also carry the ordering rules the loader checks before any heavy work
(`changes_model`, `needs_before`): a newcomer finds any behaviour from its YAML key in this file.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ModelRole = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
"""A model by name: 'teacher', 'student', or one defined under the pipeline's `models:`."""


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
    quantizes: ClassVar[bool] = False
    """A stage that quantizes the model as it stands; nothing may change the model after it."""

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

    def options(self, epochs: int) -> TrainingOptions:
        """These options for one run of the training loop of `epochs` epochs."""
        fields = OptimOptions.model_fields
        return TrainingOptions(epochs=max(1, epochs),
                               **{k: getattr(self, k) for k in fields})


class TrainingOptions(OptimOptions):
    """What the training loop runs with: the optimiser options and a number of epochs."""

    changes_model: ClassVar[bool] = True

    epochs: int = Field(10, ge=1, description="Passes over the training split.")


class TrainConfig(TrainingOptions):
    """Cross-entropy training of the teacher or the student."""

    type: Literal["train"]
    model: ModelRole = Field("student", description="Which model to train.")

    @property
    def models_needed(self) -> tuple[str, ...]:
        return (self.model,)


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


class TeacherEntry(Strict):
    """One teacher of a distill stage."""

    model: ModelRole = Field("teacher", description="The teacher model, by name.")
    weight: float = Field(1.0, gt=0, description="Its share of the combined soft targets.")
    temperature: float | None = Field(
        None, gt=0, le=100,
        description="This teacher's softmax temperature; null uses the stage's.",
    )


class KLTerm(Strict):
    """Hinton et al. 2015: T^2 * KL(softmax(teacher/T) || softmax(student/T))."""

    type: Literal["kl"]
    weight: float = Field(1.0, ge=0, description="Weight of this term.")


class FeatureTerm(Strict):
    """FitNets (Romero et al. 2015): match the output of a student module to a teacher module's.
    When channel counts differ, a learned 1x1 convolution (Linear for 2-D/3-D outputs) maps
    the student's to the teacher's; it trains with the student and is not exported."""

    type: Literal["features"]
    student: str = Field(..., description="Student module name (model.named_modules()).")
    teacher: str = Field(..., description="Teacher module name.")
    loss: Literal["mse", "cosine", "l1"] = Field("mse", description="Distance between the two.")
    weight: float = Field(1.0, ge=0, description="Weight of this term.")


class AttentionTerm(Strict):
    """Attention transfer (Zagoruyko and Komodakis 2017): match the L2-normalised spatial maps
    mean_c(F^2) of a student and a teacher module; spatial sizes are pooled to the smaller."""

    type: Literal["attention"]
    student: str = Field(..., description="Student module name (a 4-D feature map).")
    teacher: str = Field(..., description="Teacher module name.")
    weight: float = Field(
        500.0, ge=0, description="Weight of this term (the paper's beta / 2, beta = 1000)."
    )


class CosineTerm(Strict):
    """Cosine-embedding loss (DistilBERT's third loss): 1 - cos(student, teacher) of the model
    outputs, or of the pooled outputs of named modules (4-D maps averaged over space, 3-D
    sequences over tokens). A learned Linear bridges different widths and is not exported."""

    type: Literal["cosine"]
    student: str | None = Field(None, description="Student module name; null: the output.")
    teacher: str | None = Field(None, description="Teacher module name; null: the output.")
    weight: float = Field(1.0, ge=0, description="Weight of this term.")


LossTerm = Annotated[
    Union[KLTerm, FeatureTerm, AttentionTerm, CosineTerm],  # noqa: UP007
    Field(discriminator="type"),
]


class DistillConfig(TrainingOptions, TeacherCacheOptions):
    """Knowledge distillation of the student.

    loss = alpha * sum(weight_i * term_i) + (1 - alpha) * CE(student, labels); without labels
    (a training split of bare inputs) only the distillation terms count. With the default single
    `kl` term this is Hinton et al. 2015. Modes: `kd` (from the pipeline's teachers), `born_again`
    (a trained copy of the student teaches a re-initialised student, for `generations`), `ema`
    (a mean teacher: the exponential moving average of the student's own weights), `mutual`
    (deep mutual learning: the `peers` train together, each distilling from the others).
    """

    type: Literal["distill"]

    mode: Literal["kd", "born_again", "ema", "mutual"] = Field(
        "kd", description="Where the soft targets come from (see above)."
    )
    epochs: int = Field(20, ge=1, description="Passes over the training split.")
    teachers: list[TeacherEntry] = Field(
        default_factory=lambda: [TeacherEntry()], min_length=1,
        description=(
            "mode kd: the teachers. Their softened distributions are averaged by weight (per "
            "sample by weight x confidence with confidence_weighting); feature, attention and "
            "cosine terms use the first."
        ),
    )
    confidence_weighting: bool = Field(
        False,
        description="Weight each teacher per sample by its top-1 probability at T = 1 as well.",
    )
    losses: list[LossTerm] = Field(
        default_factory=lambda: list[LossTerm]([KLTerm(type="kl")]), min_length=1,
        description="Distillation terms, summed by weight.",
    )
    temperature: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] = Field(
        4.0,
        description=(
            "Softmax temperature T (> 0). 'auto': train briefly with each of auto_temperatures "
            "from the same start and keep the one with the best validation accuracy."
        ),
    )
    auto_temperatures: list[Annotated[float, Field(gt=0, le=100)]] = Field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0], min_length=2,
        description="Temperatures tried by temperature: auto.",
    )
    auto_epochs: int | None = Field(
        None, ge=1, description="Epochs of each trial of temperature: auto (default epochs / 5)."
    )
    alpha: float = Field(
        0.9, ge=0, le=1,
        description="Weight of the distillation terms; 1 - alpha weighs cross-entropy.",
    )
    baseline: bool = Field(
        False,
        description=(
            "Also train a copy of the student from the same initialisation with cross-entropy "
            "alone (same epochs and optimiser) and report its accuracy, so the teacher's "
            "contribution is measured, not assumed."
        ),
    )
    generations: int = Field(2, ge=1, le=20, description="mode born_again: generations.")
    ema_decay: float = Field(
        0.99, gt=0, lt=1, description="mode ema: decay of the teacher's moving average."
    )
    noise: float = Field(
        0.0, ge=0,
        description="mode ema: std of Gaussian noise added to the student's and the teacher's "
                    "inputs, each its own draw (the mean teacher's two views).",
    )
    peers: list[ModelRole] = Field(
        default_factory=lambda: ["student"],
        description="mode mutual: the models trained together, at least two; all are updated.",
    )

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature(cls, v: Any) -> Any:
        # One clear message instead of one per member of the float | 'auto' union.
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PydanticCustomError("temperature", "input should be a number or 'auto'")
        if v <= 0:
            raise PydanticCustomError("temperature", "input should be greater than 0")
        if v > 100:
            raise PydanticCustomError("temperature", "input should be less than or equal to 100")
        return float(v)

    @property
    def models_needed(self) -> tuple[str, ...]:
        if self.mode == "mutual":
            return tuple(dict.fromkeys(self.peers))
        if self.mode == "kd":
            return tuple(dict.fromkeys([*(t.model for t in self.teachers), "student"]))
        # born_again and ema: the student is its own teacher
        return ("student",)

    @property
    def uses_kl(self) -> bool:
        return any(t.type == "kl" for t in self.losses)

    def mode_problems(self) -> list[tuple[tuple[Any, ...], str]]:
        """Keys that contradict the mode, as (path relative to the stage, message)."""
        out: list[tuple[tuple[Any, ...], str]] = []
        given = self.model_fields_set
        only = {"teachers": ("kd",), "confidence_weighting": ("kd",),
                "generations": ("born_again",), "ema_decay": ("ema",), "noise": ("ema",),
                "peers": ("mutual",), "cache_teacher": ("kd", "born_again"),
                "cache_precision": ("kd", "born_again")}
        for key, modes in only.items():
            if key in given and self.mode not in modes:
                out.append(((key,), f"'{key}' applies to mode: {' or '.join(modes)}, not "
                            f"mode: {self.mode}"))
        if self.mode == "mutual":
            if len(set(self.peers)) < 2:
                out.append((("peers",), "mode mutual needs at least two different peers, e.g. "
                            "peers: [student, student_b]"))
            if any(t.type != "kl" for t in self.losses):
                out.append((("losses",), "mode mutual distils outputs only: use the 'kl' term"))
        if self.temperature == "auto" and self.mode != "kd":
            out.append((("temperature",), "temperature: auto is available with mode: kd"))
        names = [t.model for t in self.teachers]
        if len(set(names)) != len(names):
            out.append((("teachers",), "each teacher may appear once"))
        if "student" in names:
            out.append((("teachers",), "the student cannot teach itself in mode kd; use mode "
                        "born_again or ema for self-distillation"))
        return out


StartFrom = Literal["student", "teacher"]


class CompressOptions(OptimOptions, TeacherCacheOptions):
    """Options shared by the stages that shrink a model's structure (prune, lowrank): which
    model, which layers stay whole, recovery by distillation, and how the change is measured."""

    changes_model: ClassVar[bool] = True

    start_from: StartFrom = Field(
        "student",
        description=(
            "Model to compress; the result is always the student. 'teacher' makes the student "
            "a compressed copy of the teacher (the usual way to shrink a trained model), and the "
            "pipeline then needs no 'student:' section."
        ),
    )
    ignore: list[str] = Field(
        default_factory=list,
        description=(
            "Module names kept whole, as glob patterns (e.g. 'features.0.*', 'classifier'); "
            "names are those of model.named_modules()."
        ),
    )
    recover: int = Field(
        2, ge=0,
        description=(
            "Epochs of distillation from the teacher after the change (after each step when "
            "pruning iteratively); cross-entropy when the pipeline has no teacher; 0 skips it."
        ),
    )
    lr: float = Field(1e-3, gt=0, le=10, description="Peak learning rate of recovery.")
    temperature: float = Field(4.0, gt=0, le=100, description="KD softmax temperature T.")
    alpha: float = Field(
        0.9, ge=0, le=1, description="Weight of the KD term in recovery; 1 - alpha weighs CE."
    )
    latency_runs: int = Field(
        100, ge=10,
        description=(
            "Interleaved onnxruntime runs (batch 1, one thread) timing the model before and "
            "after the change."
        ),
    )

    @property
    def models_needed(self) -> tuple[str, ...]:
        teacher: tuple[str, ...] = ("teacher",) if self.recover or self.start_from == "teacher" \
            else ()
        return tuple(dict.fromkeys((self.start_from, *teacher)))

    @property
    def produces(self) -> tuple[str, ...]:
        return ("student",)


class PruneConfig(CompressOptions):
    """Structured pruning with torch-pruning's dependency graph: whole channels, filters, neurons
    and attention heads are removed, so residual adds, concatenations, depthwise convolutions and
    normalisation layers stay consistent. The first and last layers are kept whole."""

    type: Literal["prune"]

    ratio: float | None = Field(
        None, gt=0, lt=1,
        description="Fraction of the channels of each prunable group removed (default 0.5 "
                    "unless target_macs or target_params is set).",
    )
    target_macs: float | None = Field(
        None, gt=0, lt=1,
        description="Prune until the model keeps this fraction of its MACs (e.g. 0.5).",
    )
    target_params: float | None = Field(
        None, gt=0, lt=1,
        description="Prune until the model keeps this fraction of its parameters.",
    )
    importance: Literal["l1", "l2", "taylor", "lamp", "bn_scale", "fpgm"] = Field(
        "l2",
        description=(
            "How channels are ranked: weight magnitude (l1, l2), first-order Taylor (gradient x "
            "weight on training batches), LAMP, BatchNorm scale, or FPGM (geometric median)."
        ),
    )
    global_ranking: bool = Field(
        False, alias="global",
        description="Rank channels across all layers (layers lose unequal shares) instead of "
                    "per layer.",
    )
    max_layer_ratio: float = Field(
        0.9, gt=0, lt=1,
        description="With global ranking, the most any one layer may lose.",
    )
    steps: int = Field(
        1, ge=1, le=100,
        description="Iterative pruning: remove the amount in this many slices, recovering "
                    "after each.",
    )
    round_to: int | None = Field(
        None, ge=1,
        description="Keep channel counts multiples of N (8 suits most CPU kernels).",
    )
    heads: bool = Field(
        True,
        description=(
            "Remove whole attention heads (at the same ratio) in modules that have a "
            "'num_heads' attribute and q/k/v (or qkv) Linear children, and in "
            "nn.MultiheadAttention."
        ),
    )
    calibration_batches: int = Field(
        4, ge=1, description="Training batches whose gradients rank channels for 'taylor'."
    )

    model_config = ConfigDict(populate_by_name=True)

    def amount(self) -> tuple[str, float]:
        """('ratio'|'target_macs'|'target_params', value): what the user asked to remove."""
        for key in ("target_macs", "target_params"):
            if getattr(self, key) is not None:
                return key, getattr(self, key)
        return "ratio", 0.5 if self.ratio is None else self.ratio


class LowRankConfig(CompressOptions):
    """Truncated-SVD factorisation: a Linear becomes two of rank r; a k x k Conv2d becomes a k x k
    convolution with r output channels followed by a 1 x 1 convolution. Grouped and depthwise
    convolutions are left alone."""

    type: Literal["lowrank"]

    energy: float | None = Field(
        None, gt=0, le=1,
        description=(
            "Per layer, the smallest rank whose singular values hold this fraction of the "
            "squared spectrum (default 0.9 unless rank_ratio is set)."
        ),
    )
    rank_ratio: float | None = Field(
        None, gt=0, le=1, description="Rank as a fraction of min(out, in) of each layer."
    )
    min_reduction: float = Field(
        0.25, ge=0, lt=1,
        description="Factorise a layer only when that cuts its MACs by at least this fraction.",
    )
    round_to: int | None = Field(
        None, ge=1, description="Round each rank up to a multiple of N."
    )
    layers: list[Literal["linear", "conv"]] = Field(
        default_factory=lambda: list[Literal["linear", "conv"]](("linear", "conv")),
        min_length=1,
        description="Layer kinds to factorise.",
    )


class Int8Options(StageBase):
    """What every INT8 stage checks before it writes its artifact."""

    min_int8_coverage: float = Field(
        0.9, ge=0, le=1,
        description=(
            "Fail unless at least this share of the Conv/Gemm/MatMul MACs with constant weights "
            "runs in onnxruntime integer kernels after graph optimisation."
        ),
    )
    calibration_samples: int = Field(
        512, ge=1, description="Training samples that calibrate activation ranges."
    )
    reduce_range: bool = Field(
        True,
        description=(
            "7-bit weights, so uint8 x int8 products cannot saturate on x86 CPUs without VNNI "
            "(AVX2); onnxruntime's INT8 on such CPUs is otherwise wrong, not just slow."
        ),
    )
    per_channel: bool = Field(True, description="One weight scale per output channel.")


class QatConfig(Int8Options, OptimOptions, TeacherCacheOptions):
    """Quantization-aware training with NNCF: BatchNorm folded into its convolution, fake
    quantizers inserted (calibrated on training data), fine-tuned with the distillation loss
    from the teacher, stripped, and written as INT8 ONNX (QDQ, int8 weights) that is checked
    for parity with the fake-quantized torch model. The FP32 student is left as it was, so
    `export` still writes it for comparison; nothing may change the model after `qat`."""

    type: Literal["qat"]
    quantizes: ClassVar[bool] = True

    model: ModelRole = Field(
        "student",
        description="Which model to quantize. With 'teacher' and distill: true, the FP32 teacher "
                    "teaches its own quantized copy.",
    )
    epochs: int = Field(2, ge=0, description="Fine-tuning epochs with quantizers in place.")
    lr: float = Field(1e-4, gt=0, le=1, description="Fine-tuning learning rate (keep it small).")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adam", description="Optimiser.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    distill: bool = Field(
        True, description="Fine-tune with KD from the teacher; false: cross-entropy alone."
    )
    temperature: float = Field(4.0, gt=0, le=100, description="KD softmax temperature T.")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the KD term.")
    preset: Literal["performance", "mixed"] = Field(
        "performance",
        description="NNCF preset: symmetric quantizers everywhere, or asymmetric activations.",
    )
    ignore: list[str] = Field(
        default_factory=list,
        description="Module names (glob patterns) kept in float.",
    )
    logit_tol: float = Field(
        0.05, gt=0,
        description=(
            "Largest |onnxruntime - torch fake-quant| logit difference accepted, as a fraction "
            "of the range of the torch logits on the evaluation split."
        ),
    )
    min_agreement: float = Field(
        0.97, ge=0, le=1,
        description=(
            "Smallest top-1 agreement of onnxruntime with the fake-quantized torch model on the "
            "evaluation split. The two round activations slightly differently, so near-ties can "
            "flip; logit_tol is the tight check, this one a floor."
        ),
    )
    opset: int = Field(17, ge=13, le=21, description="ONNX opset version.")

    @property
    def models_needed(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.model, "teacher"))) if self.distill else (self.model,)

    def artifact(self) -> str:
        return f"artifacts/{self.model}.qat{'' if self.distill else '-ce'}.int8.onnx"



class PtqConfig(Int8Options):
    """Post-training static quantization of the exported FP32 student ONNX with onnxruntime
    (QDQ, uint8 activations, int8 weights), for models that cannot be retrained; also the
    baseline QAT is compared with."""

    type: Literal["ptq"]
    needs_before: ClassVar[tuple[str, ...]] = ("export",)
    reads_artifacts: ClassVar[bool] = True
    quantizes: ClassVar[bool] = True

    model: ModelRole = Field("student", description="Which exported model to quantize.")


class ExportConfig(StageBase):
    """FP32 ONNX export with a dynamic batch axis, checked by onnx.checker and for parity,
    and the deployment bundle."""

    type: Literal["export"]
    reads_artifacts: ClassVar[bool] = True
    """The bundle takes the INT8 file an earlier stage wrote."""

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
    bundle: bool = Field(
        True,
        description=(
            "Also write artifacts/bundle/ and artifacts/bundle.zip for a mobile or edge app: "
            "the model (its INT8 file when a qat or earlier ptq stage made one, else FP32) as "
            "ONNX and in ORT format, the reduced operator config, manifest.json and a README."
        ),
    )
    bundle_model: ModelRole | None = Field(
        None, description="Model to bundle (default: the student when exported, else the first)."
    )
    bundle_precision: Literal["int8", "fp32"] = Field(
        "int8",
        description="int8: the model's INT8 file when an earlier stage made one (QAT+KD first), "
                    "else FP32; fp32: always the FP32 export.",
    )

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
    seconds: float | None = Field(
        None, gt=0,
        description="Time for this many seconds (at least 10 rounds) instead of `runs` rounds.",
    )
    warmup: int = Field(20, ge=0, description="Untimed runs before timing.")
    threads: int | None = Field(
        None, ge=1, description="Intra-op threads; null uses the target's own setting."
    )
    memory: bool = Field(
        True,
        description="Measure peak RSS of each artifact in a fresh child process.",
    )
    verdict_tolerance: float = Field(
        0.01, ge=0, le=1,
        description=(
            "The report's verdict per target names the fastest artifact whose accuracy is within "
            "this much (0.01: one point) of the most accurate one."
        ),
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


StageConfig = Annotated[
    Union[TrainConfig, DistillConfig, PruneConfig, LowRankConfig, QatConfig,  # noqa: UP007
          ExportConfig, PtqConfig, BenchmarkConfig],
    Field(discriminator="type"),
]

STAGE_CONFIGS: dict[str, type[StageBase]] = {
    "train": TrainConfig,
    "distill": DistillConfig,
    "prune": PruneConfig,
    "lowrank": LowRankConfig,
    "qat": QatConfig,
    "export": ExportConfig,
    "ptq": PtqConfig,
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
    models: dict[Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)], ModelConfig] = Field(
        default_factory=dict,
        description=(
            "More models by name (letters, digits, '_'), for stages that take a model name: "
            "extra teachers of a multi-teacher distill, peers of mutual distillation. "
            "'teacher' and 'student' are the sections above."
        ),
    )

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
    for name in cfg.models:
        if name in ("teacher", "student"):
            problems.append((("models", name), f"'{name}' is a top-level section; define it "
                             f"as '{name}:' rather than under 'models:'"))
    for i, stage in enumerate(cfg.stages):
        path = ("stages", i, "type")
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
                close = difflib.get_close_matches(role, sorted(available), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(
                    (("stages", i, *_key_naming(stage, role)),
                     f"'{stage.type}' uses the {role}{hint}, but the pipeline has no "
                     f"{where}; add one with a 'source:'")
                )
        if isinstance(stage, DistillConfig):
            problems += [(("stages", i, *key), msg) for key, msg in stage.mode_problems()]
        if isinstance(stage, PruneConfig) and sum(
                v is not None for v in (stage.ratio, stage.target_macs, stage.target_params)) > 1:
            problems.append((("stages", i), "give one of 'ratio', 'target_macs' and "
                             "'target_params', not several"))
        if isinstance(stage, LowRankConfig) and stage.energy is not None \
                and stage.rank_ratio is not None:
            problems.append((("stages", i), "give 'energy' or 'rank_ratio', not both"))
        available.update(stage.produces)
        exported = exported or stage.type == "export"
        quantized = quantized or stage.quantizes
        seen.append(stage.type)
    return problems

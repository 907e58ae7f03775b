"""The other stage types, and the union the `stages:` list validates against."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import ConfigDict, Field

from compresskit.config.base import (
    ModelRole,
    OptimOptions,
    StageBase,
    TeacherCacheOptions,
    TrainingOptions,
)
from compresskit.config.distill import DistillConfig


class TrainConfig(TrainingOptions):
    """Cross-entropy training of the teacher or the student."""

    type: Literal["train"]
    model: ModelRole = Field("student", description="Which model to train.")

    @property
    def models_needed(self) -> tuple[str, ...]:
        return (self.model,)



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


BUDGETS = ("target_latency", "latency_ms", "target_size")
"""prune's budgets measured on the exported model, not counted on the torch one."""


class MeasuredBudget(CompressOptions):
    """A budget measured on the exported model on `target` instead of a ratio (prune and
    lowrank): a latency table of each cut alone, the plan with the least predicted KD loss
    that meets it, then the result timed, interleaved, to check (stages/_budget.py)."""

    target_latency: float | None = Field(
        None, gt=0, lt=1,
        description=(
            "Compress until the model's batch-1 latency on `target` (one thread) is this "
            "fraction of the stage input's, measured there: per-group cuts chosen from a "
            "latency table and the KD loss of each cut, then checked by timing the result."
        ),
    )
    latency_ms: float | None = Field(
        None, gt=0,
        description="The same with an absolute budget: batch-1 milliseconds on `target`.",
    )
    target_size: int | None = Field(
        None, gt=0,
        description="The same with a size budget: bytes of the FP32 ONNX file.",
    )
    target: str | None = Field(
        None,
        description=(
            "The device the model is compressed for, where budgets are timed (a remote one "
            "through its ssh or command) and whose kernels choose prune's round_to: a "
            "built-in target or one under targets:. Unset: the first target of the "
            "pipeline's benchmark stage, else cpu."
        ),
    )

    def budget(self) -> tuple[str, float] | None:
        """(key, value) of the measured budget asked for, or None."""
        return next(((k, getattr(self, k)) for k in BUDGETS if getattr(self, k) is not None),
                    None)


class PruneConfig(MeasuredBudget):
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
    importance: Literal["l1", "l2", "taylor", "activation", "lamp", "bn_scale", "fpgm"] = Field(
        "l2",
        description=(
            "How channels are ranked: weight magnitude (l1, l2), first-order Taylor (gradient x "
            "weight on training batches), activation (how much each channel feeds the layers "
            "reading it on training batches: input RMS x weight norm, the Wanda and Minitron "
            "criterion; best for transformers' heads and MLP units), LAMP, BatchNorm scale, or "
            "FPGM (geometric median)."
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
        description=(
            "Keep channel counts multiples of N. Unset: the channel block of the kernels "
            "onnxruntime runs on `target` (16 with AVX-512, 8 with AVX2, on CUDA and on Arm), "
            "read from its CPU's flags; 1 turns rounding off."
        ),
    )
    heads: bool = Field(
        True,
        description=(
            "Remove whole attention heads (at the same ratio) in modules that have a "
            "head-count attribute (num_heads, num_attention_heads, n_heads) and q/k/v (or "
            "qkv) Linear children; nn.MultiheadAttention is pruned by torch-pruning's own rule."
        ),
    )
    calibration_batches: int = Field(
        4, ge=1, description="Training batches that rank channels for 'taylor' (their "
                             "gradients) and 'activation' (their activations)."
    )
    trace_seconds: int = Field(
        300, ge=5,
        description=(
            "Time budget for torch-pruning's tracing and the trial prunes that find groups "
            "which cannot be pruned safely; past it the model is left whole, with a warning."
        ),
    )

    model_config = ConfigDict(populate_by_name=True)

    def amount(self) -> tuple[str, float]:
        """(the key, its value): what the user asked for: 'ratio', 'target_macs',
        'target_params', or one of the measured BUDGETS."""
        for key in ("target_macs", "target_params", *BUDGETS):
            if getattr(self, key) is not None:
                return key, getattr(self, key)
        return "ratio", 0.5 if self.ratio is None else self.ratio

    def problems(self, pipeline: Any) -> list[tuple[tuple[Any, ...], str]]:
        given = [k for k in ("ratio", "target_macs", "target_params", *BUDGETS)
                 if getattr(self, k) is not None]
        if len(given) > 1:
            return [((), f"give one of 'ratio', 'target_macs', 'target_params', "
                         f"'target_latency', 'latency_ms' and 'target_size', not several "
                         f"(got {', '.join(given)})")]
        return []


class LowRankConfig(MeasuredBudget):
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
    keep_if_slower: bool = Field(
        True,
        description=(
            "Time each layer whole and factorised (that layer alone, on the input it gets in "
            "the model, batch 1, one thread, interleaved) and keep it whole when the factorised "
            "pair runs slower, whatever MACs it saves."
        ),
    )
    layers: list[Literal["linear", "conv"]] = Field(
        default_factory=lambda: list[Literal["linear", "conv"]](("linear", "conv")),
        min_length=1,
        description="Layer kinds to factorise.",
    )

    def problems(self, pipeline: Any) -> list[tuple[tuple[Any, ...], str]]:
        given = [k for k in ("energy", "rank_ratio", *BUDGETS) if getattr(self, k) is not None]
        if len(given) > 1:
            return [((), "give one of 'energy', 'rank_ratio', 'target_latency', 'latency_ms' "
                         f"and 'target_size', not several (got {', '.join(given)})")]
        return []


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
    max_drop: float | None = Field(
        None, ge=0, le=100,
        description=(
            "Points of the task's metric (0.5: half a point of accuracy) the INT8 file may "
            "lose against the FP32 model on the evaluation split. When it loses more, qat "
            "first writes its calibrated weights, before training, if QAT's training lost the "
            "points and those lose fewer; then layers "
            "are kept in float one at a time, chosen on training inputs by error regained per "
            "measured millisecond, until the drop holds within min_int8_coverage; the stage "
            "fails when it cannot. Unset: the all-INT8 file, whatever it loses."
        ),
    )


class QatConfig(Int8Options, OptimOptions, TeacherCacheOptions):
    """Quantization-aware training with NNCF: BatchNorm folded into its convolution, fake
    quantizers inserted (calibrated on training data), fine-tuned with the distillation loss
    from the teacher, stripped, and written as INT8 ONNX (QDQ, int8 weights) that is checked
    for parity with the fake-quantized torch model. The FP32 student is left as it was, so
    `export` still writes it for comparison; nothing may change the model after `qat`."""

    type: Literal["qat"]
    quantizes: ClassVar[bool] = True
    trains: ClassVar[bool] = True

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
    kd_from: Literal["teacher", "self"] = Field(
        "teacher",
        description=(
            "Whose outputs QAT distils: the pipeline's teacher, or 'self': the FP32 model being "
            "quantized, as it came in (quantization-aware distillation: the INT8 model is pulled "
            "toward its own FP32 outputs, what max_drop and the report compare it with, instead "
            "of on toward the teacher)."
        ),
    )
    keep: Literal["better", "trained"] = Field(
        "better",
        description=(
            "Which weights QAT hands on. 'better': the fake-quantized model is scored on the "
            "validation split after calibration and again after training, and the calibrated "
            "weights are kept when training lowered its accuracy beyond chance (a one-sided "
            "sign test at 5% on the samples the two classify differently: on a small split a "
            "sample or two either way is noise); 'trained': the weights as trained. Without "
            "labels on the validation split, the trained weights."
        ),
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
            "of the range of the torch logits on the evaluation split, at the 99th percentile "
            "of samples (each sample's largest difference): one rounding step cascading "
            "through a deep network moves one sample in a few hundred, a wrong kernel all."
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
        return tuple(dict.fromkeys((self.model, "teacher"))) \
            if self.distill and self.kd_from == "teacher" else (self.model,)

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
    dynamic: bool = Field(
        False,
        description=(
            "onnxruntime dynamic quantization instead of static: int8 weights of every "
            "MatMul/Gemm and embedding table (Gather), activations quantized per batch at run "
            "time, no calibration. The usual choice for transformers, whose activation ranges "
            "vary by input."
        ),
    )

    bits: Literal[8, 4] = Field(
        8,
        description=(
            "task causal-lm: 8 is dynamic INT8 (onnxruntime's quantize_dynamic: MatMulInteger "
            "with activations quantized at run time); 4 is INT4 weight-only (MatMulNBits, "
            "block_size weights per scale, the embedding table as well), built by "
            "onnxruntime-genai's model builder from the same weights as the FP32 decoder."
        ),
    )
    block_size: int = Field(32, ge=16, le=256, description="bits 4: weights per scale.")
    int4_algorithm: Literal["default", "rtn", "k_quant", "rtn_last", "k_quant_last",
                            "k_quant_mixed"] = Field(
        "default",
        description=(
            "bits 4: the model builder's algo_config. default and rtn round to nearest; "
            "k_quant searches each block's scale; *_last keeps the LM head (the largest, most "
            "output-sensitive MatMul) in INT8; k_quant_mixed also the most sensitive layers "
            "(llama.cpp's mixed strategy: the first and last eighth, every third layer's "
            "v and down projections)."
        ),
    )

    def problems(self, pipeline: Any) -> list[tuple[tuple[Any, ...], str]]:
        if pipeline.task == "causal-lm":
            if self.bits == 8 and not self.dynamic:
                return [(("dynamic",), "task causal-lm quantizes to INT8 dynamically: set "
                         "dynamic: true, or bits: 4 for INT4 weights")]
            return []
        if self.bits != 8 or {"block_size", "int4_algorithm"} & self.chosen():
            return [(("bits",), "bits and block_size apply to task causal-lm; other tasks "
                     "quantize to INT8")]
        if self.dynamic and self.max_drop is not None:
            return [(("max_drop",), "max_drop keeps layers of a static (QDQ) file in float; a "
                     "dynamic file has no quantizers to take out; drop one of the two")]
        return []


class GenerateConfig(StageBase):
    """Sequence-level distillation data (Kim and Rush 2016; the Orca, Phi-3 and DeepSeek-R1
    recipe), task causal-lm: the teacher writes a completion for each prompt. Prompts and
    completions are kept in the stage's folder (generated.jsonl, and their token ids); the
    distill stages after it train on them beside the data source's training text. The same
    seed and prompts give the same completions."""

    type: Literal["generate"]
    trains: ClassVar[bool] = False

    model: ModelRole = Field("teacher", description="The model that writes the completions.")
    prompts: str | None = Field(
        None,
        description=(
            "A text file of prompts, one per line (relative to the pipeline file's folder), or "
            "'module:attr' naming a list of strings (or a function returning one); null: the "
            "built-in set of varied instructions (compresskit.lm.generate.PROMPTS)."
        ),
    )
    limit: int | None = Field(None, ge=1, description="Use at most this many prompts.")
    max_new_tokens: int = Field(96, ge=1, le=4096, description="Tokens per completion.")
    temperature: float = Field(
        0.0, ge=0, le=5,
        description="Sampling temperature; 0: greedy (the usual choice for sequence-level KD).",
    )
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling when temperature > 0.")
    chat_template: bool = Field(
        True,
        description="Wrap each prompt in the tokenizer's chat template when it has one "
                    "(instruction-tuned teachers answer in it).",
    )
    batch_size: int = Field(8, ge=1, description="Prompts generated together.")

    @property
    def models_needed(self) -> tuple[str, ...]:
        return (self.model,)


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
    rtol: float = Field(
        1e-3, ge=0,
        description="Relative tolerance of the parity check, of each sample's largest output.")
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
    lengths: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1,
        description=(
            "For models with dynamic input axes (a sequence length): time at each of these "
            "sizes, with the evaluation samples cut or zero-padded to it (e.g. [16, 128]). "
            "Null: the size the data has."
        ),
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
    prompt_tokens: int = Field(
        128, ge=1, description="task causal-lm: the prompt's length for time to first token.")
    new_tokens: int = Field(
        128, ge=1, description="task causal-lm: tokens decoded for tokens per second.")
    sample_prompt: str = Field(
        "The Python interpreter reads a program and",
        description="task causal-lm: the prompt every artifact continues greedily in the "
                    "report (32 tokens).",
    )
    verdict_metric: Literal["accuracy", "cosine", "nn_agreement", "perplexity",
                            "agreement"] | None = Field(
        None,
        description=(
            "The quality metric the verdict judges by; null: the task's first (accuracy, or "
            "cosine to the teacher). nn_agreement suits a retrieval model, whose users care "
            "which neighbours come back."
        ),
    )
    verdict_on: str | None = Field(
        None,
        description=(
            "Judge quality on this held-out set of the data source (e.g. text from another "
            "source than training) instead of the evaluation split."
        ),
    )

    def problems(self, pipeline: Any) -> list[tuple[tuple[Any, ...], str]]:
        from compresskit.measure.quality import METRICS

        out: list[tuple[tuple[Any, ...], str]] = []
        if pipeline.task == "causal-lm":
            if self.targets != ["cpu"]:
                out.append((("targets",), "task causal-lm is measured on this machine's CPU "
                            "(targets: [cpu]); decoders on remote and cuda targets are not "
                            "supported yet"))
            return out
        if self.lengths and not any(i.dynamic for i in pipeline.inputs):
            out.append((("lengths",), "'lengths' needs an input with a dynamic axis; give one "
                        "under input: dynamic (e.g. {0: sequence})"))
        if self.verdict_metric and self.verdict_metric not in METRICS[pipeline.task]:
            out.append((("verdict_metric",), f"task {pipeline.task} measures "
                        f"{', '.join(METRICS[pipeline.task])}, not {self.verdict_metric}"))
        held = pipeline.data.kwargs.get("held_out")
        if self.verdict_on and isinstance(held, dict) and self.verdict_on not in held:
            out.append((("verdict_on",), f"the data source has no held-out set "
                        f"'{self.verdict_on}'; its held_out names "
                        f"{', '.join(map(repr, held)) or 'none'}"))
        return out


if TYPE_CHECKING:
    StageConfig = StageBase
else:  # every stage type's config, told apart by `type`
    StageConfig = Annotated[
        Union[TrainConfig, DistillConfig, PruneConfig, LowRankConfig, QatConfig,  # noqa: UP007
              ExportConfig, PtqConfig, BenchmarkConfig, GenerateConfig],
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
    "generate": GenerateConfig,
}
"""The schema's side of each stage; the descriptors in compresskit.stages name the same classes
(tests/unit/test_stage_contract.py holds the two together)."""

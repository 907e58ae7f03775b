"""The `distill` stage: its loss terms, its teachers and its modes."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from compresskit.config.base import (
    ModelRole,
    Strict,
    TeacherCacheOptions,
    TrainingOptions,
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
    """Hinton et al. 2015: T^2 * KL(softmax(teacher/T) || softmax(student/T)). For task
    causal-lm, at every position over the vocabulary, with the divergence chosen here."""

    type: Literal["kl"]
    weight: float = Field(1.0, ge=0, description="Weight of this term.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"] = Field(
        "forward_kl",
        description=(
            "task causal-lm: forward_kl KL(teacher || student); reverse_kl KL(student || "
            "teacher) (MiniLLM); jsd the generalized Jensen-Shannon divergence with `beta` "
            "(GKD); skew_kl KL(teacher || skew teacher + (1 - skew) student) (DistiLLM). "
            "Other tasks use forward_kl."
        ),
    )
    beta: float = Field(0.5, ge=0, le=1, description="divergence jsd: its beta (0: forward "
                        "KL, 1: reverse KL).")
    skew: float = Field(0.1, ge=0, lt=1, description="divergence skew_kl: its skew alpha.")


class FeatureTerm(Strict):
    """FitNets (Romero et al. 2015): match the output of a student module to a teacher module's.
    When channel counts differ, a learned 1x1 convolution (Linear for 2-D/3-D outputs) maps
    the student's to the teacher's; it trains with the student and is not exported. On token
    sequences of a model with an attention-mask input, padded tokens are left out and cosine
    compares token by token (TinyBERT's hidden-state loss, e.g. student
    encoder.layer.2 against teacher encoder.layer.5)."""

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


class RelationTerm(Strict):
    """MiniLMv2 self-attention relations (Wang et al. 2021): the softmax of X X^T / sqrt(d),
    per relation head, of one projection (queries, keys or values: e.g.
    encoder.layer.5.attention.self.query) of a teacher layer and of a student layer, matched by
    KL over the real (unpadded) tokens. Widths may differ; no adapter is needed. Use one term
    each for the query, key and value projections, as the paper does."""

    type: Literal["relations"]
    student: str = Field(..., description="Student module with [batch, tokens, width] output.")
    teacher: str = Field(..., description="Teacher module with [batch, tokens, width] output.")
    heads: int = Field(12, ge=1, description="Relation heads; must divide both widths.")
    weight: float = Field(1.0, ge=0, description="Weight of this term.")


LossTerm = Annotated[
    Union[KLTerm, FeatureTerm, AttentionTerm, CosineTerm, RelationTerm],  # noqa: UP007
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
    cache_top_k: int = Field(
        256, ge=1,
        description=(
            "task causal-lm with cache_teacher: keep the teacher's top-k log-probabilities "
            "(fp16) and token ids (int32) per position, and the mass of the rest, computed "
            "once for every epoch (Gemma 3 keeps 256). Without the cache the teacher runs live "
            "and the loss sees the whole vocabulary."
        ),
    )
    on_policy: float = Field(
        0.0, ge=0, le=1,
        description=(
            "task causal-lm: the share of batches on which the student writes the text itself "
            "(sampling `on_policy_tokens` tokens after the first half of a block) and the "
            "teacher scores it live (GKD's lambda)."
        ),
    )
    on_policy_tokens: int = Field(32, ge=1, description="Tokens the student samples per "
                                  "on-policy batch.")
    loss_chunk: int = Field(
        1024, ge=16,
        description="task causal-lm: positions per chunk of the vocabulary loss; memory holds "
                    "chunk x vocabulary logits at a time, not batch x length x vocabulary.",
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

    def problems(self, pipeline: Any) -> list[tuple[tuple[Any, ...], str]]:
        """Keys that contradict the mode or the pipeline's task."""
        out: list[tuple[tuple[Any, ...], str]] = []
        if pipeline.task == "causal-lm":
            if self.mode != "kd":
                out.append((("mode",), f"mode: {self.mode} is not available for task "
                            "causal-lm; use mode: kd"))
            if len(self.teachers) != 1:
                out.append((("teachers",), "task causal-lm distils from one teacher"))
            if any(t.type != "kl" for t in self.losses):
                out.append((("losses",), "task causal-lm distils the next-token distribution: "
                            "use one 'kl' term (with its divergence)"))
            if self.temperature == "auto":
                out.append((("temperature",), "temperature: auto is not available for task "
                            "causal-lm; give a number (1.0 is usual)"))
            return out
        lm_only = ("cache_top_k", "on_policy", "on_policy_tokens", "loss_chunk")
        chosen = self.chosen()
        for key in lm_only:
            if key in chosen:
                out.append(((key,), f"'{key}' applies to task causal-lm"))
        if any(t.type == "kl" and ("divergence" in t.chosen()
                                   and t.divergence != "forward_kl") for t in self.losses):
            out.append((("losses",), "divergences other than forward_kl apply to task "
                        "causal-lm"))
        if pipeline.task == "embed" and self.mode != "kd":
            out.append((("mode",), f"mode: {self.mode} compares logits; task: embed distils "
                        "embeddings with mode: kd and a cosine loss term"))
        given = chosen
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


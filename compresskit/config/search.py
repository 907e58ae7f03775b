"""The `search:` section: what `compresskit search` may change, and what it optimises."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from compresskit.config.base import Strict


class SearchRange(Strict):
    """One knob: a numeric range (`low`, `high`, optionally `step` or `log`) or `choices`."""

    low: float | None = Field(None, description="Smallest value (numeric range).")
    high: float | None = Field(None, description="Largest value (numeric range).")
    step: float | None = Field(None, gt=0, description="Grid step; integers when all are.")
    log: bool = Field(False, description="Sample on a log scale.")
    choices: list[Any] | None = Field(None, min_length=1, description="Values to pick from.")

    @model_validator(mode="after")
    def _one_kind(self) -> SearchRange:
        numeric = self.low is not None or self.high is not None
        if numeric == (self.choices is not None):
            raise ValueError("give either low and high, or choices")
        if numeric:
            if self.low is None or self.high is None:
                raise ValueError("a range needs both low and high")
            if self.low >= self.high:
                raise ValueError(f"empty range: low {self.low} is not below high {self.high}")
            if self.log and self.low <= 0:
                raise ValueError("a log range needs low > 0")
        return self

    def is_int(self) -> bool:
        return all(v is not None and float(v).is_integer()
                   for v in (self.low, self.high, self.step or 1.0))


Objective = Literal["accuracy", "latency", "size"]


def _objectives() -> list[Objective]:
    return ["accuracy", "latency"]


class SearchConfig(Strict):
    """Knobs to explore and the objectives: `compresskit search PIPELINE --trials N`."""

    space: dict[str, SearchRange] = Field(
        ..., min_length=1,
        description=(
            "Pipeline keys as in overrides (e.g. stages.2.target_macs, stages.4.max_drop), each "
            "with a range or choices; the key `artifact` chooses which file a trial is "
            "measured by (e.g. choices: [student.qat.int8.onnx, student.ptq.int8.onnx])."
        ),
    )
    objectives: list[Objective] = Field(
        default_factory=_objectives, min_length=2, max_length=3,
        description=(
            "What each trial is scored by: the task's metric (higher is better), batch "
            "latency p50 on `target` and the file's bytes (lower is better)."
        ),
    )
    target: str = Field("cpu", description="The benchmark target latency is read from.")
    batch_size: int = Field(1, ge=1, description="The batch size latency is read at.")
    artifact: str = Field(
        "student.int8",
        description=(
            "The file a trial is measured by: a name in artifacts/ (student.qat.int8.onnx), or "
            "student.int8 (the student's last INT8 file, else its FP32 one)."
        ),
    )

    @model_validator(mode="after")
    def _accuracy_first(self) -> SearchConfig:
        if "accuracy" not in self.objectives:
            raise ValueError("one objective must be accuracy, beside latency and/or size")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError("each objective once")
        return self

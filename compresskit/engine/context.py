"""What a stage receives (StageContext) and returns (StageResult)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from torch import nn

    from compresskit.config import PipelineConfig
    from compresskit.data.sources import Splits
    from compresskit.engine.artifacts import Artifact, Structure


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    updated: dict[str, nn.Module] = field(default_factory=dict)
    """Models whose weights or structure the stage changed, by role."""
    params: int | None = None
    structure: dict[str, Structure] = field(default_factory=dict)
    """For models whose structure the stage changed, how to rebuild them."""
    artifacts: list[Artifact] = field(default_factory=list)
    benchmarks: list[dict[str, Any]] = field(default_factory=list)
    incomplete: str | None = None
    """Why the stage kept what it could but must run again next time (a device that could not
    be reached): its manifest is written, never taken from the cache."""


@dataclass
class StageContext:
    config: PipelineConfig
    index: int
    name: str
    """Folder name, e.g. '01-distill'."""
    run_dir: Path
    work_dir: Path
    """Where the stage writes its own files (renamed to run_dir/name when it finishes)."""
    device: torch.device
    seed: int
    console: Console
    progress: Any
    artifacts: list[Artifact]
    """Artifacts written by earlier stages (paths relative to run_dir)."""
    _data: Callable[[], Splits]
    _model: Callable[[str], nn.Module]
    _structure: Callable[[str], Structure]
    base_dir: Path = Path(".")
    """The pipeline file's folder: files a stage names (a prompts file) are found from it."""

    def data(self) -> Splits:
        return self._data()

    def model(self, role: str) -> nn.Module:
        return self._model(role)

    def structure(self, role: str) -> Structure:
        """How the model of this role is built: its base role and the structural edits since."""
        return self._structure(role)

    def log(self, message: str) -> None:
        self.console.print(f"  [dim]{self.name}[/dim] {message}")

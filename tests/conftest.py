from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = """\
name: tiny
seed: 0
data: {source: digits, batch_size: 32}
input: {shape: [1, 8, 8]}
teacher: {source: models/digits.py:teacher, kwargs: {width: 4}}
student: {source: models/digits.py:student, kwargs: {width: 2}}
stages:
  - {type: train, model: teacher, epochs: 1, lr: 0.03}
  - {type: distill, epochs: 2, lr: 0.03}
  - {type: export}
  - {type: benchmark, batch_sizes: [1], runs: 10, warmup: 1, memory: false}
"""


def without_timings(obj):
    """Metrics with every measured time dropped (latency_ms), which no two runs share."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k != "latency_ms"}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def workspace_with_models(folder: Path) -> Path:
    """A folder holding a copy of the repo's models/, as a user's project would."""
    (folder / "models").mkdir(exist_ok=True)
    (folder / "models" / "digits.py").write_text((ROOT / "models" / "digits.py").read_text())
    return folder


@pytest.fixture
def write_pipeline(tmp_path: Path):
    """Write a pipeline file into a temp folder that has the repo's models/ beside it."""
    workspace_with_models(tmp_path)

    def write(text: str, name: str = "pipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def tiny_pipeline(write_pipeline) -> Path:
    return write_pipeline(TINY)

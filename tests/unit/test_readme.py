"""The README's Quickstart is what CI runs; these keep the two from drifting."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _blocks() -> list[str]:
    path = ROOT / ".ci" / "readme_command.py"
    spec = importlib.util.spec_from_file_location("readme_command", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.quickstart_blocks((ROOT / "README.md").read_text())


def test_quickstart_has_exactly_three_one_line_blocks():
    blocks = _blocks()
    assert len(blocks) == 3
    assert all("\n" not in b for b in blocks)
    assert blocks[0].endswith("compresskit run pipelines/digits.yaml")
    assert "[dev]" in blocks[1] and blocks[1].endswith("pytest")
    # The zoo on the newest torch: its own venv, torchvision and timm, the zoo test alone.
    assert ".venv-zoo" in blocks[2] and "[dev,zoo]" in blocks[2]
    assert blocks[2].endswith("pytest -m slow tests/e2e/test_zoo_matrix.py")


def test_ci_runs_the_readme_test_lines():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command.py 2" in ci and "readme_command.py 3" in ci

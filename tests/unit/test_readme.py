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


def test_quickstart_has_exactly_two_one_line_blocks():
    blocks = _blocks()
    assert len(blocks) == 2
    assert all("\n" not in b for b in blocks)
    assert blocks[0].endswith("compresskit run pipelines/digits.yaml")
    assert "[dev]" in blocks[1] and blocks[1].endswith("pytest")


def test_ci_runs_the_readme_test_line():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command.py 2" in ci

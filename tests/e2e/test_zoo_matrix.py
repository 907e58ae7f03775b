"""The compatibility zoo end to end (benchmarks/zoo_matrix.py): every architecture whose library
is installed goes through distill -> prune -> lowrank -> qat -> export -> ptq -> benchmark, with
one distillation epoch; every one must finish with an INT8 file at or above its coverage floor."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT / "benchmarks"))

LIBRARY = {"torchvision": "torchvision", "timm": "timm", "transformers": "transformers",
           "torch": "torch"}


@pytest.mark.slow
def test_every_zoo_architecture_finishes_the_chain(tmp_path):
    import zoo_matrix

    ARCHS = zoo_matrix.archs().ARCHS  # noqa: N806

    names = [n for n, (family, _, _) in ARCHS.items()
             if importlib.util.find_spec(LIBRARY[family]) is not None]
    if len(names) < len(ARCHS):
        missing = sorted({ARCHS[n][0] for n in ARCHS if n not in names})
        print(f"not installed, skipped: {', '.join(missing)} (pip install -e '.[zoo]')")
    rows = zoo_matrix.main(["--out", str(tmp_path), "--epochs", "1", "--only", *names])
    for row in rows:
        assert all(row["stages"][t] == "done" for t in zoo_matrix.STAGES), row
        assert not row["over_budget"], row["seconds"]  # 180 s a stage
        assert row["int8_coverage"] >= zoo_matrix.floor(row["architecture"]), row
        assert (tmp_path / "matrix.md").is_file()

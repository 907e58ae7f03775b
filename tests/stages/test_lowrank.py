"""The lowrank stage: wide layers are factorised, narrow ones kept, and the model reloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from compresskit import api
from tests.stages.test_prune import FIXTURES, ROOT, manifest


def pipeline(lowrank: dict, export: dict | None = None) -> dict:
    return {
        "name": "lowrank", "input": {"shape": [1, 8, 8]},
        "teacher": {"source": f"{FIXTURES}:residual"},
        "student": {"source": f"{FIXTURES}:mlp"},
        "stages": [
            {"type": "train", "model": "teacher", "epochs": 1, "lr": 0.01},
            {"type": "distill", "epochs": 2, "lr": 0.01},
            {"type": "lowrank", "recover": 1, "latency_runs": 10, **lowrank},
            {"type": "export", "models": ["student"], **(export or {})},
            {"type": "benchmark", "runs": 10, "warmup": 1, "memory": False},
        ],
    }


def test_factorises_wide_layers_and_reloads(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = pipeline({"rank_ratio": 0.25})
    report = api.run(cfg, base_dir=ROOT, output_dir=out, show_progress=False)
    m = report["stages"][2]["metrics"]
    # rank = ceil(0.25 * min(out, in)): 16 for the 64 x 64 layers, 3 for fc3 (64 -> 10);
    # 3 * (64 + 10) MACs against 640 saves 65%, over min_reduction, so fc3 goes too.
    assert {k: v["rank"] for k, v in m["factorized"].items()} == {"fc1": 16, "fc2": 16, "fc3": 3}
    assert m["after"]["macs"] == 2 * 16 * (64 + 64) + 3 * (64 + 10)
    edits = manifest(out, "02-lowrank")["structure"]["student"]["edits"]
    assert edits == [{"op": "lowrank", "layers": {"fc1": {"kind": "linear", "rank": 16},
                                                   "fc2": {"kind": "linear", "rank": 16},
                                                   "fc3": {"kind": "linear", "rank": 3}}}]
    again = api.run(pipeline({"rank_ratio": 0.25}, {"opset": 18}), base_dir=ROOT,
                    output_dir=out, show_progress=False)
    assert [s["status"] for s in again["stages"]][:3] == ["cached"] * 3
    assert again["benchmarks"][0]["accuracy"] == pytest.approx(m["after"]["accuracy"])


def test_min_reduction_keeps_layers_that_would_save_too_little(tmp_path: Path) -> None:
    report = api.run(pipeline({"rank_ratio": 0.4, "min_reduction": 0.5, "recover": 0}),
                     base_dir=ROOT, output_dir=tmp_path / "run", show_progress=False)
    m = report["stages"][2]["metrics"]
    # 64 x 64 at rank 26 costs 26 * 128 = 3328 of 4096 MACs (19% saved): kept. fc3 at rank 4
    # costs 296 of 640 (54% saved): factorised.
    assert set(m["factorized"]) == {"fc3"}
    assert m["kept"]["fc1"] == "rank 26 would cut its MACs by less than 50%"


def test_nothing_worth_factorising_leaves_the_model_unchanged(tmp_path: Path) -> None:
    report = api.run(pipeline({"energy": 1.0}), base_dir=ROOT, output_dir=tmp_path / "run",
                     show_progress=False)
    m = report["stages"][2]["metrics"]
    assert m["factorized"] == {}
    assert m["after"]["macs"] == m["before"]["macs"]

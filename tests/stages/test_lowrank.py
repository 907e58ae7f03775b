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
            # These layers are too small for factorising to pay in onnxruntime (a few µs),
            # so the timing check is off where the tests are about the factorisation itself.
            {"type": "lowrank", "recover": 1, "latency_runs": 10, "keep_if_slower": False,
             **lowrank},
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


def test_a_factorised_layer_is_kept_only_where_onnxruntime_runs_it_faster(tmp_path: Path):
    """keep_if_slower: a wide layer at a low rank runs several times faster factorised; the
    MLP's 64-wide layers take a few µs either way, and the stage's choice for each follows its
    own interleaved timing."""
    import torch
    from torch import nn

    from compresskit.ops import lowrank as lr
    from compresskit.stages.lowrank import _time_layers

    torch.manual_seed(0)
    wide = nn.Linear(1024, 1024)
    model = nn.Sequential(wide)
    t = _time_layers(model, torch.randn(1, 1024), {"0": (wide, lr.factorize_linear(wide, 32))},
                     tmp_path / "layers", 100)["0"]
    assert t["speedup"] > 2, t  # 1,048,576 MACs against 65,536

    report = api.run(pipeline({"rank_ratio": 0.25, "keep_if_slower": True}), base_dir=ROOT,
                     output_dir=tmp_path / "run", show_progress=False)
    m = report["stages"][2]["metrics"]
    for name, spec in m["factorized"].items():
        assert spec["timing"]["speedup"] >= 1.0, (name, spec)
    slower = {k: v for k, v in m["kept"].items() if "slower" in v}
    assert set(m["factorized"]) | set(slower) == {"fc1", "fc2", "fc3"}, m["kept"]


def test_timing_leaves_the_models_forward_alone_where_a_layer_sees_patches(tmp_path: Path):
    """A layer whose input's leading dimension is not the batch (MobileViT feeds its attention
    patches x tokens): recording that input to time the layer alone must not change what the
    layer gets. A pre-hook that returned the recorded slice fed it one patch and broke timm's
    mobilevit_xxs at its next reshape."""
    import torch
    from torch import nn

    from compresskit.ops import lowrank as lr
    from compresskit.stages.lowrank import _time_layers

    class Patches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 64)
            self.head = nn.Linear(8 * 64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            tokens = self.fc(x.reshape(b * 2, 4, 8))  # 2 patches of 4 tokens per sample
            return self.head(tokens.reshape(b, -1))  # type: ignore[no-any-return]

    torch.manual_seed(0)
    model = Patches()
    t = _time_layers(model, torch.randn(1, 1, 8, 8),
                     {"fc": (model.fc, lr.factorize_linear(model.fc, 4))}, tmp_path / "l", 10)
    assert set(t) == {"fc"} and t["fc"]["whole_ms"] > 0

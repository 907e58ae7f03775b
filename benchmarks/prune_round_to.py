"""Does pruning buy latency, and does round_to help? (no training needed)

Prunes models/resnet.py (random weights, L2 importance) to half its MACs with and without
round_to 8, exports each to FP32 ONNX and times the three files interleaved at batch 1 on one
thread with onnxruntime (median of paired ratios against the unpruned model).

Run: python benchmarks/prune_round_to.py [--width 32] [--runs 300]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compresskit import measure  # noqa: E402
from compresskit.backends import pruning  # noqa: E402
from compresskit.backends.onnx_export import export_onnx  # noqa: E402
from compresskit.backends.onnx_graph import total_macs  # noqa: E402
from models.resnet import resnet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = resnet(width=args.width).eval()
    example = torch.zeros(1, 3, 32, 32)
    x = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    tmp = Path(tempfile.mkdtemp())
    paths = {"unpruned": tmp / "unpruned.onnx"}
    export_onnx(base, torch.from_numpy(x[:2]), paths["unpruned"], 17)
    keep = pruning.leaf_order(base, example)
    for label, round_to in (("half MACs", None), ("half MACs, round_to 8", 8)):
        common = dict(criterion="l2", ignored=[keep[0], keep[-1]], global_ranking=False,
                      max_layer_ratio=0.9, round_to=round_to, heads=False)
        ratio, _ = pruning.ratio_for_target(base, example,
                                            lambda m: pruning.count(m, example)[0], 0.5, **common)
        model = copy.deepcopy(base)
        pruning.step(pruning.make_pruner(model, example, ratio=ratio, steps=1, **common), model)
        paths[label] = tmp / f"{label.replace(' ', '_').replace(',', '')}.onnx"
        export_onnx(model.eval(), torch.from_numpy(x[:2]), paths[label], 17)
    t = measure.latency(paths, x, args.runs)
    print("| model | MACs | p50 ms | speedup vs unpruned |")
    print("|---|---|---|---|")
    for label, path in paths.items():
        speed = t["speedup"].get(label, 1.0)
        print(f"| {label} | {total_macs(path) / 1e6:.1f}M | {t['p50_ms'][label]:.3f} | "
              f"{speed:.2f}x |")


if __name__ == "__main__":
    main()

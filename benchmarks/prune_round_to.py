"""Does pruning buy latency, and which round_to pays? (no training needed)

Prunes models/resnet.py (random weights, L2 importance) to half its MACs with round_to 1 (off),
4, 8 and 16, exports each to FP32 ONNX and times the files interleaved at batch 1 on one thread
with onnxruntime (median of paired ratios against the unpruned model). Prints this CPU's flags
and the round_to the prune stage chooses for it when none is given (measure.targets.
channel_block: 16 with AVX-512, 8 with AVX2).

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

from compresskit.backends import pruning  # noqa: E402
from compresskit.backends.device_runner import device_info  # noqa: E402
from compresskit.backends.onnx_export import export_onnx  # noqa: E402
from compresskit.backends.onnx_graph import total_macs  # noqa: E402
from compresskit.measure import profile  # noqa: E402
from compresskit.measure.targets import TARGETS, channel_block  # noqa: E402
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
    for round_to in (1, 4, 8, 16):
        label = f"half MACs, round_to {round_to}"
        common = dict(criterion="l2", ignored=[keep[0], keep[-1]], global_ranking=False,
                      max_layer_ratio=0.9, round_to=round_to if round_to > 1 else None,
                      heads=False)
        ratio, _ = pruning.ratio_for_target(base, example,
                                            lambda m: pruning.count(m, example)[0], 0.5, **common)
        model = copy.deepcopy(base)
        pruning.step(pruning.make_pruner(model, example, ratio=ratio, steps=1, **common), model)
        paths[label] = tmp / f"{label.replace(' ', '_').replace(',', '')}.onnx"
        export_onnx(model.eval(), torch.from_numpy(x[:2]), paths[label], 17)
    t = profile.latency(paths, x, args.runs)
    info = device_info()
    block, why = channel_block(TARGETS.get("cpu"))
    print(f"{info['cpu']}, flags: {' '.join(info['isa'])}; onnxruntime "
          f"{info['onnxruntime']}\nround_to chosen for cpu: {block} ({why})\n")
    # Rounding changes how close the bisection gets to half the MACs, so compare time per MAC
    # too: 1.00 means the pruned model runs its MACs as efficiently as the unpruned one.
    print("| model | MACs | p50 ms | speedup vs unpruned | time per MAC vs unpruned |")
    print("|---|---|---|---|---|")
    macs = {label: total_macs(path) for label, path in paths.items()}
    for label in paths:
        speed = t["speedup"].get(label, 1.0)
        per_mac = macs["unpruned"] / macs[label] / speed
        print(f"| {label} | {macs[label] / 1e6:.1f}M | {t['p50_ms'][label]:.3f} | "
              f"{speed:.2f}x | {per_mac:.2f} |")


if __name__ == "__main__":
    main()

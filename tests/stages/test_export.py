"""Export writes a checked, torch-equal ONNX file, or nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compresskit import api
from compresskit.errors import StageError
from compresskit.stages import export as export_stage
from tests.conftest import TINY

EXPORT_ONLY = "".join(line + "\n" for line in TINY.splitlines()
                      if not any(t in line for t in ("type: train", "distill", "benchmark")))


def test_export_parity_and_contract(write_pipeline, tmp_path):
    report = api.run(write_pipeline(EXPORT_ONLY), output_dir=tmp_path / "run", show_progress=False)
    (stage,) = report["stages"]
    parity = stage["metrics"]["parity"]
    assert set(parity) == {"teacher", "student"}
    for check in parity.values():
        assert check["within_tolerance"] and check["top1_agreement"] == 1.0
        assert check["max_abs_diff"] < 1e-4 and check["samples"] == 360
    paths = sorted(a["path"] for a in report["artifacts"] if a["format"] == "onnx")
    assert paths == ["artifacts/student.fp32.onnx", "artifacts/teacher.fp32.onnx"]
    import onnx

    model = onnx.load(tmp_path / "run" / "artifacts" / "student.fp32.onnx")
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"  # dynamic batch axis


def test_parity_failure_writes_nothing(write_pipeline, tmp_path, monkeypatch):
    real = export_stage.parity

    def off(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "within_tolerance": False, "max_abs_diff": 0.5}

    monkeypatch.setattr(export_stage, "parity", off)
    with pytest.raises(StageError, match="onnxruntime's output differs from torch's by up to 0.5"):
        api.run(write_pipeline(EXPORT_ONLY), output_dir=tmp_path / "run", show_progress=False)
    run = tmp_path / "run"
    assert not (run / "artifacts").exists() or not any((run / "artifacts").iterdir())
    assert not (run / "00-export").exists()
    report = api_report(run)
    assert report["stages"][0]["status"] == "failed"


def api_report(run):
    import json

    return json.loads((run / "report.json").read_text())


class Untraceable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow is fine to trace; an unsupported op is not
            return torch.linalg.eigvals(x.flatten(1)[:, :4].reshape(-1, 2, 2)).real.flatten(1)
        return x.flatten(1)


def test_untraceable_model_is_a_stage_error(tmp_path):
    from compresskit.backends.onnx_export import ExportError, export_onnx

    with pytest.raises(ExportError, match="no ONNX form for the operator 'aten::linalg_eigvals'"
                       ) as info:
        export_onnx(Untraceable(), torch.ones(2, 1, 8, 8), tmp_path / "m.onnx", opset=17)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("kernel", "size", "ceil", "whole"), [
    (20, 3, True, True),  # Hugging Face EfficientNet's pooler: window larger than the map
    (4, 4, False, True),  # AvgPool2d(7) on a 7 x 7 map
    (2, 4, False, False),  # a real pooling: stays
])
def test_whole_window_average_pools_become_global(tmp_path, kernel, size, ceil, whole):
    """With count_include_pad, onnxruntime's QLinearAveragePool divided a window larger than
    its input by the whole window, and HF EfficientNet's INT8 file pooled to zeros."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from compresskit.backends.onnx_export import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                              torch.nn.AvgPool2d(kernel, ceil_mode=ceil, count_include_pad=True))
    x = torch.randn(2, 3, size, size)
    path = tmp_path / "pool.onnx"
    export_onnx(net, x, path, 17)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ("GlobalAveragePool" in ops) == whole and ("AveragePool" in ops) != whole, ops
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, net(x).detach().numpy(), atol=1e-5)


def test_whole_window_pool_in_a_qdq_graph_runs_as_the_graph_says(tmp_path):
    """The same rewrite in a QDQ graph whose Pad sizes come from Cast/Constant chains (onnx's
    shape inference loses the spatial size there; onnxruntime's symbolic one does not): the
    fused integer kernels then compute what the graph says."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h

    from compresskit.backends.onnx_export import whole_window_pools

    c, size = 16, 2
    init = [h.make_tensor("s", T.FLOAT, [], [0.02]), h.make_tensor("z", T.UINT8, [], [128]),
            h.make_tensor("p", T.INT32, [8], [0, 0, 0, 0, 0, 0, 0, 0])]
    nodes = [h.make_node("Cast", ["p"], ["pads"], to=T.INT64),
             h.make_node("Pad", ["x", "pads"], ["padded"]),
             h.make_node("QuantizeLinear", ["padded", "s", "z"], ["q"]),
             h.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             h.make_node("AveragePool", ["d"], ["pooled"], kernel_shape=[32, 32],
                         strides=[32, 32], ceil_mode=1, count_include_pad=1),
             h.make_node("QuantizeLinear", ["pooled", "s", "z"], ["q2"]),
             h.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["n", c, 2, 2])],
                         [h.make_tensor_value_info("y", T.FLOAT, None)], init)
    path = tmp_path / "qdq.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    assert whole_window_pools(path) == 1
    x = np.random.default_rng(0).random((3, c, size, size), dtype=np.float32)
    out = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        out.append(ort.InferenceSession(str(path), options, providers=[
            "CPUExecutionProvider"]).run(None, {"x": x})[0])
    np.testing.assert_allclose(out[1], out[0], atol=0.021)  # one quantization step
    np.testing.assert_allclose(out[0].reshape(3, c), x.mean(axis=(2, 3)), atol=0.021)


def test_parity_holds_each_output_to_its_samples_scale(tmp_path):
    """Rounding in a network whose logits are near 20 moves a logit near zero by more than
    rtol of its own value: the check holds it to the sample's scale. A real difference, one
    far above rounding at that scale, still fails."""
    import numpy as np

    from compresskit.backends.onnx_export import export_onnx

    def linear(second: float) -> nn.Module:
        m = nn.Linear(1, 2)
        with torch.no_grad():
            m.weight.zero_()
            m.bias.copy_(torch.tensor([20.0, second]))
        return m.eval()

    x = np.ones((4, 1), np.float32)
    path = tmp_path / "m.onnx"
    export_onnx(linear(0.0003), torch.ones(1, 1), path, 17)
    near = export_stage.parity(linear(0.0), path, x, atol=1e-4, rtol=1e-3)
    assert near["within_tolerance"] and near["max_abs_diff"] == pytest.approx(3e-4, rel=1e-2)
    far = export_stage.parity(linear(0.5), path, x, atol=1e-4, rtol=1e-3)
    assert not far["within_tolerance"]

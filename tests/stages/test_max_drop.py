"""max_drop on qat and ptq: when the all-INT8 file loses more than the budget, the layers whose
float versions regain most per measured millisecond are kept in float until the drop holds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compresskit import api
from compresskit.backends import quant
from compresskit.errors import ConfigError, StageError

MODEL = '''
import torch
from torch import nn


class Outlier(nn.Module):
    """An MLP on digits whose exported first layer also reads 1000 in its first pixel (always 0
    in digits, so training leaves that weight column at 0 and the outputs do not change): one
    uint8 quantizer over [0, 1000] rounds every other pixel to zero, so fc1 must stay float."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 10)
        with torch.no_grad():
            self.fc1.weight[:, 0] = 0
        outlier = torch.zeros(64)
        outlier[0] = 1000.0
        self.register_buffer("outlier", outlier)

    def forward(self, x):
        x = x.flatten(1)
        if not self.training:
            x = x + self.outlier
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
'''


def pipeline(*stages: dict) -> dict:
    return {
        "name": "max-drop", "data": {"source": "digits", "batch_size": 64},
        "input": {"shape": [1, 8, 8]},
        "teacher": {"source": "outlier.py:Outlier"}, "student": {"source": "outlier.py:Outlier"},
        "stages": [{"type": "train", "model": "student", "epochs": 4, "lr": 0.003},
                   {"type": "export", "models": ["student"], "bundle": False}, *stages],
    }


def run(cfg: dict, tmp: Path) -> dict:
    (tmp / "outlier.py").write_text(MODEL)
    return api.run(cfg, base_dir=tmp, output_dir=tmp / "run", show_progress=False)


@pytest.mark.parametrize("stage", [{"type": "ptq"}, {"type": "qat", "epochs": 0}],
                         ids=["ptq", "qat"])
def test_the_layer_that_loses_the_accuracy_is_kept_in_float(tmp_path, stage):
    report = run(pipeline({**stage, "calibration_samples": 128, "max_drop": 1.0,
                           "min_int8_coverage": 0.5}), tmp_path)
    m = report["stages"][2]["metrics"]
    fallback = m["float_fallback"]
    assert fallback["drop_before"] > 20  # the pixels quantized to zero: near chance
    assert fallback["drop"] <= 1.0
    assert m["fp32_accuracy"] - m["accuracy"] <= 0.01
    kept = [k["layer"] for k in fallback["kept_float"]]
    assert [k.split("/")[-2] for k in kept] == ["fc1"], kept
    assert set(fallback["latency_ms"]) == {"all_int8", "kept_float"}
    # The file: the first layer runs in float, the two others as integer code.
    path = tmp_path / "run" / report["artifacts"][-1]["path"]
    assert [k.split("/")[-2] for k in quant.integer_layers(path)] == ["fc2", "fc3"]
    assert 0.5 <= m["int8_coverage"] < 0.9


def test_a_budget_the_coverage_floor_forbids_fails_and_writes_nothing(tmp_path):
    with pytest.raises(StageError, match="max_drop 1.0.*min_int8_coverage 0.99"):
        run(pipeline({"type": "ptq", "calibration_samples": 128, "max_drop": 1.0,
                      "min_int8_coverage": 0.99}), tmp_path)
    assert not (tmp_path / "run" / "artifacts" / "student.ptq.int8.onnx").exists()


def test_a_file_within_budget_is_left_as_it_is(tmp_path):
    report = run(pipeline({"type": "ptq", "calibration_samples": 128, "max_drop": 100,
                           "min_int8_coverage": 0.5},
                          {"type": "qat", "epochs": 0, "calibration_samples": 128,
                           "max_drop": 100, "min_int8_coverage": 0.5}), tmp_path)
    for stage in report["stages"][2:]:
        fallback = stage["metrics"]["float_fallback"]
        assert fallback["kept_float"] == [] and fallback["drop"] == fallback["drop_before"]
        assert fallback["drop_before"] > 20  # QAT without training keeps the outlier too


def test_dynamic_ptq_has_no_quantizers_to_take_out(tmp_path):
    with pytest.raises(ConfigError, match="max_drop"):
        run(pipeline({"type": "ptq", "dynamic": True, "max_drop": 1.0}), tmp_path)


def test_keep_float_runs_the_layer_on_the_float_tensor(tmp_path):
    """Every layer in float: the file computes the float model up to the int8 rounding of the
    weights; no layer in float: the file is unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 16)
    fp32 = tmp_path / "fp32.onnx"
    torch.onnx.export(model, (x[:2],), str(fp32), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    int8 = tmp_path / "int8.onnx"
    quant.ptq(fp32, int8, [x.numpy()], per_channel=True, reduce_range=True)
    layers = quant.integer_layers(int8)
    assert len(layers) == 2

    def outputs(path: Path) -> np.ndarray:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x.numpy()})[0]

    same = tmp_path / "none.onnx"
    quant.keep_float(int8, same, [])
    np.testing.assert_array_equal(outputs(same), outputs(int8))
    floated = tmp_path / "all.onnx"
    quant.keep_float(int8, floated, layers)
    onnx.checker.check_model(str(floated))
    assert quant.integer_layers(floated) == []
    with torch.no_grad():
        want = model(x).numpy()
    # What is left: the int8 rounding of the weights and the quantizer on the logits; the
    # quantizer that stood for the dropped ReLU still clips (without it: 0.5 off).
    err_float, err_int8 = (np.abs(outputs(p) - want).mean() for p in (floated, int8))
    assert err_float < err_int8, (err_float, err_int8)
    assert np.abs(outputs(floated) - want).max() < 0.05 * np.abs(want).max()


def _patch_embedding(path: Path, second_conv: bool, quantized_input: bool = True,
                     norm: bool = False, pads: int = 0) -> None:
    """x -> Q/DQ -> Conv (int8 weights) -> Add (a position table) [-> Conv]: a ViT's patch
    embedding, whose output NNCF leaves unquantized; `close_qdq` adds the output frame."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w_q", rng.integers(-127, 128, (8, 3, 4, 4), dtype=np.int8)),
        ("w_s", np.full(8, 0.01, np.float32)), ("w_z", np.zeros(8, np.int8)),
        ("x_s", np.array(1 / 255, np.float32)), ("x_z", np.array(0, np.uint8)),
        ("pos", rng.normal(size=(1, 8, 2, 2)).astype(np.float32))]]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
             helper.make_node("Conv", ["xd" if quantized_input else "x", "w"], ["patches"],
                              strides=[4, 4], pads=[pads] * 4, name="patch"),
             helper.make_node("Add", ["patches", "pos"], ["y" if not norm else "emb"])]
    if norm:  # tokens (batch, 4, 8) into a LayerNorm: a ViT's residual stream
        inits += [numpy_helper.from_array(np.array([0, 8, -1], np.int64), "shape"),
                  numpy_helper.from_array(np.ones(8, np.float32), "gamma")]
        nodes += [helper.make_node("Reshape", ["emb", "shape"], ["flat"]),
                  helper.make_node("Transpose", ["flat"], ["tokens"], perm=[0, 2, 1]),
                  helper.make_node("LayerNormalization", ["tokens", "gamma"], ["y"], axis=-1)]
    if second_conv:  # a conv that reads the patch conv's output: its quantizer must stay
        inits.append(numpy_helper.from_array(
            rng.integers(-127, 128, (4, 8, 1, 1), dtype=np.int8), "v_q"))
        inits += [numpy_helper.from_array(np.full(4, 0.01, np.float32), "v_s"),
                  numpy_helper.from_array(np.zeros(4, np.int8), "v_z")]
        nodes += [helper.make_node("DequantizeLinear", ["v_q", "v_s", "v_z"], ["v"], axis=0),
                  helper.make_node("Conv", ["patches", "v"], ["z"], name="mix")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if second_conv:
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    if pads:  # the position table follows the padded output
        inits[-1 if not norm else -3] = numpy_helper.from_array(
            np.random.default_rng(2).normal(size=(1, 8, 2 + (2 * pads > 3), 2 + (2 * pads > 3))
                                            ).astype(np.float32), "pos")
    graph = helper.make_graph(nodes, "patch", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [None, 3, 8, 8])], outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_a_conv_kept_float_takes_the_output_quantizer_added_for_it(tmp_path):
    """close_qdq quantizes a patch conv's output only so the conv can run as integer code; kept
    in float, the conv writes its float output again (that 8-bit copy of a ViT's residual
    stream cost its accuracy). Where another layer reads the quantized output, it stays."""
    x = np.random.default_rng(1).uniform(0, 1, (16, 3, 8, 8)).astype(np.float32)

    def outputs(path: Path) -> list[np.ndarray]:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"x": x})

    for second in (False, True):
        src, closed, floated = (tmp_path / f"{n}{second}.onnx" for n in ("src", "closed", "f"))
        _patch_embedding(src, second)
        shutil.copyfile(src, closed)
        assert "Conv patch output" in quant.close_qdq(closed, [x])
        conv = [layer for layer in quant.integer_layers(closed) if "patch" in layer]
        assert conv, quant.integer_layers(closed)
        quant.keep_float(closed, floated, conv)
        graph = onnx.load(str(floated)).graph
        quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
        patch = next(n for n in graph.node if n.name == "patch")
        assert (patch.output[0] in quantized) == second
        if not second:  # exactly the float conv on the float input: no rounding left
            want = tmp_path / "want.onnx"
            _patch_embedding(want, second, quantized_input=False)
            np.testing.assert_allclose(outputs(floated)[0], outputs(want)[0], rtol=1e-5,
                                       atol=1e-5)
            assert not np.allclose(outputs(closed)[0], outputs(want)[0], atol=1e-3)


@pytest.mark.parametrize("pads", [0, 2])
def test_a_patch_embedding_into_a_layernorm_runs_as_conv_integer(tmp_path, pads):
    """A conv whose output opens a LayerNorm stream keeps its integer products but not an
    8-bit output: ConvInteger, its int32 sums scaled to float, equal to the QDQ graph's
    dequantized conv (padding included: onnxruntime pads with the zero point)."""
    x = np.random.default_rng(1).uniform(0, 1, (16, 3, 8, 8)).astype(np.float32)
    src, closed = tmp_path / "src.onnx", tmp_path / "closed.onnx"
    _patch_embedding(src, False, norm=True, pads=pads)
    shutil.copyfile(src, closed)
    done = quant.close_qdq(closed, [x])
    assert "Conv patch as ConvInteger with a float output" in done
    assert not any("patch output" in d for d in done)
    ops = [n.op_type for n in onnx.load(str(closed)).graph.node]
    assert "ConvInteger" in ops and "Conv" not in ops

    def run(path: Path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"x": x})[0]

    np.testing.assert_allclose(run(closed), run(src), rtol=1e-4, atol=1e-4)
    optimized = quant.optimized_graph(closed, tmp_path / "opt.onnx")
    assert quant.int8_coverage(src, optimized)["int8_coverage"] == 1.0

"""max_drop on qat and ptq: when the all-INT8 file loses more than the budget, the layers whose
float versions regain most per measured millisecond are kept in float until the drop holds."""

from __future__ import annotations

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

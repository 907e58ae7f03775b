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

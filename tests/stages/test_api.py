"""Stages are callable from code with parameters built there, not only from YAML files."""

from __future__ import annotations

import pytest
import yaml

from compresskit import api
from compresskit.errors import ConfigError
from tests.conftest import TINY, workspace_with_models


def test_run_from_a_dict_with_overrides(tmp_path):
    workspace_with_models(tmp_path)
    pipeline = yaml.safe_load(TINY)
    pipeline["stages"] = [s for s in pipeline["stages"] if s["type"] == "export"]
    report = api.run(pipeline, ["stages.0.opset=18"],
                     base_dir=tmp_path, output_dir=tmp_path / "run", show_progress=False)
    assert [s["type"] for s in report["stages"]] == ["export"]
    assert (tmp_path / "run" / "artifacts" / "student.fp32.onnx").is_file()
    assert report["artifacts"][0]["opset"] == 18


def test_bad_dict_raises_config_error_with_key(tmp_path):
    with pytest.raises(ConfigError, match=r"<code>: stages\[0\]\.epochs: input should be"):
        api.run({"name": "x", "input": {"shape": [1]}, "stages": [{"type": "train",
                                                                    "epochs": 0}]},
                base_dir=tmp_path, output_dir=tmp_path / "run", show_progress=False)


def test_a_runs_resolved_yaml_validates_again(tmp_path):
    """resolved.yaml lists every default, those of options that apply only to other tasks and
    modes included; validating it again must not read them as options given."""
    workspace_with_models(tmp_path)
    pipeline = yaml.safe_load(TINY)
    pipeline["stages"] = [s for s in pipeline["stages"] if s["type"] in ("distill", "export")]
    pipeline["stages"].append({"type": "ptq"})
    api.run(pipeline, ["stages.0.epochs=1"], base_dir=tmp_path, output_dir=tmp_path / "run",
            show_progress=False)
    resolved = yaml.safe_load((tmp_path / "run" / "resolved.yaml").read_text())
    assert "cache_top_k" in resolved["stages"][0] and "bits" in resolved["stages"][-1]
    api.validate(resolved, base_dir=tmp_path)
    resolved["stages"][-1]["bits"] = 4  # a value given where it does not apply still fails
    with pytest.raises(ConfigError, match="bits and block_size apply to task causal-lm"):
        api.validate(resolved, base_dir=tmp_path)

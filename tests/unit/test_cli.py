"""The CLI starts instantly (no torch), and its commands answer without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from compresskit.cli import app

runner = CliRunner()


def _modules_after(code: str) -> set[str]:
    code += "\nimport sys\nprint(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_help_imports_no_heavy_library():
    loaded = _modules_after(
        "import sys\nfrom typer.testing import CliRunner\nfrom compresskit.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output")
    assert "compresskit.cli" in loaded
    for heavy in ("torch", "onnx", "onnxruntime", "nncf", "torch_pruning", "sklearn"):
        assert heavy not in loaded, heavy


def test_schema_only_validation_imports_no_torch(tiny_pipeline):
    loaded = _modules_after(
        "from typer.testing import CliRunner\nfrom compresskit.cli import app\n"
        f"r = CliRunner().invoke(app, ['validate', '--schema-only', r'{tiny_pipeline}'])\n"
        "assert r.exit_code == 0, r.output")
    assert "torch" not in loaded


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("run", "validate", "schema", "ls"):
        assert cmd in result.output


def test_schema_is_json_schema_with_descriptions():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["title"] == "PipelineConfig"
    distill = schema["$defs"]["DistillConfig"]["properties"]
    assert distill["temperature"]["default"] == 4.0
    assert distill["temperature"]["description"]


def test_ls_lists_stages_sources_targets():
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 0
    for name in ("train", "distill", "export", "benchmark", "digits", "cpu"):
        assert name in result.output


def test_validate_ok_and_bad_exit_codes(tiny_pipeline, write_pipeline):
    ok = runner.invoke(app, ["validate", str(tiny_pipeline)])
    assert ok.exit_code == 0, ok.output
    assert "ok (train -> distill -> export -> benchmark)" in ok.output
    bad = write_pipeline("name: x\ninput: {shape: [1]}\nstages: [{type: distil}]\n", "bad.yaml")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "unknown stage type 'distil' (did you mean 'distill'?)" in result.output
    assert "Traceback" not in result.output


def test_run_missing_file_exit_2():
    result = runner.invoke(app, ["run", "does/not/exist.yaml"])
    assert result.exit_code == 2
    assert "pipeline file not found" in result.output


def test_version():
    from compresskit import __version__
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output

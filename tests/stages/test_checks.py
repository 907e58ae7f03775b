"""Problems that need the model to find: each located at its key, with a clear message."""

from __future__ import annotations

import pytest
import torch

from compresskit import api
from compresskit.errors import ConfigError
from tests.conftest import TINY


def deep_problems(path):
    with pytest.raises(ConfigError) as e:
        api.validate(path)
    return [str(p) for p in e.value.problems]


def test_missing_model_file(write_pipeline):
    (msg,) = deep_problems(write_pipeline(TINY.replace("models/digits.py:student",
                                                       "models/nope.py:student")))
    assert ":6: student.source: file 'models/nope.py' not found" in msg


def test_missing_callable_suggests(write_pipeline):
    (msg,) = deep_problems(write_pipeline(TINY.replace("digits.py:student", "digits.py:studnt")))
    assert "has no 'studnt' (did you mean 'student'?)" in msg


def test_error_inside_users_module_is_shown(write_pipeline, tmp_path):
    (tmp_path / "models" / "broken.py").write_text("import torch\n\nx = 1 / 0\n")
    (msg,) = deep_problems(write_pipeline(TINY.replace("models/digits.py:student",
                                                       "models/broken.py:student")))
    assert "ZeroDivisionError: division by zero (line 3: x = 1 / 0)" in msg


def test_wrong_kwargs_and_not_a_module(write_pipeline, tmp_path):
    (tmp_path / "models" / "odd.py").write_text("def f():\n    return 3\n")
    msgs = deep_problems(write_pipeline(
        TINY.replace("kwargs: {width: 2}", "kwargs: {widht: 2}")
            .replace("models/digits.py:teacher, kwargs: {width: 4}", "models/odd.py:f")))
    assert any("teacher source 'models/odd.py:f' returned int, not a torch.nn.Module" in m
               for m in msgs)
    assert any("does not take kwargs {'widht': 2}" in m for m in msgs)


def test_missing_and_misfit_checkpoints(write_pipeline, tmp_path):
    torch.save({"stem.0.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    text = (TINY.replace("kwargs: {width: 4}}", "kwargs: {width: 4}, checkpoint: missing.pt}")
                .replace("kwargs: {width: 2}}", "kwargs: {width: 2}, checkpoint: bad.pt}"))
    msgs = deep_problems(write_pipeline(text))
    assert any("teacher.checkpoint: teacher checkpoint 'missing.pt' not found" in m for m in msgs)
    assert any("student.checkpoint:" in m and "does not fit the model" in m
               and "wrong shape: stem.0.weight [1] vs model [2, 1, 3, 3]" in m for m in msgs)


def test_pickled_object_checkpoint_is_refused(write_pipeline, tmp_path):
    torch.save({"w": object()}, tmp_path / "evil.pt")
    (msg,) = deep_problems(write_pipeline(
        TINY.replace("kwargs: {width: 2}}", "kwargs: {width: 2}, checkpoint: evil.pt}")))
    assert "cannot be read as a state_dict" in msg


def test_checkpoint_that_fits_is_loaded(write_pipeline, tmp_path):
    from models.digits import student

    torch.manual_seed(5)
    torch.save(student(2).state_dict(), tmp_path / "good.pt")
    path = write_pipeline(TINY.replace("kwargs: {width: 2}}",
                                       "kwargs: {width: 2}, checkpoint: good.pt}"))
    api.validate(path)


def test_input_shape_rejected_by_model(write_pipeline):
    msgs = deep_problems(write_pipeline(TINY.replace("shape: [1, 8, 8]", "shape: [3, 8, 8]")))
    assert len(msgs) == 2
    assert ":4: input.shape: the teacher rejects input.shape [3, 8, 8]" in msgs[0]
    assert ":4: input.shape: the student rejects input.shape [3, 8, 8]" in msgs[1]


def test_unknown_data_source(write_pipeline):
    (msg,) = deep_problems(write_pipeline(TINY.replace("source: digits", "source: digts")))
    assert "data.source: unknown data source 'digts' (did you mean 'digits'?)" in msg


def test_a_checkpoint_is_known_by_its_bytes_not_its_path(write_pipeline, tmp_path):
    """The stage cache keys a model's checkpoint by its contents: the same file under another
    path (a teacher trained in one run folder, read from another) keeps every cached stage;
    other weights at the same path do not."""
    from compresskit.engine.loader import load_pipeline
    from compresskit.engine.runner import model_hashes
    from models.digits import student

    torch.manual_seed(5)
    torch.save(student(2).state_dict(), tmp_path / "good.pt")
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "good.pt").write_bytes((tmp_path / "good.pt").read_bytes())

    def student_hash(checkpoint: str) -> str:
        text = TINY.replace("kwargs: {width: 2}}",
                            f"kwargs: {{width: 2}}, checkpoint: {checkpoint}}}")
        return model_hashes(load_pipeline(write_pipeline(text)))["student"]

    first = student_hash("good.pt")
    assert student_hash("moved/good.pt") == first
    torch.save(student(2).state_dict(), tmp_path / "good.pt")  # other random weights
    assert student_hash("good.pt") != first

"""Broken pipeline files: each is exit 2 with a message naming the key or line, quickly, and no
random YAML document makes the loader raise anything but ConfigError."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch  # noqa: F401  (imported once here, so each file's time is the check's own)
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compresskit.cli import app
from compresskit.engine.loader import load_pipeline
from compresskit.errors import ConfigError
from tests.conftest import ROOT

CORPUS = sorted((ROOT / "tests" / "corpus" / "broken").iterdir())
SPECIAL = {"empty.yaml": "the file is empty", "binary_junk.yaml": "binary file"}


def expected(path: Path) -> str:
    if path.name in SPECIAL:
        return SPECIAL[path.name]
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ")


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_broken_file_exits_2_with_located_message(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # sources like models/digits.py resolve from the repo root
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["validate", str(path)])
    seconds = time.perf_counter() - start
    assert result.exit_code == 2, result.output
    assert expected(path) in result.output
    assert "Traceback" not in result.output
    # every message names the file and either its line or the key
    assert re.search(re.escape(str(path)) + r"(:\d+)?: ", result.output), result.output
    assert seconds < 10.0  # validation builds no model; a guard against heavy work, not a timing


def test_ten_megabyte_file(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"name: x\n" + b"# padding\n" * 1_000_000)
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["validate", str(big)])
    assert result.exit_code == 2
    assert "a pipeline file is a small YAML document" in result.output
    assert time.perf_counter() - start < 10.0  # refused before parsing, on any CPU


KEYS = ["name", "seed", "data", "input", "teacher", "student", "stages", "type", "epochs",
        "source", "shape", "batch_size", "alpha", "temperature", "models", "targets", "kwargs",
        "train", "distill", "export", "benchmark", "checkpoint", "lr", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                    st.sampled_from(KEYS), st.text(max_size=8))
documents = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(KEYS), children, max_size=5)),
    max_leaves=20)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents)
def test_random_documents_only_raise_config_error(doc, tmp_path):
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_pipeline(path)
    except ConfigError as e:
        assert e.problems and all(str(p) for p in e.problems)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_random_text_only_raises_config_error(text, tmp_path):
    path = tmp_path / "random.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_pipeline(path)
    except ConfigError as e:
        assert e.problems

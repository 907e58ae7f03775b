"""Every stage type keeps the contract a newcomer relies on: one descriptor, a config whose
every key says what it does, a module with a docstring and `run`, an example pipeline that uses
it and validates, a row in the README's stage table, and a line in `compresskit ls`."""

from __future__ import annotations

import importlib
import inspect

import pytest
import yaml

from compresskit import api
from compresskit.config import STAGE_CONFIGS
from compresskit.stages import STAGES
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_the_schema_is_derived_from_the_descriptors():
    assert STAGE_CONFIGS == {name: stage.config for name, stage in STAGES.items()}
    stage_files = {p.stem for p in (ROOT / "compresskit" / "stages").glob("*.py")
                   if not p.stem.startswith("_")}
    assert stage_files == set(STAGES)  # one module per YAML type, nothing else public


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_contract(name):
    stage = STAGES.get(name)
    assert stage.config.__doc__ and stage.config.__doc__.strip()
    for key, field in stage.config.model_fields.items():
        if key != "type":
            assert field.description, f"{name}.{key} has no description"
    module = importlib.import_module(stage.module)
    assert module.__doc__ and module.__doc__.strip().startswith(f"`{name}`")
    assert list(inspect.signature(module.run).parameters) == ["cfg", "ctx"]
    example = ROOT / stage.example
    types = [s["type"] for s in yaml.safe_load(example.read_text())["stages"]]
    assert name in types, f"{stage.example} does not use {name}"
    api.validate(example, deep=False)
    assert f"| `{name}` |" in README


def test_ls_lists_every_stage():
    from typer.testing import CliRunner

    from compresskit.cli import app

    shown = CliRunner().invoke(app, ["ls", "stages"]).output
    assert all(name in shown for name in STAGES)

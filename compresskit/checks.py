"""Checks that need the models: sources resolve, checkpoints fit, the input shape is accepted.

Run by `validate` and before the first stage of `run`, so every problem surfaces before any
heavy work, each located at its key's line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from compresskit.errors import ConfigError, Problem
from compresskit.loader import LoadedPipeline
from compresskit.sources import SourceError, resolve

if TYPE_CHECKING:
    from torch import nn

ROLES = ("teacher", "student")


def model_seed(seed: int, role: str) -> int:
    """Each model gets its own seed, so building one never shifts the other's initialisation."""
    return seed * 1000 + ROLES.index(role)


def deep_check(loaded: LoadedPipeline) -> dict[str, nn.Module]:
    """Build every configured model and run one dry forward pass; return the built models."""
    from compresskit import modelio

    cfg = loaded.config
    problems: list[Problem] = []
    models: dict[str, nn.Module] = {}
    if ":" in cfg.data.source:
        try:
            resolve(cfg.data.source, loaded.base_dir)
        except SourceError as e:
            problems.append(loaded.problem(("data", "source"), str(e)))
    else:
        from compresskit.data import DATASETS

        if cfg.data.source not in DATASETS:
            try:
                DATASETS.get(cfg.data.source)
            except KeyError as e:
                problems.append(loaded.problem(("data", "source"), str(e.args[0])))
    for role in ROLES:
        mcfg = getattr(cfg, role)
        if mcfg is None:
            continue
        try:
            model = modelio.instantiate(mcfg, role, loaded.base_dir, model_seed(cfg.seed, role))
        except modelio.ModelError as e:
            problems.append(loaded.problem((role, "source"), str(e)))
            continue
        try:
            modelio.load_checkpoint(model, mcfg, role, loaded.base_dir)
        except modelio.ModelError as e:
            problems.append(loaded.problem((role, "checkpoint"), str(e)))
            continue
        try:
            modelio.dry_forward(model, cfg.input, role)
        except modelio.ModelError as e:
            problems.append(loaded.problem(("input", "shape"), str(e)))
            continue
        models[role] = model
    if problems:
        raise ConfigError(problems)
    return models

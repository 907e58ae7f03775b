"""Intermediate outputs of named modules (forward hooks), and the adapters that bridge a
student's feature width to a teacher's."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compresskit.registry import closest


class FeatureError(Exception):
    """A feature name or shape the user asked for that cannot work; the message says why."""


def module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def check_names(model: nn.Module, names: list[str], who: str) -> list[str]:
    """Problems with module names that `model` does not have, each with the closest names."""
    known = module_names(model)
    problems = []
    for name in names:
        if name not in known:
            close = closest(name, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
                f"; its modules include {', '.join(known[:8])}"
            problems.append(f"the {who} has no module named '{name}'{hint}")
    return problems


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class Taps:
    """Forward hooks keeping the latest output of each named module (the first tensor of a
    tuple output). `out` holds them after each forward pass; `close()` removes the hooks."""

    def __init__(self, model: nn.Module, names: list[str], who: str = "model"):
        problems = check_names(model, names, who)
        if problems:
            raise FeatureError("; ".join(problems))
        modules = dict(model.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self._hooks = [modules[n].register_forward_hook(self._keeper(n))
                       for n in dict.fromkeys(names)]

    def _keeper(self, name: str) -> Any:
        def keep(_m: nn.Module, _i: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None:
                self.out[name] = tensor
        return keep

    def take(self, name: str) -> torch.Tensor:
        if name not in self.out:
            raise FeatureError(f"module '{name}' did not run in the forward pass, or returned "
                               "no tensor; pick a module that does")
        return self.out[name]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def adapter(student: tuple[int, ...], teacher: tuple[int, ...], what: str) -> nn.Module | None:
    """None when the shapes (without batch) match; a 1x1 convolution when only the channels of
    a [C, H, W] map differ; a Linear when only the last dimension of a vector or sequence
    differs. Anything else cannot be bridged and raises FeatureError."""
    if student == teacher:
        return None
    if len(student) == len(teacher) == 3 and student[1:] == teacher[1:]:
        return nn.Conv2d(student[0], teacher[0], kernel_size=1, bias=False)
    if len(student) == len(teacher) and len(student) in (1, 2) and student[:-1] == teacher[:-1]:
        return nn.Linear(student[-1], teacher[-1], bias=False)
    raise FeatureError(
        f"{what}: the student's output has shape {list(student)} and the teacher's "
        f"{list(teacher)} (without batch); an adapter can only bridge a different channel "
        "count ([C, H, W] maps with the same H and W) or a different last dimension. Pick "
        "modules at the same resolution")

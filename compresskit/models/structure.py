"""Structural edits as data, so a pruned or factorised model can be rebuilt exactly.

torch-pruning and factorisation change a module's shapes; a plain state_dict no longer fits the
class the model's `source:` builds. Each compressing stage records what it changed as a JSON edit;
loading replays the edits on a freshly built model, then loads the weights strictly. Nothing is
unpickled (torch-pruning's own `tp.state_dict` pickles whole modules).

Two kinds of edit:
- reshape: per module, the scalar attributes (in_channels, num_heads, ...) and the tensor shapes
  that differ from before the stage. Replaying sets them and allocates tensors of those shapes.
- lowrank: per module, the kind (linear/conv) and rank it was factorised to.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compresskit.engine.artifacts import Structure

SCALARS = (int, float, bool, str, type(None))


def _jsonable(value: Any) -> bool:
    if isinstance(value, SCALARS):
        return True
    return isinstance(value, tuple | list) and all(isinstance(v, SCALARS) for v in value)


def snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per module: its own scalar attributes and the shapes of its own tensors."""
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(module).items()
                 if not k.startswith("_") and k != "training" and _jsonable(v)}
        shapes = {k: list(t.shape) for k, t in [*module._parameters.items(),
                                                *module._buffers.items()] if t is not None}
        out[name] = {"type": type(module).__name__, "attrs": attrs, "shapes": shapes}
    return out


def reshape_edit(before: dict[str, dict[str, Any]],
                 after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What changed between two snapshots of the same module tree."""
    changed: dict[str, Any] = {}
    for name, now in after.items():
        was = before.get(name)
        if was is None or was["type"] != now["type"]:
            raise ValueError(f"module '{name}' appeared or changed type during pruning")
        attrs = {k: v for k, v in now["attrs"].items() if was["attrs"].get(k) != v}
        shapes = {k: v for k, v in now["shapes"].items() if was["shapes"].get(k) != v}
        if attrs or shapes:
            changed[name] = {"attrs": attrs, "shapes": shapes}
    return {"op": "reshape", "modules": changed}


def lowrank_edit(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"op": "lowrank", "layers": layers}


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(get_module(model, parent), child, new)


def _reshape(model: nn.Module, modules: dict[str, Any]) -> None:
    for name, change in modules.items():
        module = get_module(model, name)
        for key, value in change["attrs"].items():
            old = getattr(module, key, None)
            setattr(module, key, tuple(value) if isinstance(old, tuple) else value)
        for key, shape in change["shapes"].items():
            old_p = module._parameters.get(key)
            if old_p is not None:
                module._parameters[key] = nn.Parameter(
                    old_p.new_empty(shape), requires_grad=old_p.requires_grad)
            elif key in module._buffers and module._buffers[key] is not None:
                module._buffers[key] = module._buffers[key].new_empty(shape)  # type: ignore[union-attr]
            else:
                raise KeyError(f"module '{name}' has no tensor '{key}'")


def _lowrank(model: nn.Module, layers: dict[str, Any]) -> None:
    from compresskit.ops.lowrank import factorize_conv, factorize_linear

    for name, spec in layers.items():
        layer = get_module(model, name)
        build = factorize_linear if spec["kind"] == "linear" else factorize_conv
        set_module(model, name, build(layer, int(spec["rank"]), weights=False))  # type: ignore[arg-type]


def layer_list(model: nn.Module, path: str | None) -> tuple[str, nn.ModuleList]:
    """The transformer layer list: the module at `path`, or the longest ModuleList whose
    blocks are all of one type."""
    if path is not None:
        for name in (path, f"model.{path}"):
            try:
                found = get_module(model, name)
            except AttributeError:
                continue
            if isinstance(found, nn.ModuleList):
                return name, found
        raise ValueError(f"from_teacher.path '{path}' is not a torch.nn.ModuleList in the "
                         "teacher")
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 \
                and len({type(m) for m in module}) == 1 \
                and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError("the teacher has no list of repeated layers (a torch.nn.ModuleList of "
                         "identical blocks) to take layers from; set from_teacher.path")
    return best


def layers_edit(path: str | None, keep: list[int]) -> dict[str, Any]:
    return {"op": "layers", "path": path, "keep": list(keep)}


def _layers(model: nn.Module, path: str | None, keep: list[int]) -> None:
    name, layers = layer_list(model, path)
    bad = [i for i in keep if i >= len(layers)]
    if bad:
        raise ValueError(f"from_teacher.layers has {bad[0]}, but the teacher's '{name}' has "
                         f"{len(layers)} layers (0 to {len(layers) - 1})")
    kept = nn.ModuleList([layers[i] for i in keep])
    set_module(model, name, kept)
    for j, layer in enumerate(kept):
        module: Any
        for module in layer.modules():  # decoders index their KV cache by the layer's number
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = j
    seen: set[int] = set()
    for module in model.modules():  # Hugging Face models read the count from their config
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers") \
                and id(config) not in seen:
            seen.add(id(config))
            types = getattr(config, "layer_types", None)
            if isinstance(types, list) and len(types) == config.num_hidden_layers:
                config.layer_types = [types[i] for i in keep]
            config.num_hidden_layers = len(keep)


def apply(model: nn.Module, edits: list[dict[str, Any]]) -> nn.Module:
    """Replay recorded edits, in order, on a model built from its source (weights follow)."""
    with torch.no_grad():
        for edit in edits:
            if edit["op"] == "reshape":
                _reshape(model, edit["modules"])
            elif edit["op"] == "lowrank":
                _lowrank(model, edit["layers"])
            elif edit["op"] == "layers":
                _layers(model, edit["path"], edit["keep"])
            else:
                raise ValueError(f"unknown structural edit '{edit['op']}'")
    return model


def plain(role: str) -> Structure:
    """A model as its own source builds it: no structural edits."""
    return {"base": role, "edits": []}


def initial_structure(cfg: Any, role: str) -> Structure:
    """How a model is first built: from its own source, or (from_teacher) from the teacher
    with only the chosen layers kept."""
    section = cfg.model_sections().get(role)
    origin = section[1].from_teacher if section is not None else None
    if origin is None:
        return plain(role)
    return {"base": "teacher", "edits": [layers_edit(origin.path, origin.layers)]}

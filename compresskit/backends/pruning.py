"""torch-pruning (DepGraph) adapter: importance criteria, attention heads, pruners, ratio search.

The only module that imports torch_pruning.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from compresskit.inputs import call

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads")
QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"),
             ("qkv",), ("in_proj",))


class PruneError(Exception):
    """Pruning cannot be done as configured; the message says what to change."""


def importance(name: str) -> Any:
    imp = tp.importance
    return {
        "l1": lambda: imp.GroupMagnitudeImportance(p=1),
        "l2": lambda: imp.GroupMagnitudeImportance(p=2),
        "taylor": lambda: imp.GroupTaylorImportance(),
        "lamp": lambda: imp.LAMPImportance(p=2),
        "bn_scale": lambda: imp.BNScaleImportance(),
        "fpgm": lambda: imp.FPGMImportance(),
    }[name]()


def attention_modules(model: nn.Module) -> list[tuple[nn.Module, str, list[nn.Linear]]]:
    """(module, head-count attribute, its q/k/v projections) for custom attention modules."""
    found = []
    for module in model.modules():
        attr = next((a for a in HEAD_ATTRS if isinstance(getattr(module, a, None), int)), None)
        if attr is None:
            continue
        for names in QKV_NAMES:
            layers = [getattr(module, n, None) for n in names]
            linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
            if len(linears) == len(names):
                found.append((module, attr, linears))
                break
    return found


def leaf_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the Conv/Linear modules in the order the forward pass calls them."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(names[m]))
             for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d
                                                    | nn.Linear)]
    try:
        with torch.no_grad():
            call(model.eval(), example)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def count(model: nn.Module, example: torch.Tensor) -> tuple[float, int]:
    macs, params = tp.utils.count_ops_and_params(model, example)
    return float(macs), int(params)


def make_pruner(model: nn.Module, example: torch.Tensor, *, criterion: str, ratio: float,
                steps: int, ignored: list[str], global_ranking: bool,
                max_layer_ratio: float, round_to: int | None, heads: bool) -> Any:
    attn = attention_modules(model) if heads else []
    num_heads = {layer: getattr(mod, attr) for mod, attr, layers in attn for layer in layers}
    mha = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    modules = dict(model.named_modules())
    num_heads.update({m: m.num_heads for m in mha})  # type: ignore[misc]
    try:
        return tp.pruner.MetaPruner(
            model, example, importance=importance(criterion), pruning_ratio=ratio,
            iterative_steps=steps, ignored_layers=[modules[n] for n in ignored],
            global_pruning=global_ranking,
            max_pruning_ratio=max_layer_ratio if global_ranking else 1.0, round_to=round_to,
            num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
            head_pruning_ratio=ratio if num_heads else 0.0)
    except Exception as e:  # tracing runs the user's forward: anything can surface here
        raise PruneError(f"torch-pruning could not trace the model's dependency graph "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                         "Add the module that fails to 'ignore', or prune a model without "
                         "data-dependent control flow") from None


def step(pruner: Any, model: nn.Module) -> None:
    """One pruning step, then the head counts of custom attention modules follow their q/k/v."""
    pruner.step()
    for mod, attr, layers in attention_modules(model):
        if layers[0] in pruner.num_heads:
            setattr(mod, attr, int(pruner.num_heads[layers[0]]))
            for size_attr in ("all_head_size", "inner_dim"):
                if isinstance(getattr(mod, size_attr, None), int):
                    setattr(mod, size_attr, layers[0].out_features // (3 if len(layers) == 1
                                                                         else 1))


def ratio_for_target(model: nn.Module, example: torch.Tensor, measure: Callable[[nn.Module], float],
                     target: float, **pruner_args: Any) -> tuple[float, float]:
    """The smallest per-group ratio whose one-shot pruning keeps at most `target` of
    measure(model); returns (ratio, fraction kept at that ratio). Raises when even the largest
    ratio keeps more."""
    base = measure(model)

    def kept(r: float) -> float:
        trial = copy.deepcopy(model)
        p = make_pruner(trial, example, ratio=r, steps=1, **pruner_args)
        step(p, trial)
        return measure(trial) / base

    # torch-pruning skips a group that a ratio would empty, so the most that can be removed
    # is not always at the largest ratio: take the best of a few.
    at_hi, hi = min((kept(r), r) for r in (0.95, 0.9, 0.8, 0.7))
    if at_hi > target:
        raise PruneError(f"even removing {hi:.0%} of every prunable group keeps {at_hi:.0%} "
                         f"(target {target:.0%}); the kept layers ('ignore', the first and last "
                         "layer) hold too much of it. Raise the target or ignore fewer layers")
    lo, at = 0.0, at_hi
    for _ in range(12):
        mid = (lo + hi) / 2
        k = kept(mid)
        if k <= target:
            hi, at = mid, k
        else:
            lo = mid
    return hi, at

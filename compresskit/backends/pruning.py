"""torch-pruning (DepGraph) adapter: importance criteria, attention heads, pruners, ratio search.

The only module that imports torch_pruning.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from compresskit.models.inputs import call

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads")
QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin"),
             ("q", "k", "v"), ("qkv",), ("in_proj",))


class PruneError(Exception):
    """Pruning cannot be done as configured; the message says what to change."""


class TraceError(PruneError):
    """torch-pruning cannot build the model's dependency graph at all."""


Feed = Callable[[nn.Module], None]
"""Runs calibration batches through a model (for importance measured on activations)."""


class ActivationImportance(tp.importance.GroupMagnitudeImportance):
    """How much each channel feeds the layers that read it, on real data (the Wanda and
    Minitron criterion): for every Linear or convolution in the group that takes the channel as
    an input, the root-mean-square of that input over the calibration batches times the L2
    norm of the weights reading it, summed over those layers. A channel that is large but read
    by small weights, or read by large weights but always near zero, ranks low; weight
    magnitude alone sees only the second half. Groups with no such reader (a query-key
    product, a model output) fall back to weight magnitude."""

    def __init__(self, model: nn.Module, feed: Feed):
        super().__init__(p=2)
        self.model, self.feed = model, feed
        self.sumsq: dict[nn.Module, torch.Tensor] = {}

    def _measure(self) -> None:
        """Per-input-channel mean squares of every Linear and convolution, on the model as it
        is now (widths change between iterative steps)."""
        sums: dict[nn.Module, list[Any]] = {}

        def keep(m: nn.Module, inputs: tuple[Any, ...], _out: Any) -> None:
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            if x is None or not x.is_floating_point():
                return
            x = x.detach().float()
            dims = [d for d in range(x.dim()) if d != (x.dim() - 1 if isinstance(m, nn.Linear)
                                                       else 1)]
            total = sums.setdefault(m, [0.0, 0])
            total[0] = total[0] + x.pow(2).sum(dim=dims)
            total[1] += x.numel() // x.shape[-1 if isinstance(m, nn.Linear) else 1]

        hooks = [m.register_forward_hook(keep) for m in self.model.modules()
                 if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)]
        try:
            with torch.no_grad():
                self.feed(self.model)
        finally:
            for h in hooks:
                h.remove()
        self.sumsq = {m: s / max(n, 1) for m, (s, n) in sums.items()
                      if isinstance(s, torch.Tensor)}

    def _width(self, layer: nn.Module) -> int:
        return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        readers = [(dep.layer, idxs, group[i].root_idxs) for i, (dep, idxs) in enumerate(group)
                   if dep.pruning_fn in (tp.pruner.function.prune_linear_in_channels,
                                         tp.pruner.function.prune_conv_in_channels)
                   and isinstance(dep.layer, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
                   and getattr(dep.layer, "groups", 1) == 1]
        if any(r not in self.sumsq or self.sumsq[r].numel() != self._width(r)
               for r, _, _ in readers):
            self._measure()
        scores, roots = [], []
        for layer, idxs, root_idxs in readers:
            if layer not in self.sumsq or any(r is None for r in root_idxs):
                continue
            w = layer.weight.detach().transpose(0, 1).flatten(1)  # [in, out * kernel]
            scores.append((w.pow(2).sum(1).sqrt() * self.sumsq[layer].sqrt())[idxs])
            roots.append(root_idxs)
        if not scores:
            return super().__call__(group)
        return self._normalize(self._reduce(scores, roots), self.normalizer)


def importance(name: str, model: nn.Module | None = None, feed: Feed | None = None) -> Any:
    imp = tp.importance
    if name == "activation":
        if model is None or feed is None:
            raise PruneError("activation importance needs calibration batches")
        return ActivationImportance(model, feed)
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
    """Names of the Conv/Linear/Embedding modules in the order the forward pass calls them (a
    token model's first layer is its embedding, not the first projection of its first block)."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(names[m]))
             for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d
                                                    | nn.Linear | nn.Embedding)]
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
                max_layer_ratio: float, round_to: int | None, heads: bool,
                ratios: dict[str, float] | None = None, feed: Feed | None = None) -> Any:
    """A torch-pruning MetaPruner; `ratios` (a group's root layer name -> ratio) prunes those
    groups at their own ratios and every other group at `ratio`; `feed` runs the calibration
    batches that criterion 'activation' measures."""
    attn = attention_modules(model) if heads else []
    num_heads = {layer: getattr(mod, attr) for mod, attr, layers in attn for layer in layers}
    modules = dict(model.named_modules())
    # nn.MultiheadAttention is left to torch-pruning's own MHA pruner: its head pruning
    # expects q/k/v Linear layers and fails on the fused in_proj (torch-pruning 1.6).
    scorer = importance(criterion, model, feed)  # our own error, not a tracing failure
    try:
        pruner = tp.pruner.MetaPruner(
            model, example, importance=scorer, pruning_ratio=ratio,
            iterative_steps=steps, ignored_layers=[modules[n] for n in ignored],
            global_pruning=global_ranking,
            pruning_ratio_dict={modules[n]: r for n, r in (ratios or {}).items()} or None,
            max_pruning_ratio=max_layer_ratio if global_ranking else 1.0, round_to=round_to,
            num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
            head_pruning_ratio=ratio if num_heads else 0.0)
    except Exception as e:  # tracing runs the user's forward: anything can surface here
        raise TraceError(f"torch-pruning could not trace the model's dependency graph "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                         "Add the module that fails to 'ignore', or prune a model without "
                         "data-dependent control flow") from None
    _unsafe_when_unscored(pruner, model)
    return pruner


def _unsafe_when_unscored(pruner: Any, model: nn.Module) -> None:
    """A group whose channels torch-pruning cannot score (its index mapping through a concat or
    split points past a layer's width: timm's efficientvit_b0, "index 792 is out of bounds for
    dimension 0 with size 192") raises UnsafeGroup naming it, as a group that breaks the
    forward does, instead of failing the whole step: `unsafe_layers` then leaves that group
    whole and prunes the others."""
    names = {m: n for n, m in model.named_modules()}
    score = pruner.estimate_importance

    def estimate(group: Any) -> Any:
        try:
            return score(group)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsafeGroup(names.get(group[0].dep.target.module, "?"),
                              f"torch-pruning cannot score its channels ({type(e).__name__}: "
                              f"{first})"[:200], _writers(pruner, group, names)) from None

    pruner.estimate_importance = estimate


def _writers(pruner: Any, group: Any, names: dict[nn.Module, str]) -> list[str]:
    """The layers whose outputs the group prunes: ignoring any one of them skips the group.
    Those it prunes only the inputs of (the next Linear reading a transformer's hidden states)
    root groups of their own that may be safe."""
    return list(dict.fromkeys(
        names[d.target.module] for d, _ in group
        if isinstance(d.target.module, nn.Module) and d.target.module in names
        and names[d.target.module] and pruner.DG.is_out_channel_pruning_fn(d.handler)
        and any(True for _ in d.target.module.parameters(recurse=False))))


@contextlib.contextmanager
def time_limit(seconds: int, what: str) -> Iterator[None]:
    """Raise TraceError when the block runs longer than `seconds` (main thread only, where
    SIGALRM is delivered): torch-pruning's graph tracing can run away on some models."""
    if threading.current_thread() is not threading.main_thread() or \
            not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TraceError(f"{what} took more than {seconds} s (trace_seconds) and was "
                         "stopped; torch-pruning's tracing runs away on some models (window "
                         "attention). Add such modules to 'ignore' to prune the rest")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class UnsafeGroup(Exception):
    """Pruning the group rooted at `layer` breaks the model's forward pass."""

    def __init__(self, layer: str, reason: str, layers: list[str]):
        super().__init__(f"{layer}: {reason}")
        self.layer, self.reason, self.layers = layer, reason, layers


def step(pruner: Any, model: nn.Module, check: Callable[[], None] | None = None) -> None:
    """One pruning step, group by group; the head counts of custom attention modules follow
    their q/k/v. With `check` (a forward pass that raises), a group whose pruning breaks the
    model stops the step with UnsafeGroup naming the group's root layer."""
    names = {m: n for n, m in model.named_modules()}
    groups = pruner.step(interactive=True)
    while True:
        try:
            group = next(groups)
        except StopIteration:
            break
        except UnsafeGroup:
            raise
        except Exception as e:  # torch-pruning's own failure on this model
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise TraceError(f"torch-pruning failed while pruning ({type(e).__name__}: "
                             f"{first})") from None
        extras = _extra_outputs(pruner, group)
        group.prune()
        for layer, name, keep in extras:
            _index_tensor(layer, name, keep)
        _follow_heads(pruner, model)
        if check is not None:
            try:
                check()
            except TraceError:  # the time budget ran out during the forward pass
                raise
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UnsafeGroup(names.get(group[0].dep.target.module, "?"),
                                  f"{type(e).__name__}: {first}"[:200],
                                  _writers(pruner, group, names)) from None


WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _extra_outputs(pruner: Any, group: Any) -> list[tuple[nn.Module, str, list[int]]]:
    """Per-output-channel tensors that a Linear or conv subclass keeps beside its weight and
    bias (timm's ScaledStdConv2d `gain` in NF-Nets, shaped [out, 1, 1, 1]), and the channels
    of each that the group keeps: torch-pruning prunes only weight and bias of the layers it
    knows, so the layer's forward would fail on the next batch."""
    found = []
    for dep, idxs in group:
        layer = dep.target.module
        if type(layer) in WEIGHTED or not isinstance(layer, WEIGHTED) \
                or not pruner.DG.is_out_channel_pruning_fn(dep.handler):
            continue
        out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        keep = sorted(set(range(out)) - {int(i) for i in idxs})
        for name, t in [*layer._parameters.items(), *layer._buffers.items()]:
            if name not in ("weight", "bias") and t is not None and t.dim() >= 1 \
                    and t.shape[0] == out:
                found.append((layer, name, keep))
    return found


def _index_tensor(layer: nn.Module, name: str, keep: list[int]) -> None:
    index = torch.tensor(keep, dtype=torch.long)
    if name in layer._parameters:
        old = layer._parameters[name]
        assert old is not None
        layer._parameters[name] = nn.Parameter(old.data.index_select(0, index).clone(),
                                               requires_grad=old.requires_grad)
    else:
        layer._buffers[name] = layer._buffers[name].index_select(0, index).clone()  # type: ignore[union-attr]


def _follow_heads(pruner: Any, model: nn.Module) -> None:
    """Head counts, and the widths derived from them, follow the pruned projections."""
    for mod, attr, layers in attention_modules(model):
        if layers[0] in pruner.num_heads:
            heads = int(pruner.num_heads[layers[0]])
            old = getattr(mod, attr)
            if heads == old:
                continue
            setattr(mod, attr, heads)
            for size_attr in ("all_head_size", "inner_dim", "dim"):
                width = getattr(mod, size_attr, None)
                per_head = getattr(mod, "attention_head_size", getattr(mod, "head_dim", None))
                if isinstance(width, int) and isinstance(per_head, int) \
                        and width == old * per_head:
                    setattr(mod, size_attr, heads * per_head)
                elif size_attr != "dim" and isinstance(width, int):
                    setattr(mod, size_attr, layers[0].out_features // (3 if len(layers) == 1
                                                                         else 1))


def unsafe_layers(model: nn.Module, example: Any, ratio: float, ignored: list[str],
                  max_tries: int = 20, **pruner_args: Any) -> dict[str, str]:
    """Layers of the groups whose pruning at `ratio` breaks the forward pass (a reshape by a
    hard-coded size, a channel split torch-pruning cannot follow), with why: found on trial
    copies, pruning group by group and running the forward after each, so the real pruning
    leaves every layer of such a group whole."""
    with torch.no_grad():
        want = tuple(call(model.eval(), example).shape)
    found: dict[str, str] = {}
    for _ in range(max_tries):
        trial = copy.deepcopy(model)

        def check() -> None:
            with torch.no_grad():
                got = tuple(call(trial.eval(), example).shape)  # noqa: B023
            if got != want:
                raise ValueError(f"the output shape became {list(got)}")

        pruner = make_pruner(trial, example, ratio=ratio, steps=1,
                             ignored=[*ignored, *found], **pruner_args)
        try:
            step(pruner, trial, check)
            return found
        except UnsafeGroup as e:
            fresh = [n for n in e.layers or [e.layer] if n not in found and n != "?"]
            if not fresh:
                break
            found.update({n: f"in the group of {e.layer}: {e.reason}" for n in fresh})
    raise PruneError("pruning keeps breaking the forward pass (" + "; ".join(
        f"{k}: {v}" for k, v in found.items()) + "); add the modules that hard-code sizes "
        "to 'ignore'")


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


def group_roots(model: nn.Module, example: Any, **pruner_args: Any) -> list[str]:
    """The root layer of every group the pruner would prune (in its order), found on a copy
    without pruning anything: the units a per-group plan gives ratios to."""
    trial = copy.deepcopy(model)
    names = {m: n for n, m in trial.named_modules()}
    pruner = make_pruner(trial, example, **{**pruner_args, "ratio": 0.5, "steps": 1})
    roots = []
    for group in pruner.step(interactive=True):
        root = names.get(group[0].dep.target.module)
        if root:
            roots.append(root)
    return list(dict.fromkeys(roots))

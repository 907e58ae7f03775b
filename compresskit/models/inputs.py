"""Model inputs as the stages pass them around: one tensor (or array) for a model with one
input, a tuple in the pipeline's `input:` order for a model with several.

Every stage calls a model through `call`, counts samples with `count` and moves data with
`to`, so a model taking (input_ids, attention_mask) goes through the same code as a CNN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16,
          "int64": torch.int64, "int32": torch.int32}
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def is_multi(x: Any) -> bool:
    return isinstance(x, (tuple, list))


def call(model: Callable[..., Any], x: Any) -> Any:
    """model(x), or model(*x) for several inputs."""
    return model(*x) if is_multi(x) else model(x)


def apply(x: Any, fn: Callable[[Any], Any]) -> Any:
    return tuple(fn(v) for v in x) if is_multi(x) else fn(x)


def first(x: Any) -> Any:
    return x[0] if is_multi(x) else x


def count(x: Any) -> int:
    """Samples in a batch."""
    return len(first(x))


def to(x: Any, device: torch.device | str) -> Any:
    return apply(x, lambda v: v.to(device))


def take(x: Any, index: Any) -> Any:
    """The samples at `index` (a slice or an index array) of every input."""
    return apply(x, lambda v: v[index])


def as_tensors(sample: Any) -> Any:
    return apply(sample, torch.as_tensor)


def stack(samples: Sequence[Any]) -> Any:
    """A batch from per-sample inputs."""
    if samples and is_multi(samples[0]):
        return tuple(torch.stack([torch.as_tensor(s[i]) for s in samples])
                     for i in range(len(samples[0])))
    return torch.stack([torch.as_tensor(s) for s in samples])


def cat(batches: Sequence[Any]) -> Any:
    if batches and is_multi(batches[0]):
        join = np.concatenate if isinstance(batches[0][0], np.ndarray) else torch.cat
        return tuple(join([b[i] for b in batches]) for i in range(len(batches[0])))
    return (np.concatenate if isinstance(batches[0], np.ndarray) else torch.cat)(list(batches))


def numpy(x: Any, dtypes: Sequence[str] | None = None) -> Any:
    """As numpy arrays, cast to the configured dtypes when given."""
    if not is_multi(x):
        arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return arr.astype(NP_DTYPES[dtypes[0]]) if dtypes else arr
    return tuple(numpy(v, [dtypes[i]] if dtypes else None) for i, v in enumerate(x))


def perturb(x: Any, noise: float) -> Any:
    """Gaussian noise of scale `noise` on the floating-point inputs (token ids stay as they are)."""
    return apply(x, lambda v: v + noise * torch.randn_like(v) if v.is_floating_point() else v)


def resize(x: Any, specs: Sequence[Any], length: int) -> Any:
    """Every dynamic axis of every input (per its spec's `dynamic`) cut or zero-padded to
    `length`; arrays or tensors."""
    values = list(x) if is_multi(x) else [x]
    out = []
    for v, spec in zip(values, specs, strict=True):
        for axis in sorted(spec.dynamic):
            dim = axis + 1
            size = v.shape[dim]
            if size >= length:
                v = v[(slice(None),) * dim + (slice(0, length),)]
            else:
                pad = [(0, 0)] * v.ndim
                pad[dim] = (0, length - size)
                v = np.pad(np.asarray(v), pad)
        out.append(np.ascontiguousarray(v))
    return tuple(out) if is_multi(x) else out[0]


def feeds(names: Sequence[str], x: Any) -> dict[str, np.ndarray]:
    """onnxruntime feeds: the session's input names, in export order, to contiguous arrays."""
    values = list(x) if is_multi(x) else [x]
    return {n: np.ascontiguousarray(v) for n, v in zip(names, values, strict=False)}

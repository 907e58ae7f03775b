"""Teacher outputs for training batches: computed live on every batch, or once per training
split into memory-mapped .npy files under <run>/cache and looked up by sample index.

Each cached output (a teacher's logits, or one module's output) is its own file with a JSON
sidecar written last: the key (sha256 of the teacher's weights, the data, the output and the
precision) and the file's sha256. A sidecar whose key differs is stale; a file whose hash or
shape differs from its sidecar is corrupt; either is rebuilt, saying which. The key holds the
teacher's weights, not its role, so prune recovery, lowrank recovery and QAT reuse the logits a
distill stage cached whenever the teacher is the same, and a rerun reuses them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from compresskit.config import TeacherCacheOptions
from compresskit.distill.features import Taps
from compresskit.engine import distributed as dist
from compresskit.engine.artifacts import sha256_file, write_json
from compresskit.engine.context import StageContext
from compresskit.errors import StageError
from compresskit.models.inputs import as_tensors, call, is_multi, stack, to
from compresskit.train.loop import Batch, sample_lengths, unpack
from compresskit.train.padding import Padding

LOGITS = "logits"


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        v = value.detach().cpu().contiguous()
        h.update(f"{name}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_digest(ds: Dataset, config: Any, samples: int = 64) -> str:
    """The data's identity: its configuration, its length and the bytes of `samples` inputs
    spread over the split (a content check that stays cheap on large splits)."""
    n = len(ds)  # type: ignore[arg-type]
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(str(n).encode())
    for i in sorted({int(j) for j in np.linspace(0, n - 1, min(n, samples))}):
        for x in _parts(unpack(ds[i])[0]):
            h.update(x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def augmented(ds: Dataset) -> bool:
    """Whether the split draws random augmentations: the same index gives different inputs."""
    n = len(ds)  # type: ignore[arg-type]
    for i in dict.fromkeys((0, n // 2, n - 1)):
        for a, b in zip(_parts(unpack(ds[i])[0]), _parts(unpack(ds[i])[0]), strict=True):
            if a.shape != b.shape or not torch.equal(a, b):
                return True
    return False


def _parts(x: Any) -> list[torch.Tensor]:
    """A sample's input tensors (one, or one per input)."""
    x = as_tensors(x)
    return list(x) if is_multi(x) else [x]


def output_key(name: str, module: str | None) -> str:
    """How an output is named in the dict TeacherOutputs returns: 'teacher' for its logits,
    'teacher:layer3' for a module's output."""
    return name if module is None else f"{name}:{module}"


class TeacherOutputs:
    """Callable on a training Batch; returns {output_key: tensor on the batch's device}."""

    def __init__(self, teachers: dict[str, nn.Module], modules: dict[str, list[str]],
                 device: torch.device):
        self.teachers = {n: m.to(device).eval() for n, m in teachers.items()}
        self.modules = {n: list(dict.fromkeys(modules.get(n, []))) for n in teachers}
        self.device = device
        self.cached: dict[str, np.ndarray] | None = None
        self.padding: Padding | None = None
        """Set when training cuts padding: the cache is then built by length too."""

    @torch.no_grad()
    def live(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, model in self.teachers.items():
            model.eval()  # an EMA teacher sits inside a module that training sets to train()
            taps = Taps(model, self.modules[name], f"teacher '{name}'")
            try:
                out[name] = call(model, x)
                for module in self.modules[name]:
                    out[output_key(name, module)] = taps.take(module)
            finally:
                taps.close()
        return out

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.cached is None:
            return self.live(batch.x)
        index = batch.index.cpu().numpy()
        return {k: torch.from_numpy(np.asarray(v[index], dtype=np.float32)).to(self.device)
                for k, v in self.cached.items()}

    def use_cache(self, folder: Path, ds: Dataset, data_key: str, precision: str,
                  batch_size: int, log: Callable[[str], None]) -> None:
        """Serve outputs from files in `folder`, building those that are missing, stale or
        corrupt with one pass over `ds` (rank 0 builds; the other ranks wait, then read)."""
        wanted = {output_key(n, m): (n, m) for n in self.teachers
                  for m in [None, *self.modules[n]]}
        digests = {n: weights_digest(m) for n, m in self.teachers.items()}
        keys = {k: _digest(digests[n], data_key, m or LOGITS, precision)
                for k, (n, m) in wanted.items()}
        if dist.is_main():
            todo = {}
            for k in wanted:
                problem = _check(folder, k, keys[k])
                if problem:
                    if problem != "missing":
                        log(f"teacher cache {_file(folder, k).name} is {problem}; rebuilding")
                    todo[k] = wanted[k]
            if todo:
                log(f"caching {len(todo)} teacher output(s) for {len(ds):,} training samples "  # type: ignore[arg-type]
                    f"({', '.join(todo)}), once")
                self._build(folder, todo, {k: keys[k] for k in todo}, ds, precision,
                            batch_size)
            else:
                log(f"teacher outputs from the cache ({', '.join(wanted)})")
        dist.barrier()
        self.cached = {k: np.load(_file(folder, k), mmap_mode="r") for k in wanted}

    def _cuts_safely(self, ds: Dataset, keys: list[str]) -> bool:
        """Whether cutting padding leaves the shape of every output to cache as it is (a pooled
        embedding or logits); per-token outputs keep the full length."""
        if self.padding is None:
            return False
        x = to(stack([unpack(ds[i])[0] for i in range(min(2, len(ds)))]),  # type: ignore[arg-type]
               self.device)
        full, cut = self.live(x), self.live(self.padding.trim(x))
        return all(full[k].shape == cut[k].shape for k in keys)

    @torch.no_grad()
    def _build(self, folder: Path, todo: dict[str, tuple[str, str | None]],
               keys: dict[str, str], ds: Dataset, precision: str, batch_size: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        n = len(ds)  # type: ignore[arg-type]
        arrays: dict[str, np.memmap] = {}
        temps: dict[str, Path] = {}
        # With padding known, samples go by length so each batch is cut to its longest.
        padding = self.padding if self._cuts_safely(ds, list(todo)) else None
        order = np.arange(n) if padding is None else \
            np.argsort(sample_lengths(padding, ds), kind="stable")
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            x = to(stack([unpack(ds[int(i)])[0] for i in index]), self.device)
            if padding is not None:
                x = padding.trim(x)
            out = self.live(x)
            for k in todo:
                value = out[k].float().cpu().numpy()
                if k not in arrays:
                    temps[k] = folder / f".{_file(folder, k).name}.{os.getpid()}.tmp"
                    arrays[k] = np.lib.format.open_memmap(
                        temps[k], mode="w+", dtype=np.dtype(precision),
                        shape=(n, *value.shape[1:]))
                arrays[k][index] = value
        for k, array in arrays.items():
            array.flush()
            del array
            os.replace(temps[k], _file(folder, k))
            write_json(_meta(folder, k), {"key": keys[k], "sha256": sha256_file(_file(folder, k)),
                                          "output": k, "precision": precision, "samples": n})


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _file(folder: Path, key: str) -> Path:
    # Model names are [A-Za-z0-9_]: '--' cannot occur in one, so names never collide.
    return folder / (re.sub(r"[^A-Za-z0-9_.-]", "_", key.replace(":", "--")) + ".npy")


def _meta(folder: Path, key: str) -> Path:
    return _file(folder, key).with_suffix(".json")


def _check(folder: Path, output: str, key: str) -> str | None:
    """None when the cached output is usable, else why not: missing, stale or corrupt."""
    path, meta_path = _file(folder, output), _meta(folder, output)
    if not meta_path.exists() and not path.exists():
        return "missing"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return "corrupt (its sidecar .json is unreadable)"
    if not isinstance(meta, dict) or meta.get("key") != key:
        return "stale (the teacher's weights, the data or the requested output changed)"
    if not path.exists() or sha256_file(path) != meta.get("sha256"):
        return "corrupt (its content does not match the sha256 recorded when it was written)"
    try:
        np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return "corrupt (not a readable .npy array)"
    return None



def for_stage(ctx: StageContext, cfg: TeacherCacheOptions, teachers: dict[str, nn.Module],
              modules: dict[str, list[str]] | None = None) -> TeacherOutputs:
    """The teachers' outputs on the pipeline's training split, cached as `cfg` says."""
    from compresskit.train.loop import padding

    outputs = TeacherOutputs(teachers, modules or {}, ctx.device)
    outputs.padding = padding(ctx)
    if cfg.cache_teacher is False:
        return outputs
    ds = ctx.data().train
    if augmented(ds):
        if cfg.cache_teacher is True:
            raise StageError(ctx.name, "cache_teacher: true, but the training split returns "
                             "different inputs for the same index (random augmentation), so "
                             "cached teacher outputs would not match what the student sees; "
                             "set cache_teacher: auto or false")
        ctx.log("the training split is randomly augmented: teacher outputs are computed on "
                "every batch (no cache)")
        return outputs
    data = ctx.config.data
    key = data_digest(ds, {"source": data.source, "kwargs": data.kwargs})
    outputs.use_cache(ctx.run_dir / "cache", ds, key, cfg.cache_precision,
                      data.eval_batch_size, ctx.log)
    return outputs

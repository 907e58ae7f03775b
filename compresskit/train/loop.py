"""The one training loop, shared by train, distill and (later) every recovery fine-tune."""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from compresskit.config import TrainingOptions
from compresskit.engine import distributed as dist
from compresskit.errors import ConfigError, Problem
from compresskit.models.inputs import as_tensors, call, to
from compresskit.models.inputs import count as count_of
from compresskit.train.padding import LengthGroupedBatches, Padding


@dataclass
class Batch:
    """One training batch: inputs, labels (None for a split of bare inputs), and the samples'
    indices in the split (what the teacher-output cache is looked up by)."""

    x: Any
    """A tensor, or a tuple of tensors for a model with several inputs (models/inputs.py)."""
    y: torch.Tensor | None
    index: torch.Tensor


StepFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


def unpack(sample: Any) -> tuple[Any, Any | None]:
    """(input, label) of a sample; a bare input, or a 1-tuple, has no label."""
    if isinstance(sample, (tuple, list)):
        if len(sample) == 2:
            return sample[0], sample[1]
        if len(sample) == 1:
            return sample[0], None
    return sample, None


def has_labels(ds: Dataset) -> bool:
    return unpack(ds[0])[1] is not None


class Indexed(Dataset):
    """A split whose samples carry their index, with or without a label."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = unpack(self.ds[i])
        out = {"x": as_tensors(x), "index": i}
        if y is not None:
            out["y"] = torch.as_tensor(y)
        return out


class Diverged(Exception):
    """The loss became NaN or Inf; the message names the step and the loss terms."""


class ReplicasDiverged(Diverged):
    """Under torchrun, the ranks ended a stage with different weights."""


def loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=False)


def make_optimizer(params: Any, opts: TrainingOptions) -> torch.optim.Optimizer:
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr, momentum=0.9, nesterov=True,
                               weight_decay=opts.weight_decay)
    if opts.optimizer == "adam":
        return torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    return torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)


def make_schedule(opt: torch.optim.Optimizer, opts: TrainingOptions,
                  total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if opts.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@torch.no_grad()
def predict(model: nn.Module, ds: Dataset, batch_size: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole split, in order."""
    model.eval()
    outs, labels = [], []
    for sample in loader(ds, batch_size, shuffle=False, seed=0):
        x, y = unpack(sample)
        outs.append(call(model, to(x, device)).float().cpu())
        if y is not None:
            labels.append(torch.as_tensor(y))
    return torch.cat(outs), torch.cat(labels) if labels else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


def evaluate(model: nn.Module, ds: Dataset, batch_size: int, device: torch.device) -> float:
    logits, labels = predict(model, ds, batch_size, device)
    return accuracy(logits, labels)


def _save_resume(path: Path, epoch: int, model: nn.Module, opt: torch.optim.Optimizer,
                 sched: Any, gen: torch.Generator, history: dict[str, list[float]]) -> None:
    from compresskit.engine.artifacts import atomic_path

    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "schedule": sched.state_dict(), "generator": gen.get_state(),
             "rng": torch.get_rng_state(), "history": history}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _read_resume(path: Path | None) -> dict[str, Any] | None:
    """Rank 0 reads the resume state and hands it to every rank (no shared disk needed)."""
    state = None
    if dist.is_main() and path is not None and path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError):
            state = None
    return dist.broadcast_object(state)


def _load_resume(state: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                 gen: torch.Generator) -> tuple[int, dict[str, list[float]]] | None:
    """Restore everything a resumed run needs to continue bit for bit; None if unusable."""
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        return int(state["epoch"]), state["history"]
    except (RuntimeError, KeyError, ValueError, TypeError):
        return None


def unmatched_freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """One sentence for each `freeze` pattern that names none of `model`'s trainable
    parameters, naming a few that exist."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return [f"'{pattern}' matches none of the model's trainable parameters ({shown}); write a "
            "glob pattern over model.named_parameters()"
            for pattern in patterns if not any(fnmatch.fnmatchcase(n, pattern) for n in names)]


def check_freeze(model: nn.Module, patterns: list[str], key: str = "freeze") -> None:
    """A ConfigError at `key` (e.g. stages[1].freeze) for the patterns naming no parameter."""
    missing = unmatched_freeze(model, patterns)
    if missing:
        raise ConfigError([Problem(m, key=key) for m in missing])


@contextlib.contextmanager
def frozen(model: nn.Module, patterns: list[str], key: str = "freeze") -> Iterator[None]:
    """Parameters of `model` whose names match any glob pattern stop requiring gradients (so
    they are neither differentiated nor given to the optimiser) until the block ends. A
    pattern that matches none is a ConfigError at `key`."""
    check_freeze(model, patterns, key)
    chosen = [p for n, p in model.named_parameters()
              if p.requires_grad and any(fnmatch.fnmatchcase(n, pt) for pt in patterns)]
    for p in chosen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in chosen:
            p.requires_grad_(True)


def fit(model: nn.Module, train: Dataset, opts: TrainingOptions, *,
        frozen_in: nn.Module | None = None, freeze_key: str = "freeze",
        **kwargs: Any) -> dict[str, Any]:
    """Train `model` in place for opts.epochs; returns the loss and val-accuracy history.
    Parameters matching `opts.freeze`, named as in `frozen_in` (default `model`: a distiller
    wrapping the student names them as the student does), keep their values (an unmatched
    pattern is a ConfigError at `freeze_key`); the rest is `_fit`'s."""
    with frozen(model if frozen_in is None else frozen_in, opts.freeze, freeze_key):
        return _fit(model, train, opts, **kwargs)


def _fit(model: nn.Module, train: Dataset, opts: TrainingOptions, *, batch_size: int,
         step: StepFn, device: torch.device, seed: int, progress: Any = None,
         desc: str = "train", val: Dataset | None = None, eval_batch_size: int = 256,
         extra_params: list[nn.Parameter] | None = None,
         resume: Path | None = None,
         after_step: Callable[[], None] | None = None,
         padding: Padding | None = None) -> dict[str, Any]:
    """Train `model` in place for opts.epochs; returns the loss and val-accuracy history.

    With `resume`, a checkpoint (weights, optimiser, schedule, shuffling and RNG state) is saved
    there every `opts.checkpoint_every` epochs and at the end, and a later call with the same path
    continues from it, producing the same weights as an uninterrupted run. `after_step` runs
    after every optimiser step (e.g. to update a moving-average teacher held inside `model`).
    With `padding`, batches group samples of similar length and drop unused padding columns
    (train/padding.py).
    """
    model.to(device)
    data, sampler = _train_loader(train, batch_size, seed, padding)
    net = _wrap(model, device)
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params or [])
    opt = make_optimizer(params, opts)
    sched = make_schedule(opt, opts, opts.epochs * len(data))
    history: dict[str, list[float]] = {"loss": [], "val_accuracy": []}
    start = 0
    state = _read_resume(resume)
    if state is not None:
        restored = _load_resume(state, model, opt, sched, data.generator)
        if restored is not None:
            start, history = restored
    task = progress.add_task(desc, total=opts.epochs, info="", completed=start) \
        if progress is not None else None
    global_step = start * len(data)
    for epoch in range(start, opts.epochs):
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        total, count = 0.0, 0
        for raw in data:
            y = raw.get("y")
            x = raw["x"] if padding is None else padding.trim(raw["x"])
            batch = Batch(to(x, device), None if y is None else y.to(device), raw["index"])
            loss, terms = step(net, batch)
            value = float(loss.detach())
            # Under torchrun every rank sees the mean, so all stop together on a NaN.
            if not math.isfinite(dist.mean(value, device)):
                shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                if global_step == 0:  # no update yet: the model itself computes it
                    raise Diverged(
                        f"the loss is {value} on the first batch, before any update ({shown}):"
                        " the model's outputs are not finite on the training data (a quantizer"
                        " or a float16 op on a tensor that holds infinities, such as an "
                        "attention mask?); no learning rate changes that")
                raise Diverged(
                    f"the loss became {value} at epoch {epoch + 1}, step "
                    f"{global_step} ({shown}); lower the learning rate (lr: {opts.lr}) "
                    "or the temperature")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            total += value * count_of(batch.x)
            count += count_of(batch.x)
            global_step += 1
        history["loss"].append(dist.mean(total / max(1, count), device))
        info = f"loss {history['loss'][-1]:.4f}"
        if val is not None and has_labels(val):
            history["val_accuracy"].append(evaluate(model, val, eval_batch_size, device))
            info += f"  val acc {history['val_accuracy'][-1]:.4f}"
        if task is not None:
            progress.update(task, advance=1, info=info)
        last = epoch + 1 == opts.epochs
        if last and opts.bn_recalibration:
            recalibrate_batchnorm(model, train, batch_size, device, opts.bn_recalibration,
                                  padding)
        if resume is not None and dist.is_main() and (
                last or (opts.checkpoint_every and (epoch + 1) % opts.checkpoint_every == 0)):
            _save_resume(resume, epoch + 1, model, opt, sched, data.generator, history)
    mismatch = dist.replica_mismatch(model, device)
    if mismatch:
        raise ReplicasDiverged(f"after training, {mismatch}; this is a bug in a model that "
                               "keeps state outside parameters and buffers, or in compresskit")
    return history


def recalibrate_batchnorm(model: nn.Module, train: Dataset, batch_size: int,
                          device: torch.device, batches: int,
                          padding: Padding | None = None) -> int:
    """Re-estimate every BatchNorm's running mean and variance for the weights as they are: the
    plain average over `batches` training batches (a fixed shuffle), BatchNorm in training
    mode and everything else (dropout) in eval mode. Under torchrun each rank averages its own
    batches and the ranks then average theirs. Returns how many layers were re-estimated."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
        m.train()
    try:
        with torch.no_grad():
            for i, raw in enumerate(loader(Indexed(train), batch_size, shuffle=True, seed=0)):
                if i >= batches:
                    break
                call(model, to(raw["x"] if padding is None else padding.trim(raw["x"]), device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    if dist.active():
        import torch.distributed as tdist

        for m in norms:
            for t in (m.running_mean, m.running_var):
                if t is not None:
                    tdist.all_reduce(t)
                    t /= dist.world_size()
    return len(norms)


def fit_stage(ctx: Any, model: nn.Module, opts: TrainingOptions, step: StepFn, what: str, *,
              resume: str, blame: str = "", hint: str = "",
              after_step: Callable[[], None] | None = None,
              frozen_in: nn.Module | None = None) -> dict[str, Any]:
    """`fit` inside a stage: the pipeline's training split and batch size, the stage's device,
    seed, progress bar ('<stage> <what>') and resume file (work_dir/<resume>.resume.pt),
    validation each epoch; a divergence fails the stage, its message between `blame` and
    `hint`."""
    from compresskit.engine.loader import format_path
    from compresskit.errors import StageError

    data = ctx.data()
    try:
        return fit(model, data.train, opts, step=step, batch_size=ctx.config.data.batch_size,
                   device=ctx.device, seed=ctx.seed, progress=ctx.progress,
                   desc=f"{ctx.name} {what}", val=data.val,
                   eval_batch_size=ctx.config.data.eval_batch_size,
                   resume=ctx.work_dir / f"{resume}.resume.pt", after_step=after_step,
                   padding=padding(ctx), frozen_in=frozen_in,
                   freeze_key=format_path(("stages", ctx.index, "freeze")))
    except Diverged as e:
        raise StageError(ctx.name, f"{blame}{e}{hint}") from None


def sample_lengths(padding: Padding, ds: Dataset, batch_size: int = 1024) -> Any:
    """Each sample's length (one past its last real token), as a numpy array."""
    import numpy as np

    n = len(ds)  # type: ignore[arg-type]
    out = np.empty(n, dtype=np.int64)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        masks = torch.stack([torch.as_tensor(unpack(ds[i])[0][padding.mask])
                             for i in range(start, stop)])
        out[start:stop] = padding.length({padding.mask: masks}).numpy()
    return out


def padding(ctx: Any) -> Padding | None:
    """The pipeline's padded inputs when `data.group_by_length` asks to batch by length."""
    return Padding.of(ctx.config.inputs) if ctx.config.data.group_by_length else None


def _train_loader(train: Dataset, batch_size: int, seed: int,
                  padding: Padding | None = None) -> tuple[DataLoader, Any]:
    """One process: shuffled batches (of similar lengths with `padding`). Under torchrun: each
    rank a shard of each epoch, with `batch_size` the global batch (split across ranks), so
    steps per epoch stay the same; padding is still cut, batches are not grouped."""
    lengths = None if padding is None or dist.active() else sample_lengths(padding, train)
    train = Indexed(train)
    if lengths is not None:
        gen = torch.Generator()
        gen.manual_seed(seed)
        return DataLoader(train, batch_sampler=LengthGroupedBatches(lengths, batch_size, gen),
                          generator=gen), None
    if not dist.active():
        return loader(train, batch_size, shuffle=True, seed=seed), None
    from torch.utils.data.distributed import DistributedSampler

    sampler: DistributedSampler = DistributedSampler(
        train, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=seed)
    gen = torch.Generator()  # unused by the sampler; kept so resume state has one shape
    gen.manual_seed(seed)
    per_rank = max(1, batch_size // dist.world_size())
    return DataLoader(train, batch_size=per_rank, sampler=sampler, generator=gen), sampler


def _wrap(model: nn.Module, device: torch.device) -> nn.Module:
    if not dist.active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def cross_entropy_step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    if batch.y is None:  # callers check has_labels first; reaching here is our bug
        raise RuntimeError("cross-entropy on a batch without labels")
    loss = nn.functional.cross_entropy(call(model, batch.x), batch.y)
    return loss, {"ce": float(loss.detach())}

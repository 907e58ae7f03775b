"""Data sources: built-in ones by name, or a user's factory returning {'train', 'val', 'test'}."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compresskit.config import DataConfig, InputConfig
from compresskit.errors import ConfigError, Problem
from compresskit.registry import Registry
from compresskit.sources import SourceError, call_user, resolve

if TYPE_CHECKING:
    from torch.utils.data import Dataset

DATASETS: Registry[Callable[..., dict[str, Any]]] = Registry("data source")


def _without_labels(out: dict[str, Dataset], train_labels: bool) -> dict[str, Dataset]:
    """With train_labels false, the train split yields bare inputs (label-free distillation:
    the teacher's outputs are the only target); val and test keep labels to measure accuracy."""
    if not train_labels:
        from torch.utils.data import TensorDataset

        out["train"] = TensorDataset(out["train"].tensors[0])  # type: ignore[attr-defined]
    return out


@DATASETS.register("digits")
def digits(val_fraction: float = 0.1, train_labels: bool = True) -> dict[str, Any]:
    """scikit-learn's 1,797 real 8x8 handwritten digits; pixels / 16 as float32 (1, 8, 8).

    `test` is exactly the test part of train_test_split(X, y, test_size=0.2, random_state=0,
    stratify=y), so anyone can check a reported accuracy; `val` is carved from the train part.
    `train_labels: false` drops the training labels (val and test keep theirs).
    """
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch.utils.data import TensorDataset

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y)
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_train, y_train, test_size=val_fraction, random_state=0, stratify=y_train)

    def ds(xs: Any, ys: Any) -> TensorDataset:
        return TensorDataset(torch.tensor(xs / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8),
                             torch.tensor(ys, dtype=torch.long))

    return {**_without_labels(
        {"train": ds(x_fit, y_fit), "val": ds(x_val, y_val), "test": ds(x_test, y_test)},
        train_labels), "labels": [str(d) for d in range(10)]}


@DATASETS.register("digits_rgb32")
def digits_rgb32(size: int = 32, val_fraction: float = 0.1, seed: int = 0,
                 train_labels: bool = True) -> dict[str, Any]:
    """The same real digits and splits as 'digits', upsampled (bilinear) to 3 x size x size and
    painted with a random light foreground and dark background colour per image plus pixel
    noise, so a model must learn shape, not colour. A stand-in for small RGB image tasks
    (CIFAR-sized inputs) that needs no download; the colours are fixed by `seed`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Dataset] = {}
    base = digits(val_fraction)
    for name in ("train", "val", "test"):
        x, y = base[name].tensors  # type: ignore[attr-defined]
        n = len(x)
        big = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                              align_corners=False).clamp(0, 1)
        fg = 0.55 + 0.45 * torch.rand(n, 3, 1, 1, generator=gen)
        bg = 0.45 * torch.rand(n, 3, 1, 1, generator=gen)
        img = bg + (fg - bg) * big + 0.05 * torch.randn(n, 3, size, size, generator=gen)
        out[name] = torch.utils.data.TensorDataset(img.float(), y)
    return {**_without_labels(out, train_labels), "labels": [str(d) for d in range(10)]}


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset | None
    labels: list[str] | None = None
    """Class names by index, when the source gives them (a 'labels' entry)."""

    @property
    def eval(self) -> Dataset:
        """The split accuracy is reported on: test when present, else val."""
        return self.test if self.test is not None else self.val

    @property
    def eval_name(self) -> str:
        return "test" if self.test is not None else "val"


def describe_source(source: str) -> str:
    """How a data source prepares inputs, for the deployment manifest: a built-in source's own
    description, or a pointer to the user's factory."""
    if ":" in source or source not in DATASETS:
        return (f"inputs exactly as the data source '{source}' yields them (see its code); the "
                "model expects the same scaling and layout")
    doc = " ".join((DATASETS.get(source).__doc__ or "").split())
    return f"as the built-in data source '{source}': {doc.split('. ')[0].rstrip('.')}."


def _problem(cfg_file: str | None, msg: str) -> ConfigError:
    return ConfigError(Problem(msg, file=cfg_file, key="data.source"))


def load_data(cfg: DataConfig, inp: InputConfig, base_dir: Path,
              cfg_file: str | None = None) -> Splits:
    """Build the splits and check that samples match `input.shape`; bad data is exit 2."""
    if ":" in cfg.source:
        try:
            factory = resolve(cfg.source, base_dir)
        except SourceError as e:
            raise _problem(cfg_file, str(e)) from None
    else:
        try:
            factory = DATASETS.get(cfg.source)
        except KeyError as e:
            raise _problem(cfg_file, str(e.args[0])) from None
    try:
        out = call_user(factory, cfg.kwargs, f"data source '{cfg.source}'")
    except SourceError as e:
        raise _problem(cfg_file, str(e)) from None
    if not isinstance(out, dict) or "train" not in out or "val" not in out:
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise _problem(cfg_file, f"'{cfg.source}' must return a mapping with 'train' and 'val' "
                                 f"(and optionally 'test') datasets, got {got}")
    labels = out.get("labels")
    splits = Splits(train=out["train"], val=out["val"], test=out.get("test"),
                    labels=[str(v) for v in labels] if isinstance(labels, (list, tuple)) else None)
    for name in ("train", "val", "test"):
        ds = getattr(splits, name)
        if ds is None:
            continue
        _check_split(ds, name, cfg.source, inp, cfg_file)
    return splits


def _check_split(ds: Any, name: str, source: str, inp: InputConfig, cfg_file: str | None) -> None:
    import torch

    if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
        raise _problem(cfg_file, f"'{source}' split '{name}' is not a map-style Dataset "
                                 "(needs __len__ and __getitem__)")
    if len(ds) == 0:
        raise _problem(cfg_file, f"'{source}' split '{name}' is empty")
    from compresskit.training import unpack

    sample = ds[0]
    bad = isinstance(sample, (tuple, list)) and len(sample) not in (1, 2)
    if bad or (name != "train" and unpack(sample)[1] is None):
        what = "(input, label) pairs" if name != "train" else \
            "(input, label) pairs, or bare inputs when unlabeled"
        raise _problem(cfg_file, f"'{source}' split '{name}' must yield {what}")
    x = torch.as_tensor(unpack(sample)[0])
    if list(x.shape) != list(inp.shape):
        raise _problem(cfg_file, f"'{source}' split '{name}' yields inputs of shape "
                                 f"{list(x.shape)}, but input.shape is {inp.shape}; set "
                                 f"input.shape: {list(x.shape)} or reshape the data")
